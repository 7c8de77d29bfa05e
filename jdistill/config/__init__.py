"""The OPD run config (`ml_collections.ConfigDict`): defaults and validation.

`configs/*.py` start from `base_config()` and override fields; the command line
overrides again (`--config.optimizer.lr=3e-6 --config.teachers.math.weight=2`).
`validate(config)` runs before anything is compiled; every error names the field
and the allowed values.

Teachers are `config.teachers.<name>` entries, run in sorted name order:
  path        HF directory (config.json + safetensors) or an orbax checkpoint dir
  domains     comma-separated domains this teacher owns (prompts are routed by domain)
  loss        one of LOSSES
  weight      weight of this teacher's loss in the sum (DeepSeek V4's w_i)
  param_dtype storage dtype (bfloat16 by default: teachers are frozen)
  placement   resident (on the mesh beside the student) | streamed (params in host memory,
              brought onto the mesh one teacher at a time; see jdistill/streaming.py)
  hidden_dtype dtype of a streamed teacher's cached hidden states (bfloat16 by default)
  scan_layers None (auto: from 8 layers), True or False: run the layers under scan
"""

from __future__ import annotations

import hashlib
import json
import math

import ml_collections as mlc

from jdistill import losses, stages
from jdistill.models.config import REMAT_POLICIES, SCAN_MIN_LAYERS

LOSSES = losses.registry.NAMES  # the one vocabulary of loss names (jdistill/losses/registry.py)
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("skip", "stop")
OVERLONG = ("truncate_left", "drop", "error")
ON_ERROR = ("raise", "skip")
STAGES = tuple(stages.STAGES)
KEEP = ("all", "verified")
PLACEMENTS = ("resident", "streamed")


