"""Top-level fields (what runs, where it writes) and the device mesh; the run's config hash."""

from __future__ import annotations

import hashlib
import json

from jdistill import stages
from jdistill.config.fields import check_choice, check_positive, fail, field, one_of, section

STAGES = tuple(stages.STAGES)
RUN_MODES = ("auto", "resume", "new")

TOP = section(
  "",
  seed=field(0, "RNG seed: rollout keys, data order (the eval stream uses `seed + 1`)", "an int"),
  run_mode=field(
    "auto",
    "what to do when `output_dir` holds a run: `auto` resumes the same config and refuses "
    "another (naming the fields that differ); `resume` continues it with this config; `new` "
    "moves it (and an outside checkpoint directory) aside, renamed, and starts afresh. The "
    "CLI's `--resume` / `--new_run` set it",
    one_of(RUN_MODES),
  ),
  stage=field(
    "opd",
    "what `python -m jdistill train` runs: `opd` (on-policy distillation from `teachers`), "
    "`sft` (warmup SFT on `sft.train_files`), `generate` (teacher data: n samples per prompt, "
    "verified, written exactly once) or `rlvr` (GRPO with verifiable rewards, unified with "
    "sampled-token OPD when teachers are set)",
    one_of(STAGES),
  ),
  output_dir=field(
    "runs/opd",
    "`metrics.jsonl`, TensorBoard `tb/`, `learning_curves.png`; the `overlap` command writes "
    "to `<output_dir>/overlap` by default",
    "a path",
  ),
  num_devices=field(0, "devices used for the mesh", "`0` = all; `n > 0` = the first `n`"),
  peer_timeout_s=field(
    180,
    "multi-process runs: a process that has not been heard from for this long is lost, and "
    "every other process exits with one line naming it and the last committed step (exit "
    "status 75; rerun all processes to resume). Each process announces itself every "
    "`peer_timeout_s / 10` s (at most 1 s) from a thread, so a long step or compile is never "
    "taken for a loss",
    "a number > 0 (seconds)",
  ),
  stack_teachers=field(
    True, "teachers of one architecture are stacked and run as one `vmap`ped forward", "bool"
  ),
  tokenizer=field("", "HF tokenizer directory", 'a path; `""` = `student.path`'),
  export_dir=field(
    "",
    "write the final student there as an HF directory (`transformers` loads it)",
    'a path; `""` = no export',
  ),
)

MESH = section(
  "mesh",
  data=field(
    -1,
    "size of the `data` mesh axis (batch)",
    "a positive int, or `-1` = the remaining devices (at most one axis may be `-1`)",
  ),
  fsdp=field(
    1, "size of the `fsdp` mesh axis (batch and parameters' `embed` dimension)", "as `mesh.data`"
  ),
  expert=field(
    1,
    "size of the `expert` mesh axis (a mixture-of-experts student's and teachers' experts; "
    "the batch too)",
    "as `mesh.data`",
  ),
  tensor=field(1, "size of the `tensor` mesh axis (heads, MLP, vocabulary)", "as `mesh.data`"),
)


def validate(config) -> None:
  check_choice(config, "run_mode", RUN_MODES)
  check_choice(config, "stage", STAGES)
  check_positive(config, "num_devices", allow_zero=True)
  check_positive(config, "peer_timeout_s")
  rest = ""  # the axis of size -1 (the remaining devices), at most one
  for name in ("data", "fsdp", "expert", "tensor"):
    size = config.mesh.get(name, 1)  # a config's own `mesh` dict may leave an axis out
    if not isinstance(size, int) or isinstance(size, bool) or not (size > 0 or size == -1):
      fail(f"mesh.{name}", size, "a positive int, or -1 (the remaining devices)")
    if size == -1 and rest:
      fail(f"mesh.{name}", size, f"a positive int (mesh.{rest} is already -1; at most one is)")
    if size == -1:
      rest = name


# Fields that say where a run writes, how often it reports, and on which devices: a run that
# changes only these is the same run (it may resume; the mesh may change on resume).
RUN_BOOKKEEPING = (
  "run_mode",
  "output_dir",
  "export_dir",
  "checkpoint",
  "mesh",
  "num_devices",
  "peer_timeout_s",
  "train.log_every",
  "train.eval_every",
  "train.sample_rows",
  "train.sample_topk",
  "train.wandb",
  "train.wandb_project",
  "episode.env_workers",
  "eval",
)


def config_hash(config) -> str:
  """A short hash of everything in the config that changes what a run computes."""
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  for field_name in RUN_BOOKKEEPING:
    node, *rest = field_name.split(".")
    if rest:
      tree.get(node, {}).pop(rest[0], None)
    else:
      tree.pop(node, None)
  if not tree.get("episode", {}).get("environment"):
    # single-turn rollouts: the episode fields change nothing, and the runs from before the
    # section existed keep their hash
    tree.pop("episode", None)
  if not tree.get("student", {}).get("score_bias_update_speed", 1):
    tree["student"].pop("score_bias_update_speed")  # off: the runs from before it keep theirs
  blob = json.dumps(tree, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]
