"""What a train step computes and how long a run lasts: loss, optimizer, train, checkpoint."""

from __future__ import annotations

import importlib.util

from jdistill import losses
from jdistill.config.fields import (
  check_choice,
  check_integer,
  check_positive,
  fail,
  field,
  get,
  one_of,
  section,
)

LOSSES = losses.registry.NAMES  # the one vocabulary of loss names (jdistill/losses/registry.py)
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("skip", "stop")
WANDB_MODES = ("", "offline", "online")

LOSS = section(
  "loss",
  chunk_size=field(
    0,
    "positions per chunk when logits are built from hidden states (memory, speed); `0`: "
    "chosen from the shapes (~256 tokens a chunk on CPU, a 512 MiB logits budget on "
    "accelerators; `losses.chunk_positions`)",
    "an int ≥ 0",
  ),
  temperature=field(
    1.0, "divides student and teacher logits before the softmax in every loss", "a float > 0"
  ),
  normalize=field(
    "token",
    "mean over completion tokens, mean over sequences of their token mean, or (Dr. GRPO) the "
    "sum over a fixed `rows × length`",
    one_of(losses.NORMALIZE_MODES),
  ),
  beta=field(0.5, "β of `jsd` (0 = forward KL, 1 = reverse KL, exactly)", "a float in [0, 1]"),
  topk=field(64, "k of the `topk_*` losses", "a positive int ≤ vocabulary size"),
  topk_tail=field(
    "bucket",
    "mass outside the top-k support: one tail bucket, or renormalise over the support",
    one_of(losses.TOPK_TAILS),
  ),
  topk_direction=field(
    "reverse",
    "KL direction of the `topk_*` losses: KL(student‖teacher) or KL(teacher‖student)",
    one_of(losses.KL_DIRECTIONS),
  ),
  clip_eps=field(
    0.0,
    "PPO clip ε of the importance ratio q(x)/π(x) of `sampled_token` (π = the distribution "
    "the sampler drew from)",
    "a float ≥ 0; `0` = importance weight without clip",
  ),
  kl_weight=field(
    1.0,
    "λ, the weight of the sampled-token distillation advantage −k1 (with a reward advantage "
    "added, the unified objective; 0 = pure reward)",
    "a float",
  ),
  icepop_c=field(
    0.0,
    "IcePop: sampled terms (`sampled_token`, the sampled part of `overlap_aware`) whose "
    "importance ratio q(x)/π(x) leaves [1/c, c] get no gradient; the masked share is logged "
    "per teacher as `icepop_masked`",
    "`0` (off) or a float > 1",
  ),
  nonfinite=field(
    "skip",
    "a NaN/Inf loss or gradient norm: leave params and optimizer state unchanged and warn, "
    "or raise",
    one_of(NONFINITE),
  ),
  overlap_criterion=field(
    "teacher_topk",
    "gate of `overlap_aware` (see [design.md](design.md#overlap-aware))",
    one_of(losses.OVERLAP_CRITERIA),
  ),
  overlap_topk=field(8, "k of the `teacher_topk` and `soft` gates", "a positive int"),
  overlap_floor_prob=field(
    1e-3, "teacher probability floor of the `floor` gate", "a probability in (0, 1]"
  ),
)

OPTIMIZER = section(
  "optimizer",
  lr=field(1e-5, "peak learning rate", "a number > 0"),
  warmup_steps=field(10, "linear warmup from 0, in train steps", "an int ≥ 0, ≤ `train.steps`"),
  schedule=field("cosine", "decay after warmup", one_of(SCHEDULES)),
  end_lr_ratio=field(0.1, "final learning rate = `lr × end_lr_ratio` (cosine, linear)", "a float"),
  weight_decay=field(0.0, "AdamW decoupled weight decay", "a number ≥ 0"),
  b1=field(0.9, "Adam β1", "a float in [0, 1)"),
  b2=field(0.95, "Adam β2", "a float in [0, 1)"),
  eps=field(1e-8, "Adam ε", "a float > 0"),
  max_grad_norm=field(1.0, "global gradient-norm clip", "a number ≥ 0; `0` = off"),
  grad_accum=field(
    1,
    "train steps accumulated per update (`optax.MultiSteps`; the schedule runs over real updates)",
    "a positive int",
  ),
)