def teacher_config(
  path: str = "",
  domains: str = "",
  loss: str = "reverse_kl",
  weight: float = 1.0,
  param_dtype: str = "bfloat16",
  placement: str = "resident",
  hidden_dtype: str = "bfloat16",
  scan_layers: bool | None = None,
) -> mlc.ConfigDict:
  return mlc.ConfigDict(
    dict(
      path=path,
      domains=domains,
      loss=loss,
      weight=weight,
      param_dtype=param_dtype,
      placement=placement,
      hidden_dtype=hidden_dtype,
      # a typed None: `--config.teachers.<name>.scan_layers=True` overrides it
      scan_layers=mlc.config_dict.placeholder(bool) if scan_layers is None else scan_layers,
    )
  )


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.run_mode = "auto"  # auto | resume | new (see jdistill/run_dir.py; --resume, --new_run)
  c.stage = "opd"  # opd | sft (warmup SFT) | generate (teacher data) | rlvr (GRPO, unified)
  c.output_dir = "runs/opd"
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.num_devices = 0  # 0: all devices; n: the first n (e.g. to compare against one device)

  c.student = mlc.ConfigDict(
    dict(
      path="",
      param_dtype="float32",
      dtype="float32",
      # None: auto (scanned from 8 layers) | True | False; a typed None, overridable
      scan_layers=mlc.config_dict.placeholder(bool),
      remat_policy="none",  # see REMAT_POLICIES
    )
  )
  c.teachers = mlc.ConfigDict()
  c.stack_teachers = True  # teachers of one architecture run as one vmapped forward
  c.tokenizer = ""  # HF tokenizer dir (default: the student's directory)

  c.data = mlc.ConfigDict(
    dict(
      train_files="",  # comma-separated .jsonl / .parquet files
      eval_files="",  # held-out prompts for the eval reverse KL
      prompt_field="prompt",
      messages_field="messages",
      domain_field="domain",
      use_chat_template=True,
      max_prompt_len=64,  # longer prompts: `overlong` rule
      overlong="truncate_left",  # keep the last max_prompt_len tokens | drop | error
      on_error="raise",  # malformed line: raise (file:line) | skip and count
      slots_per_teacher=4,  # rows per teacher per step (static shapes)
      check_prompts=-1,  # prompts per teacher tokenised and checked before compiling; -1: all
    )
  )

  c.sampling = mlc.ConfigDict(
    dict(
      max_new_tokens=32,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      prompt_buckets=(16, 32, 64, 128, 256, 512, 1024, 2048),
      stop_at_eos=True,
      continuous_slots=0,  # >0: OPD rollouts decode with this many refilling slots per teacher
    )
  )
  c.rollout = mlc.ConfigDict(
    dict(
      devices=0,  # 0: the sampler shares the training mesh; n: its own mesh of the last n
      staleness=1,  # k (devices > 0): the batch of step t uses the params after update t - k
    )
  )

  c.loss = mlc.ConfigDict(
    dict(
      chunk_size=0,  # positions per loss chunk along T; 0: chosen from the shapes
      temperature=1.0,
      normalize="token",
      beta=0.5,
      topk=64,
      topk_tail="bucket",
      topk_direction="reverse",
      clip_eps=0.0,  # >0: PPO clip of the ratio q/π against the sampler's sampling logprobs
      kl_weight=1.0,  # λ of sampled_token: advantage = λ·(−k1) + any reward advantage
      icepop_c=0.0,  # >1: sampled terms whose q/π leaves [1/c, c] get no gradient (IcePop)
      nonfinite="skip",  # NaN/Inf loss or grads: skip the update | stop
      overlap_criterion="teacher_topk",
      overlap_topk=8,
      overlap_floor_prob=1e-3,
    )
  )

  c.optimizer = mlc.ConfigDict(
    dict(
      lr=1e-5,
      warmup_steps=10,
      schedule="cosine",
      end_lr_ratio=0.1,
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      max_grad_norm=1.0,
      grad_accum=1,
    )
  )

  c.sft = mlc.ConfigDict(
    dict(
      train_files="",  # JSONL of {"prompt" or "messages", "completion"} (stage "sft")
      eval_files="",
      max_len=128,  # tokens per packed row
      rows_per_step=8,
      pack=True,  # several examples per row (segment ids keep them apart)
      until_overlap=0.0,  # > 0: overlap-triggered warmup (see jdistill/sft.py); 0: train.steps
      overlap_every=10,  # steps between overlap probes
      overlap_rows=16,  # probe prompts per domain
    )
  )
  c.generate = mlc.ConfigDict(
    dict(
      model="",  # HF or checkpoint dir (default: student.path); "teachers": each on its domains
      model_name="",  # recorded as "teacher" in each record (default: the directory's name)
      param_dtype="bfloat16",
      prompt_files="",  # default: data.train_files
      out_dir="runs/generated",
      samples_per_prompt=4,
      prompts_per_batch=8,
      verifier="",  # exact_match | numeric | boxed | regex:<p> | module:function
      keep="all",  # all | verified (rejection sampling: only completions scoring 1)
    )
  )
  c.rl = mlc.ConfigDict(
    dict(
      group_size=4,  # G samples per prompt; data.slots_per_teacher counts prompts
      verifier="exact_match",  # reward of every domain (see jdistill/verifiers.py) ...
      verifiers=mlc.ConfigDict(),  # ... unless rl.verifiers.<domain> names another
      normalize_std=True,  # GRPO: (r - mean) / std per group; False: Dr. GRPO (r - mean)
      reward_weight=1.0,  # weight of the group reward advantage (0: pure sampled-token OPD)
      kl_coef=0.0,  # > 0: k3 penalty towards the frozen reference (the stage's start model)
      dense_weight=0.0,  # > 0: plus a full-vocab reverse KL to each row's teacher
      eval_prompts=32,  # held-out prompts per domain for greedy accuracy (evaluate)
    )
  )
  c.eval = mlc.ConfigDict(
    dict(
      verifier="",  # set: evaluate() adds greedy accuracy of the eval prompts' answers
      pass_k=0,  # > 0: and pass@k (k samples at temperature 1)
    )
  )
  c.pipeline = mlc.ConfigDict(
    dict(
      stages=(),  # e.g. ("generate", "sft", "opd"): chained stages (jdistill/pipeline.py)
      steps=(),  # per stage: train.steps of that stage (0: train.steps); empty: all train.steps
    )
  )
  c.train = mlc.ConfigDict(dict(steps=100, log_every=1, eval_every=0))  # eval_every 0: off
  c.checkpoint = mlc.ConfigDict(
    dict(dir="", every=50, keep=3, async_save=True, resume=True, restore_step=-1)
  )
  c.export_dir = ""  # write the final student as an HF directory

  c.overlap = mlc.ConfigDict(
    dict(
      topks=(1, 8, 32),  # raw top-k coverage (detail: depends on the teacher's entropy)
      top_p=0.9,  # the teacher nucleus of in_teacher_top_p and nucleus_coverage
      floor_prob=1e-3,  # raw off-support rate (detail: depends on the vocabulary size)
      # alarms and readings use only the calibrated metrics (1 when student = teacher):
      min_overlap=0.5,  # alarm when overlap = 1 - TV falls below
      min_nucleus_coverage=0.5,  # alarm when nucleus coverage falls below
      on_support_overlap=0.8,  # "on-support" reading needs overlap >= this ...
      on_support_nucleus_coverage=0.9,  # ... and nucleus coverage >= this
    )
  )
  return c


