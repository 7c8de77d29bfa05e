"""Prompts and rollouts: data, sampling, rollout (the sampler's own devices and weights), episode
(multi-turn rollouts with an environment)."""

from __future__ import annotations

from jdistill.config.fields import (
  check_choice,
  check_integer,
  check_positive,
  fail,
  field,
  one_of,
  section,
)

OVERLONG = ("truncate_left", "drop", "error")
ON_ERROR = ("raise", "skip")
ROLLOUT_PARAM_DTYPES = ("", "bfloat16")  # `jdistill.sampling.rollout_params`

DATA = section(
  "data",
  train_files=field("", "comma-separated prompt files", "required; `.jsonl` / `.parquet` paths"),
  eval_files=field(
    "",
    "held-out prompts for the eval reverse KL and the `overlap` command",
    'paths; `""` = a far-away batch of the training stream (eval) or `train_files` (`overlap`)',
  ),
  prompt_field=field("prompt", "record field holding a text prompt", "a field name"),
  messages_field=field(
    "messages", 'record field holding a chat (`[{"role", "content"}, ...]`)', "a field name"
  ),
  domain_field=field(
    "domain", "record field holding the domain (routes the prompt to a teacher)", "a field name"
  ),
  use_chat_template=field(
    True,
    "render prompts with the tokenizer's chat template (required for `messages` records)",
    "bool",
  ),
  max_prompt_len=field(
    64,
    "longest prompt in tokens; longer ones follow `data.overlong`",
    "a positive int ≤ the largest `sampling.prompt_buckets` entry",
  ),
  overlong=field(
    "truncate_left",
    "a prompt over `max_prompt_len`: keep its *last* tokens, skip it (its slot takes the next "
    "prompt of that teacher), or stop with the length",
    one_of(OVERLONG),
  ),
  on_error=field(
    "raise", "a malformed line: stop naming `file:line`, or skip it and count it", one_of(ON_ERROR)
  ),
  slots_per_teacher=field(
    4,
    "rows per teacher per step (static shapes)",
    "a positive int; teachers × slots must divide over the data-parallel shards "
    "(`data × fsdp`), and slots over the processes",
  ),
  check_prompts=field(
    -1,
    "prompts per teacher tokenised and checked under `data.overlong` before anything "
    "compiles (errors name `file:line`; counts of truncated, dropped and skipped prompts are "
    "printed at start)",
    "`-1` (all) or a positive int",
  ),
)

SAMPLING = section(
  "sampling",
  max_new_tokens=field(
    32, "tokens generated per rollout (at most; rows stop at a stop token)", "a positive int"
  ),
  temperature=field(
    1.0,
    "sampler temperature (≠ 1 makes the sampled-token estimator off-policy; no `q/π` weight "
    "is applied yet)",
    "a float ≥ 0; `0` = greedy",
  ),
  top_k=field(0, "sample from the k most likely tokens", "an int ≥ 0; `0` = off"),
  top_p=field(1.0, "nucleus sampling, applied after `top_k`", "a float in (0, 1]; `1.0` = off"),
  prompt_buckets=field(
    (16, 32, 64, 128, 256, 512, 1024, 2048),
    "padded prompt lengths the sampler compiles for (new prompt lengths reuse compiled code)",
    "a non-empty tuple of positive ints",
  ),
  stop_at_eos=field(
    True,
    "a rollout stops at the tokenizer's EOS or `<|im_end|>` (the stop token is kept)",
    "bool",
  ),
  continuous_slots=field(
    0,
    "OPD rollouts with continuous batching: each teacher's `data.slots_per_teacher` prompts "
    "of a step are decoded by this many slots, a finished row's slot taking the teacher's "
    "next prompt inside the compiled loop (`Sampler.generate_continuous`); draws follow the "
    "per-prompt key schedule, so rollouts differ from `0` for the same seed; one process only",
    "an int in [0, `data.slots_per_teacher`]; `0` = the static loop",
  ),
)

ROLLOUT = section(
  "rollout",
  devices=field(
    0,
    "devices of the sampler's own mesh: `0` = the sampler shares the training mesh (step t's "
    "batch always from the params after update t); `n > 0` = the last `n` of the run's "
    "devices form a data-parallel sampler mesh, `mesh` applies to the first N − n, and the "
    "params are copied to the sampler after each update",
    "an int ≥ 0, fewer than the run's devices (`num_devices`, else all), leaving a count that "
    "fits `mesh`; one process only",
  ),
  staleness=field(
    1,
    "k, with `rollout.devices > 0`: step t's batch is sampled from the params after update "
    "max(t − k, s) (s: the step the session started or resumed at), so the sampler works on "
    "the next k batches while the trainer runs; `0` = today's loop on two meshes. Logged per "
    "step as `rollout_staleness`. Ignored when `rollout.devices = 0`",
    "an int ≥ 0",
  ),
  param_dtype=field(
    "",
    "the weights the training rollouts (stages `opd`, `rlvr`) sample from: `''` = the "
    "student's params as they are; `bfloat16` = a bf16 copy cast once per step "
    "(`jdistill.sampling.rollout_params`), the train step's f32 log-probs against the "
    "sampler's bf16 ones carried by the importance ratio of the sampled estimators; the "
    "mismatch is logged per step (`abs_log_ratio_mean` / `_max`, `icepop_masked`). "
    "Evaluation and `generate` sample from the params as they are",
    "`''` (the default: off until bf16 measures faster, docs/design.md) or `bfloat16`",
  ),
)