TRAIN = section(
  "train",
  steps=field(100, "train steps (each: one rollout batch, one compiled step)", "a positive int"),
  log_every=field(
    1,
    "steps between progress lines, `metrics.jsonl` records and TensorBoard points",
    "a positive int",
  ),
  eval_every=field(
    0,
    "steps between held-out evals (per-teacher reverse KL on fixed-key rollouts)",
    "an int ≥ 0; `0` = off",
  ),
  sample_rows=field(
    2,
    "rows per teacher recorded token by token on each logging step (OPD): both log-probs, "
    "nucleus / IcePop / clip flags and the teacher's top alternatives, in `samples.jsonl` "
    "(drawn by `jdistill report`)",
    "an int ≥ 0; `0` = off",
  ),
  sample_topk=field(
    5, "teacher alternatives recorded per sampled token (`train.sample_rows`)", "a positive int"
  ),
  wandb=field(
    "",
    "also log to Weights & Biases: the `metrics.jsonl` scalars, evals and the sample rollouts "
    "as a table; `offline` writes `<output_dir>/wandb/` with no network (`wandb sync` uploads "
    "it), `online` streams to the W&B server; a resumed run continues its W&B run",
    one_of(WANDB_MODES, " (`\"\"` = off); a mode needs `pip install 'jdistill[wandb]'`"),
  ),
  wandb_project=field("jdistill", "the W&B project of the run (`train.wandb`)", "a name"),
)

CHECKPOINT = section(
  "checkpoint",
  dir=field(
    "",
    "orbax checkpoint directory (params, optimizer state, step, RNG, data-iterator "
    "position); an existing one is resumed",
    'a path; `""` = no checkpoints',
  ),
  every=field(50, "steps between checkpoints (and one at the end)", "a positive int"),
  keep=field(3, "checkpoints kept (older ones deleted)", "a positive int"),
  async_save=field(True, "save in the background", "bool"),
  resume=field(True, "restore from `checkpoint.dir` at start", "bool"),
  restore_step=field(-1, "step to restore", "a saved step; `-1` = the latest"),
)


def validate(config) -> None:
  """train and checkpoint first: the optimizer's warmup is bounded by train.steps."""
  for name in ("train.steps", "train.log_every", "checkpoint.keep", "checkpoint.every"):
    check_positive(config, name)
  check_positive(config, "train.eval_every", allow_zero=True)
  check_positive(config, "train.sample_rows", allow_zero=True)
  check_positive(config, "train.sample_topk")
  check_integer(config, "train.sample_rows")
  check_integer(config, "train.sample_topk")
  check_integer(config, "train.steps")
  if config.checkpoint.restore_step < -1:  # any other negative step was silently the latest
    fail("checkpoint.restore_step", config.checkpoint.restore_step, "a saved step, or -1 (latest)")
  check_choice(config, "train.wandb", WANDB_MODES)
  if config.train.wandb and not _importable("wandb"):
    fail(
      "train.wandb",
      config.train.wandb,
      "\"\" (wandb is not installed: pip install 'jdistill[wandb]')",
    )
  _validate_loss(config)
  _validate_optimizer(config)


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ValueError:  # sys.modules[module] is None: its import is blocked
    return False


def _validate_loss(config) -> None:
  check_choice(config, "loss.normalize", losses.NORMALIZE_MODES)
  check_choice(config, "loss.topk_tail", losses.TOPK_TAILS)
  check_choice(config, "loss.topk_direction", losses.KL_DIRECTIONS)
  check_choice(config, "loss.nonfinite", NONFINITE)
  check_choice(config, "loss.overlap_criterion", losses.OVERLAP_CRITERIA)
  for name in ("loss.temperature", "loss.topk", "loss.overlap_topk"):
    check_positive(config, name)
  for name in ("loss.chunk_size", "loss.clip_eps"):
    check_positive(config, name, allow_zero=True)
  for name in ("loss.chunk_size", "loss.topk"):
    check_integer(config, name)
  if config.loss.icepop_c != 0 and not config.loss.icepop_c > 1:
    fail("loss.icepop_c", config.loss.icepop_c, "0 (off) or a ratio bound > 1")
  if not 0.0 < config.loss.overlap_floor_prob <= 1.0:
    fail("loss.overlap_floor_prob", config.loss.overlap_floor_prob, "a probability in (0, 1]")
  if not 0.0 <= config.loss.beta <= 1.0:
    fail("loss.beta", config.loss.beta, "a float in [0, 1]")


def _validate_optimizer(config) -> None:
  check_choice(config, "optimizer.schedule", SCHEDULES)
  for name in ("optimizer.lr", "optimizer.grad_accum", "optimizer.eps"):
    check_positive(config, name)
  for name in ("optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.max_grad_norm"):
    check_positive(config, name, allow_zero=True)
  check_integer(config, "optimizer.grad_accum")
  for name in ("optimizer.b1", "optimizer.b2"):
    if not 0.0 <= get(config, name) < 1.0:
      fail(name, get(config, name), "a float in [0, 1)")
  if config.optimizer.warmup_steps > config.train.steps:
    fail(
      "optimizer.warmup_steps",
      config.optimizer.warmup_steps,
      f"at most train.steps={config.train.steps}",
    )