def _fail(field: str, value, allowed) -> None:
  raise ValueError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def _check_choice(config, field: str, allowed) -> None:
  node = config
  for part in field.split("."):
    node = node[part]
  if node not in allowed:
    _fail(field, node, list(allowed))


def _check_scan_layers(config, field: str) -> None:
  node = config
  for part in field.split("."):
    node = node[part]
  if not (node is None or isinstance(node, bool)):
    _fail(field, node, f"None (auto: scanned from {SCAN_MIN_LAYERS} layers), True or False")


def _check_positive(config, field: str, allow_zero: bool = False) -> None:
  node = config
  for part in field.split("."):
    node = node[part]
  ok = (
    isinstance(node, (int, float))
    and not isinstance(node, bool)
    and (node >= 0 if allow_zero else node > 0)
  )
  if not ok:
    _fail(field, node, "a non-negative number" if allow_zero else "a positive number")


# Fields that say where a run writes, how often it reports, and on which devices: a run that
# changes only these is the same run (it may resume; the mesh may change on resume).
RUN_BOOKKEEPING = (
  "run_mode",
  "output_dir",
  "export_dir",
  "checkpoint",
  "mesh",
  "num_devices",
  "train.log_every",
  "train.eval_every",
  "eval",
)


def config_hash(config) -> str:
  """A short hash of everything in the config that changes what a run computes."""
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  for field in RUN_BOOKKEEPING:
    node, *rest = field.split(".")
    if rest:
      tree.get(node, {}).pop(rest[0], None)
    else:
      tree.pop(node, None)
  blob = json.dumps(tree, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def teacher_names(config) -> list[str]:
  return sorted(config.teachers.keys())


def teacher_domains(config) -> dict[str, list[str]]:
  return {
    name: [d.strip() for d in str(config.teachers[name].domains).split(",") if d.strip()]
    for name in teacher_names(config)
  }


def _check_finite(node, prefix: str = "") -> None:
  """Every float field anywhere in the config is finite (NaN/Inf would pass range checks
  written as comparisons and then silently skip every update)."""
  for key, value in node.items():
    field = f"{prefix}{key}"
    if isinstance(value, mlc.ConfigDict):
      _check_finite(value, field + ".")
    elif isinstance(value, float) and not math.isfinite(value):
      _fail(field, value, "a finite number")
    elif isinstance(value, (tuple, list)) and any(
      isinstance(v, float) and not math.isfinite(v) for v in value
    ):
      _fail(field, value, "finite numbers")


def validate(config) -> None:
  """Raises ValueError naming the first bad field and what it allows."""
  _check_finite(config)
  _check_choice(config, "data.overlong", OVERLONG)
  _check_choice(config, "run_mode", ("auto", "resume", "new"))
  _check_choice(config, "stage", STAGES)
  if config.eval.verifier:
    from jdistill.eval import verifiers

    try:
      verifiers.get(config.eval.verifier)
    except ValueError as e:
      _fail("eval.verifier", config.eval.verifier, str(e))
  if not (isinstance(config.eval.pass_k, int) and config.eval.pass_k >= 0):
    _fail("eval.pass_k", config.eval.pass_k, "an integer >= 0")
  _check_positive(config, "num_devices", allow_zero=True)
  for field in ("rollout.devices", "rollout.staleness"):
    value = config.rollout[field.split(".")[1]]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _fail(field, value, "an integer >= 0")
  if config.num_devices and config.rollout.devices >= config.num_devices:
    _fail(
      "rollout.devices",
      config.rollout.devices,
      f"0, or fewer than num_devices={config.num_devices} (training keeps at least one device)",
    )
  if config.data.check_prompts != -1:
    _check_positive(config, "data.check_prompts")
  _check_choice(config, "data.on_error", ON_ERROR)
  _check_choice(config, "loss.normalize", losses.NORMALIZE_MODES)
  _check_choice(config, "loss.topk_tail", losses.TOPK_TAILS)
  _check_choice(config, "loss.topk_direction", losses.KL_DIRECTIONS)
  _check_choice(config, "loss.nonfinite", NONFINITE)
  _check_choice(config, "loss.overlap_criterion", losses.OVERLAP_CRITERIA)
  _check_choice(config, "optimizer.schedule", SCHEDULES)
  _check_choice(config, "student.param_dtype", DTYPES)
  _check_choice(config, "student.dtype", DTYPES)
  _check_choice(config, "student.remat_policy", REMAT_POLICIES)
  _check_scan_layers(config, "student.scan_layers")
  for field in (
    "data.max_prompt_len",
    "data.slots_per_teacher",
    "sampling.max_new_tokens",
    "loss.temperature",
    "loss.topk",
    "optimizer.lr",
    "optimizer.grad_accum",
    "train.steps",
    "train.log_every",
    "checkpoint.keep",
    "checkpoint.every",
    "loss.overlap_topk",
  ):
    _check_positive(config, field)
  for field in (
    "sampling.temperature",
    "sampling.top_k",
    "loss.chunk_size",
    "optimizer.warmup_steps",
    "optimizer.weight_decay",
    "optimizer.max_grad_norm",
    "loss.clip_eps",
    "train.eval_every",
  ):
    _check_positive(config, field, allow_zero=True)
  if config.loss.icepop_c != 0 and not config.loss.icepop_c > 1:
    _fail("loss.icepop_c", config.loss.icepop_c, "0 (off) or a ratio bound > 1")
  for field in (
    "optimizer.grad_accum",
    "train.steps",
    "data.slots_per_teacher",
    "data.max_prompt_len",
    "sampling.max_new_tokens",
    "loss.chunk_size",
    "loss.topk",
  ):
    node = config
    for part in field.split("."):
      node = node[part]
    if not isinstance(node, int) or isinstance(node, bool):
      _fail(field, node, "an integer (in the range checked above)")
  topks = tuple(config.overlap.topks)
  if not topks or any(not isinstance(k, int) or k <= 0 for k in topks):
    _fail("overlap.topks", topks, "a non-empty tuple of positive integers")
  for field in ("overlap.floor_prob", "overlap.top_p", "loss.overlap_floor_prob"):
    node = config.overlap if field.startswith("overlap.") else config.loss
    value = node[field.split(".")[1]]
    if not 0.0 < value <= 1.0:
      _fail(field, value, "a probability in (0, 1]")
  for field in ("b1", "b2"):
    if not 0.0 <= config.optimizer[field] < 1.0:
      _fail(f"optimizer.{field}", config.optimizer[field], "a float in [0, 1)")
  if config.data.max_prompt_len > max(config.sampling.prompt_buckets):
    _fail(
      "data.max_prompt_len",
      config.data.max_prompt_len,
      f"at most the largest sampling.prompt_buckets entry ({max(config.sampling.prompt_buckets)})",
    )
  for field in (
    "min_overlap",
    "min_nucleus_coverage",
    "on_support_overlap",
    "on_support_nucleus_coverage",
  ):
    value = config.overlap[field]
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
      _fail(f"overlap.{field}", value, "a number in [0, 1]")
  if not 0.0 < config.sampling.top_p <= 1.0:
    _fail("sampling.top_p", config.sampling.top_p, "a float in (0, 1]")
  slots = config.sampling.continuous_slots
  if (
    not isinstance(slots, int)
    or isinstance(slots, bool)
    or not 0 <= slots <= config.data.slots_per_teacher
  ):
    _fail(
      "sampling.continuous_slots",
      slots,
      f"an int in [0, data.slots_per_teacher={config.data.slots_per_teacher}] (0 = off)",
    )
  if not 0.0 <= config.loss.beta <= 1.0:
    _fail("loss.beta", config.loss.beta, "a float in [0, 1]")
  if config.optimizer.warmup_steps > config.train.steps:
    _fail(
      "optimizer.warmup_steps",
      config.optimizer.warmup_steps,
      f"at most train.steps={config.train.steps}",
    )
  if not config.student.path:
    _fail("student.path", config.student.path, "a Hugging Face directory")
  if config.stage == "generate":
    g = config.generate
    _check_choice(config, "generate.keep", KEEP)
    _check_choice(config, "generate.param_dtype", DTYPES)
    for field in ("samples_per_prompt", "prompts_per_batch"):
      if not (isinstance(g[field], int) and g[field] > 0):
        _fail(f"generate.{field}", g[field], "a positive integer")
    if not (g.prompt_files or config.data.train_files):
      _fail("generate.prompt_files", g.prompt_files, "a prompt file (or data.train_files)")
    if g.keep == "verified" and not g.verifier:
      _fail("generate.keep", g.keep, "'all' when generate.verifier is empty")
    if g.model == "teachers":
      _validate_teachers(config)
    if g.verifier:
      from jdistill.eval import verifiers

      try:
        verifiers.get(g.verifier)
      except ValueError as e:
        _fail("generate.verifier", g.verifier, str(e))
    return
  if config.stage == "sft":
    if not config.sft.train_files:
      _fail("sft.train_files", config.sft.train_files, "a JSONL file of prompt + completion")
    for field in ("max_len", "rows_per_step", "overlap_every", "overlap_rows"):
      if not (isinstance(config.sft[field], int) and config.sft[field] > 0):
        _fail(f"sft.{field}", config.sft[field], "a positive integer")
    if not 0.0 <= config.sft.until_overlap <= 1.0:
      _fail("sft.until_overlap", config.sft.until_overlap, "0 (off) or an overlap in (0, 1]")
    if config.sft.until_overlap:
      if not (config.data.eval_files or config.data.train_files):
        _fail("data.train_files", "", "prompts for the overlap probe (sft.until_overlap > 0)")
      _validate_teachers(config)
    return
  if not config.data.train_files:
    _fail("data.train_files", config.data.train_files, "comma-separated .jsonl/.parquet paths")
  if config.stage == "rlvr":
    _validate_rl(config)
    if config.teachers.keys():  # teachers are optional: without them, pure GRPO
      _validate_teachers(config)
    return
  _validate_teachers(config)


def _validate_rl(config) -> None:
  r = config.rl
  if not (
    isinstance(r.group_size, int) and not isinstance(r.group_size, bool) and r.group_size > 1
  ):
    _fail("rl.group_size", r.group_size, "an integer >= 2 (group advantages need two samples)")
  if not (isinstance(r.eval_prompts, int) and r.eval_prompts > 0):
    _fail("rl.eval_prompts", r.eval_prompts, "a positive integer")
  for field in ("reward_weight", "kl_coef", "dense_weight"):
    _check_positive(config, f"rl.{field}", allow_zero=True)
  if r.dense_weight > 0 and not config.teachers.keys():
    _fail("rl.dense_weight", r.dense_weight, "0 when no teachers are configured")
  from jdistill.eval import verifiers

  for field, name in [("rl.verifier", r.verifier)] + [
    (f"rl.verifiers.{d}", v) for d, v in r.verifiers.items()
  ]:
    try:
      verifiers.get(name)
    except ValueError as e:
      _fail(field, name, str(e))


def _validate_teachers(config) -> None:
  """Each `config.teachers.<name>`: complete, valid, owning domains no other teacher owns."""
  if not config.teachers.keys():
    _fail("teachers", "{}", "at least one teacher: --config.teachers.<name>.path=...")
  owner: dict[str, str] = {}
  for name, domains in teacher_domains(config).items():
    t = config.teachers[name]
    keys = ("path", "domains", "loss", "weight", "param_dtype", "scan_layers")
    for key in keys:
      if key not in t:
        _fail(f"teachers.{name}", dict(t), f"fields {', '.join(keys)}")
    _check_scan_layers(config, f"teachers.{name}.scan_layers")
    if not t.path:
      _fail(f"teachers.{name}.path", t.path, "a Hugging Face or orbax directory")
    if t.loss not in LOSSES:
      _fail(f"teachers.{name}.loss", t.loss, list(LOSSES))
    if t.param_dtype not in DTYPES:
      _fail(f"teachers.{name}.param_dtype", t.param_dtype, list(DTYPES))
    if t.get("placement", "resident") not in PLACEMENTS:
      _fail(f"teachers.{name}.placement", t.placement, list(PLACEMENTS))
    if t.get("hidden_dtype", "bfloat16") not in DTYPES:
      _fail(f"teachers.{name}.hidden_dtype", t.hidden_dtype, list(DTYPES))
    if t.get("placement") == "streamed" and config.stage != "opd":
      _fail(f"teachers.{name}.placement", t.placement, f"'resident' in stage {config.stage!r}")
    if not isinstance(t.weight, (int, float)) or t.weight < 0:
      _fail(f"teachers.{name}.weight", t.weight, "a non-negative number")
    if not domains:
      _fail(f"teachers.{name}.domains", t.domains, "comma-separated domain names")
    for d in domains:
      if d in owner:
        _fail(
          f"teachers.{name}.domains",
          t.domains,
          f"domains not owned by another teacher ({d!r} already belongs to {owner[d]!r})",
        )
      owner[d] = name
  weights = {name: config.teachers[name].weight for name in config.teachers.keys()}
  if not any(w > 0 for w in weights.values()):
    _fail("teachers.<name>.weight", weights, "at least one teacher with weight > 0")
