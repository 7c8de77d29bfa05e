"""The stages besides OPD and their chaining: generate, sft, rl (stage `rlvr`), pipeline.

`validate_stage` checks what the config's `stage` needs (its section, its inputs, teachers);
the stages themselves live in `jdistill/stages/`.
"""

from __future__ import annotations

from jdistill.config.fields import check_choice, check_positive, fail, field, one_of, section
from jdistill.config.metrics import VERIFIERS, check_verifier
from jdistill.config.model import DTYPES, validate_teachers
from jdistill.config.run import STAGES

KEEP = ("all", "verified")

GENERATE = section(
  "generate",
  model=field(
    "",
    "the model that samples: HF or checkpoint directory (default `student.path`); "
    "`teachers`: each teacher samples its own domains' prompts into "
    "`generate.out_dir/<teacher>`",
    "a path, `teachers` or empty",
  ),
  model_name=field(
    "",
    "recorded as `teacher` in every record (default: the directory's name)",
    "a string",
  ),
  param_dtype=field("bfloat16", "storage and compute dtype of that model", one_of(DTYPES)),
  prompt_files=field(
    "",
    "prompts (as `data.train_files`; an `answer` field is the verifier's reference; default "
    "`data.train_files`)",
    "paths or empty",
  ),
  out_dir=field(
    "runs/generated", "where `part-<p>-of-<P>.jsonl` and its progress file go", "a path"
  ),
  samples_per_prompt=field(4, "completions per prompt", "a positive int"),
  prompts_per_batch=field(
    8, "prompts per sampler call (and per commit of the output)", "a positive int"
  ),
  verifier=field(
    "",
    "scores each completion against the prompt's `answer` (`jdistill.eval.verifiers`)",
    f"{VERIFIERS} or empty",
  ),
  keep=field(
    "all", "`verified` keeps only completions scoring 1 (rejection sampling)", one_of(KEEP)
  ),
)

SFT = section(
  "sft",
  train_files=field(
    "",
    'JSONL of `{"prompt" or "messages", "completion"}`; only the completion and its '
    "end-of-sequence token carry loss",
    "a path",
  ),
  eval_files=field(
    "",
    "held-out examples for the eval cross-entropy (else the training rows)",
    "a path or empty",
  ),
  max_len=field(
    128,
    "tokens per packed row; a longer example is an error naming `file:line`",
    "a positive int",
  ),
  rows_per_step=field(8, "rows per step (a multiple of the data-parallel size)", "a positive int"),
  pack=field(
    True,
    "several examples per row, kept apart by segment ids and restarting positions",
    "a bool",
  ),
  until_overlap=field(
    0.0,
    "overlap-triggered warmup: before the first step and every `sft.overlap_every` steps "
    "each teacher's calibrated overlap with the student's rollouts is measured; a teacher "
    "reaching this value switches to OPD (logged, `switches.json`), its examples leave the "
    "mix; the stage ends when all have switched (at most `train.steps`). Needs `teachers` "
    "and prompts in `data.train_files`",
    "0 (off) or a number in (0, 1]",
  ),
  replay_share=field(
    0.25,
    "overlap-triggered warmup: the share of each step's rows replayed from the examples of "
    "teachers that have switched, so their domains do not erode while the others train",
    "a number in [0, 1)",
  ),
  overlap_every=field(10, "steps between overlap probes", "a positive int"),
  overlap_rows=field(
    16,
    "probe prompts per domain (from `data.eval_files`, else `data.train_files`)",
    "a positive int",
  ),
)

RL = section(
  "rl",
  group_size=field(
    4, "G samples per prompt; advantages are normalised within each group", "an int ≥ 2"
  ),
  verifier=field(
    "exact_match",
    "the reward of every domain's completions (`jdistill.eval.verifiers`); a verifier that "
    "raises scores 0 and is counted",
    VERIFIERS,
  ),
  verifiers=field(
    None,
    "another verifier for one domain (set in the config file)",
    "as `rl.verifier`",
    per="domain",
  ),
  normalize_std=field(
    True, "GRPO's (r − mean) / std per group; `False`: (r − mean) (Dr. GRPO)", "a bool"
  ),
  reward_weight=field(
    1.0,
    "w_R, the weight of the group reward advantage; 0 with teachers is pure sampled-token OPD",
    "a float ≥ 0",
  ),
  kl_coef=field(
    0.0,
    "weight of the k3 penalty towards the frozen reference (the model the stage starts from)",
    "a float ≥ 0",
  ),
  dense_weight=field(
    0.0,
    "weight of a full-vocab reverse KL to each row's teacher, added as its own loss",
    "a float ≥ 0 (0 without teachers)",
  ),
  eval_prompts=field(
    32,
    "held-out prompts per group for the greedy accuracy of `evaluate`",
    "a positive int",
  ),
)