EPISODE = section(
  "episode",
  environment=field(
    "",
    "multi-turn rollouts (stages `opd`, `rlvr`, `generate`): the environment that answers each "
    "turn (user code, `jdistill/sampling/environment.py`); its observations are context, "
    "never a target. "
    "`sampling.max_new_tokens` is then the per-turn limit",
    "`''` (single-turn rollouts) or `module:Class` / `module:function`",
  ),
  max_turns=field(4, "student turns per episode", "a positive int"),
  max_total_tokens=field(
    256,
    "tokens after the prompt per episode, the student's and the environment's together",
    "a positive int",
  ),
  stop_strings=field(
    (),
    "a student turn also ends once its text contains one of these (e.g. the close of a tool call)",
    "a tuple of non-empty strings",
  ),
  wave_tokens=field(
    0,
    "the most tokens a row decodes before the host steps the environments of finished turns",
    "an int ≥ 0; `0` = `sampling.max_new_tokens`",
  ),
  slots=field(0, "episodes in flight at once", "an int ≥ 0; `0` = every row of the step's batch"),
  env_workers=field(
    1,
    "environments stepped at once on host threads (a wave waits for its slowest tool call, "
    "not for the sum of them); the answers are applied in row order, so episodes do not "
    "depend on it; the environment must allow `step` on different episodes at once",
    "a positive int; `1` = one after another",
  ),
)


def validate(config) -> None:
  check_choice(config, "data.overlong", OVERLONG)
  check_choice(config, "data.on_error", ON_ERROR)
  if config.data.check_prompts != -1:
    check_positive(config, "data.check_prompts")
  for name in ("data.max_prompt_len", "data.slots_per_teacher", "sampling.max_new_tokens"):
    check_positive(config, name)
    check_integer(config, name)
  for name in ("sampling.temperature", "sampling.top_k"):
    check_positive(config, name, allow_zero=True)
  buckets = tuple(config.sampling.prompt_buckets)
  if not buckets or not all(
    isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets
  ):
    fail("sampling.prompt_buckets", buckets, "a non-empty tuple of positive ints")
  if config.data.max_prompt_len > max(config.sampling.prompt_buckets):
    fail(
      "data.max_prompt_len",
      config.data.max_prompt_len,
      f"at most the largest sampling.prompt_buckets entry ({max(config.sampling.prompt_buckets)})",
    )
  if not 0.0 < config.sampling.top_p <= 1.0:
    fail("sampling.top_p", config.sampling.top_p, "a float in (0, 1]")
  slots = config.sampling.continuous_slots
  if (
    not isinstance(slots, int)
    or isinstance(slots, bool)
    or not 0 <= slots <= config.data.slots_per_teacher
  ):
    fail(
      "sampling.continuous_slots",
      slots,
      f"an int in [0, data.slots_per_teacher={config.data.slots_per_teacher}] (0 = off)",
    )
  _validate_rollout(config)
  _validate_episode(config)


def _validate_episode(config) -> None:
  e = config.episode
  spec = e.environment
  if not isinstance(spec, str) or (spec and (spec.count(":") != 1 or not all(spec.split(":")))):
    fail("episode.environment", spec, "'' or 'module:Class' / 'module:function'")
  for name in ("max_turns", "max_total_tokens", "env_workers"):
    check_positive(config, f"episode.{name}")
    check_integer(config, f"episode.{name}")
  for name in ("wave_tokens", "slots"):
    check_positive(config, f"episode.{name}", allow_zero=True)
    check_integer(config, f"episode.{name}")
  if not all(isinstance(x, str) and x for x in e.stop_strings):
    fail("episode.stop_strings", e.stop_strings, "a tuple of non-empty strings")
  if not spec:
    return
  if config.stage not in ("opd", "rlvr", "generate"):
    fail(
      "episode.environment",
      spec,
      f"'' with stage={config.stage!r} (multi-turn rollouts are built for stages 'opd', "
      "'rlvr' and 'generate' only)",
    )
  longest = config.data.max_prompt_len + e.max_total_tokens
  if max(config.sampling.prompt_buckets) < longest:
    fail(
      "sampling.prompt_buckets",
      tuple(config.sampling.prompt_buckets),
      f"a bucket >= data.max_prompt_len + episode.max_total_tokens = {longest} (an episode's "
      "whole context is a prompt of its next wave)",
    )
  if config.stage == "opd" and config.eval.verifier:
    fail(
      "eval.verifier",
      config.eval.verifier,
      "'' with episode.environment set (the environment scores episodes: `episodes.reward`)",
    )
  if config.sampling.continuous_slots:
    fail(
      "sampling.continuous_slots",
      config.sampling.continuous_slots,
      "0 with episode.environment set (episodes refill their own slots)",
    )


def _validate_rollout(config) -> None:
  check_choice(config, "rollout.param_dtype", ROLLOUT_PARAM_DTYPES)
  for name in ("devices", "staleness"):
    value = config.rollout[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      fail(f"rollout.{name}", value, "an integer >= 0")
  if config.num_devices and config.rollout.devices >= config.num_devices:
    fail(
      "rollout.devices",
      config.rollout.devices,
      f"0, or fewer than num_devices={config.num_devices} (training keeps at least one device)",
    )