PIPELINE = section(
  "pipeline",
  stages=field(
    (),
    "stages run in order, each in `<output_dir>/<k>-<stage>`, each from the previous training "
    "stage's final model (`jdistill/stages/pipeline.py`); empty: the single stage `stage`",
    "a tuple of " + one_of(STAGES),
  ),
  steps=field(
    (), "`train.steps` of each stage (0: `train.steps`)", "empty, or one int ≥ 0 per stage"
  ),
  overrides=field(
    None,
    "fields that differ in one stage, as the config nests them: "
    "`pipeline.overrides.rlvr.loss.kl_weight=0.0` (every stage of that name)",
    "existing fields of the stages in `pipeline.stages` (not `stage`, `pipeline` or the "
    "paths a pipeline sets)",
    per="stage",
  ),
)


def validate_stage(config) -> None:
  """What `config.stage` needs; `opd` (and `rlvr` with teachers) needs `teachers`."""
  if config.stage == "generate":
    _validate_generate(config)
  elif config.stage == "sft":
    _validate_sft(config)
  elif not config.data.train_files:
    fail("data.train_files", config.data.train_files, "comma-separated .jsonl/.parquet paths")
  elif config.stage == "rlvr":
    _validate_rl(config)
    if config.teachers.keys():  # teachers are optional: without them, pure GRPO
      validate_teachers(config)
  else:
    validate_teachers(config)


def _validate_generate(config) -> None:
  g = config.generate
  check_choice(config, "generate.keep", KEEP)
  check_choice(config, "generate.param_dtype", DTYPES)
  for name in ("samples_per_prompt", "prompts_per_batch"):
    if not (isinstance(g[name], int) and g[name] > 0):
      fail(f"generate.{name}", g[name], "a positive integer")
  if not (g.prompt_files or config.data.train_files):
    fail("generate.prompt_files", g.prompt_files, "a prompt file (or data.train_files)")
  if g.keep == "verified" and not g.verifier and not config.episode.environment:
    fail("generate.keep", g.keep, "'all' when generate.verifier and episode.environment are empty")
  if g.model == "teachers":
    validate_teachers(config)
  if g.verifier:
    check_verifier("generate.verifier", g.verifier)


def _validate_sft(config) -> None:
  if not config.sft.train_files:
    fail("sft.train_files", config.sft.train_files, "a JSONL file of prompt + completion")
  for name in ("max_len", "rows_per_step", "overlap_every", "overlap_rows"):
    if not (isinstance(config.sft[name], int) and config.sft[name] > 0):
      fail(f"sft.{name}", config.sft[name], "a positive integer")
  if not 0.0 <= config.sft.until_overlap <= 1.0:
    fail("sft.until_overlap", config.sft.until_overlap, "0 (off) or an overlap in (0, 1]")
  if not 0.0 <= config.sft.replay_share < 1.0:
    fail("sft.replay_share", config.sft.replay_share, "a number in [0, 1)")
  if config.sft.until_overlap:
    if not (config.data.eval_files or config.data.train_files):
      fail("data.train_files", "", "prompts for the overlap probe (sft.until_overlap > 0)")
    validate_teachers(config)


def _validate_rl(config) -> None:
  r = config.rl
  if not (
    isinstance(r.group_size, int) and not isinstance(r.group_size, bool) and r.group_size > 1
  ):
    fail("rl.group_size", r.group_size, "an integer >= 2 (group advantages need two samples)")
  if not (isinstance(r.eval_prompts, int) and r.eval_prompts > 0):
    fail("rl.eval_prompts", r.eval_prompts, "a positive integer")
  for name in ("reward_weight", "kl_coef", "dense_weight"):
    check_positive(config, f"rl.{name}", allow_zero=True)
  if r.dense_weight > 0 and not config.teachers.keys():
    fail("rl.dense_weight", r.dense_weight, "0 when no teachers are configured")
  check_verifier("rl.verifier", r.verifier)
  for domain, name in r.verifiers.items():
    check_verifier(f"rl.verifiers.{domain}", name)
