"""The models: `student` and the `teachers.<name>` entries (`teacher_config`)."""

from __future__ import annotations

import ml_collections as mlc

from jdistill.config.fields import (
  check_choice,
  check_positive,
  check_scan_layers,
  fail,
  field,
  one_of,
  section,
)
from jdistill.config.training import LOSSES
from jdistill.models.config import REMAT_POLICIES

DTYPES = ("float32", "bfloat16")
PLACEMENTS = ("resident", "streamed")
# how a dense loss across tokenizers reads the teacher
DENSE_MATCHES = ("token", "prefix", "marginal")

STUDENT = section(
  "student",
  path=field(
    "",
    "the student to train: an HF directory (`config.json` + `*.safetensors`) or a jdistill "
    "checkpoint directory",
    "required, non-empty",
  ),
  param_dtype=field("float32", "storage dtype of the trained parameters", one_of(DTYPES)),
  dtype=field(
    "float32",
    "compute dtype of matmuls and activations (softmax, norms and logits are float32)",
    one_of(DTYPES),
  ),
  scan_layers=field(
    None,
    "stack the decoder blocks' parameters on a leading `layers` axis and run them under "
    "`jax.lax.scan`: one block is compiled instead of one per layer (see "
    "`bench/compile_time.py`; layers of several kinds, as Nemotron-H's pattern or DeepSeek-V3's "
    "dense first layers: one scan per run of a repeated unit). "
    "The sampler runs the layers unrolled either way. `None` = auto: scanned from 8 layers "
    "(not Gemma 3). A checkpoint directory "
    "resumes only with the layout it was written with (the error says which to set); loading "
    "a checkpoint as a model (student or teacher path) converts",
    "`None`, `True`, `False`",
    field_type=bool,
  ),
  remat_policy=field(
    "none",
    "what each decoder block keeps for the backward pass: `none` everything (no remat); "
    "`full` nothing (recompute the block, `jax.checkpoint_policies.nothing_saveable`); "
    "`dots_saveable` / `dots_with_no_batch_dims_saveable` the matmul outputs (the jax "
    "policies of those names); `save_qkv_proj` only the q/k/v projections",
    one_of(REMAT_POLICIES),
  ),
  score_bias_update_speed=field(
    0.0,
    "DeepSeek-V3's auxiliary-loss-free load balancing (its report, §2.1.2): after each train "
    "step every MoE layer's score-correction bias moves by `γ · sign(mean load − load_i)`, "
    "`load_i` the tokens routed to expert i in the step's batch (padding excluded); the "
    "optimizer never trains the bias. V3 used γ = 0.001. `0` = off: the bias stays as loaded",
    "a number ≥ 0; > 0 needs a `deepseek_v3` student and stage `opd`",
  ),
)

TEACHER = section(
  "teachers.<name>",
  path=field(
    "", "an HF directory or a jdistill (orbax) checkpoint directory", "required, non-empty"
  ),
  domains=field(
    "",
    "comma-separated domains this teacher owns; prompts are routed by their `domain`",
    "required; a domain belongs to one teacher only",
  ),
  loss=field(
    "reverse_kl", "this teacher's loss ([design.md](design.md#the-losses))", one_of(LOSSES)
  ),
  weight=field(1.0, "weight `w_i` of this teacher's loss in the sum (DeepSeek V4)", "a number ≥ 0"),
  param_dtype=field("bfloat16", "storage and compute dtype of the frozen teacher", one_of(DTYPES)),
  placement=field(
    "resident",
    "`resident`: params on the mesh beside the student. `streamed`: params in pinned host "
    "memory, moved onto the mesh inside the teacher's own forward before each step, one "
    "teacher at a time; only its hidden states `[rows, L-1, d_model]` and its unembedding "
    "stay for the loss step ([design.md](design.md#streamed-teachers))",
    one_of(PLACEMENTS, " (stage `opd` only)"),
  ),
  hidden_dtype=field(
    "bfloat16",
    "dtype of the hidden states a streamed teacher, or one on its own `devices`, hands to the "
    "step; its compute dtype gives the same loss as resident",
    one_of(DTYPES),
  ),
  devices=field(
    0,
    "devices of the teacher's own mesh: `0` = on the training mesh (`placement`); `n > 0` = n "
    "of the run's devices, carved off after `rollout.devices` (the run's devices in order: "
    "training, then the teachers in name order, then the sampler's last `rollout.devices`), "
    "form a mesh `{fsdp: n}` (rows and params split over them) where the teacher's params "
    "stay and its forward runs; only its last hidden states `[rows, L-1, d_model]` in "
    "`hidden_dtype` cross to the training mesh, where its unembedding rebuilds the logits "
    "([design.md](design.md#teachers-on-their-own-devices))",
    "an int ≥ 0 dividing `data.slots_per_teacher`; with `rollout.devices`, leaves ≥ 1 "
    "training device; stage `opd`, `placement = resident`, no `tokenizer`; one process only",
  ),
  scan_layers=field(
    None,
    "run the teacher's layers under scan (as `student.scan_layers`)",
    "`None`, `True`, `False`",
    field_type=bool,
  ),
  tokenizer=field(
    None,
    "the teacher's own HF tokenizer directory when it is not the student's: the student's "
    "rollouts are re-tokenised for it and scored per aligned span "
    "([design.md](design.md#sampled-token-across-tokenizers)): `sampled_token` per span, "
    "`reverse_kl` dense on the matched vocabulary where a span is one equal token per side "
    "([design.md](design.md#dense-across-tokenizers)); set, even to the student's, it takes "
    "that path",
    "`None` (the student's) or a path; with a path: `loss` = `sampled_token` or "
    "`reverse_kl`, `placement = resident`, stage `opd`, no `episode.environment`",
    field_type=str,
  ),
  dense_match=field(
    "token",
    "with `tokenizer` and `loss = reverse_kl`: how the teacher's distribution is read on the "
    "student's ids at a single span: `token`, its probability of the token with the same "
    "string (the rest in a tail bucket); `prefix`, its mass on the tokens whose text begins "
    "with the student token's (a character-level student: its next-character distribution; "
    "a `[rows, L, V_student]` scorer output); `marginal`, at *every* student position, the "
    "teacher's distribution of what it spells next from the partial token it is inside "
    "(a `[rows·L, V_teacher]` table of partials per batch) "
    "([design.md](design.md#dense-across-tokenizers))",
    one_of(DENSE_MATCHES),
  ),
  length_ratio=field(
    1.5,
    "with `tokenizer`: the teacher's sequence width is `ceil(length_ratio · L)` for the "
    "student's width `L` (static, so nothing recompiles); spans whose teacher tokens do not "
    "fit get no loss (`dropped_tokens` in its metrics)",
    "a number ≥ 1",
  ),
)


def teacher_config(
  path: str = "", domains: str = "", loss: str | None = None, weight: float | None = None, **fields
) -> mlc.ConfigDict:
  """One `config.teachers.<name>` entry: the declared defaults, with these fields set (`loss`
  and `weight` may also come third and fourth, as they always could)."""
  fields.update({k: v for k, v in (("loss", loss), ("weight", weight)) if v is not None})
  if fields.get("scan_layers", False) is None:
    del fields["scan_layers"]  # the declared typed None, overridable on the command line
  return TEACHER.config(path=path, domains=domains, **fields)


def teacher_names(config) -> list[str]:
  return sorted(config.teachers.keys())


def teacher_domains(config) -> dict[str, list[str]]:
  return {
    name: [d.strip() for d in str(config.teachers[name].domains).split(",") if d.strip()]
    for name in teacher_names(config)
  }


def validate_student(config) -> None:
  check_choice(config, "student.param_dtype", DTYPES)
  check_choice(config, "student.dtype", DTYPES)
  check_choice(config, "student.remat_policy", REMAT_POLICIES)
  check_scan_layers(config, "student.scan_layers")
  check_positive(config, "student.score_bias_update_speed", allow_zero=True)
  if config.student.score_bias_update_speed and config.stage != "opd":
    fail(
      "student.score_bias_update_speed",
      config.student.score_bias_update_speed,
      f"0 in stage {config.stage!r} (the load rule runs in the OPD step)",
    )
  if config.student.score_bias_update_speed and config.optimizer.get("grad_accum", 1) > 1:
    fail(
      "student.score_bias_update_speed",
      config.student.score_bias_update_speed,
      f"0 with optimizer.grad_accum={config.optimizer.grad_accum} (the bias would move on every "
      "micro-batch's loads, not once per update on the global batch's)",
    )
  if not config.student.path:
    fail("student.path", config.student.path, "a Hugging Face directory")


def validate_teachers(config) -> None:
  """Each `config.teachers.<name>`: complete, valid, owning domains no other teacher owns."""
  if not config.teachers.keys():
    fail("teachers", "{}", "at least one teacher: --config.teachers.<name>.path=...")
  owner: dict[str, str] = {}
  for name, domains in teacher_domains(config).items():
    t = config.teachers[name]
    keys = ("path", "domains", "loss", "weight", "param_dtype", "scan_layers")
    for key in keys:
      if key not in t:
        fail(f"teachers.{name}", dict(t), f"fields {', '.join(keys)}")
    check_scan_layers(config, f"teachers.{name}.scan_layers")
    if not t.path:
      fail(f"teachers.{name}.path", t.path, "a Hugging Face or orbax directory")
    if t.loss not in LOSSES:
      fail(f"teachers.{name}.loss", t.loss, list(LOSSES))
    if t.param_dtype not in DTYPES:
      fail(f"teachers.{name}.param_dtype", t.param_dtype, list(DTYPES))
    if t.get("placement", "resident") not in PLACEMENTS:
      fail(f"teachers.{name}.placement", t.placement, list(PLACEMENTS))
    if t.get("dense_match", "token") not in DENSE_MATCHES:
      fail(f"teachers.{name}.dense_match", t.dense_match, list(DENSE_MATCHES))
    if t.get("hidden_dtype", "bfloat16") not in DTYPES:
      fail(f"teachers.{name}.hidden_dtype", t.hidden_dtype, list(DTYPES))
    if t.get("placement") == "streamed" and config.stage != "opd":
      fail(f"teachers.{name}.placement", t.placement, f"'resident' in stage {config.stage!r}")
    if not isinstance(t.weight, (int, float)) or t.weight < 0:
      fail(f"teachers.{name}.weight", t.weight, "a non-negative number")
    if not domains:
      fail(f"teachers.{name}.domains", t.domains, "comma-separated domain names")
    for d in domains:
      if d in owner:
        fail(
          f"teachers.{name}.domains",
          t.domains,
          f"domains not owned by another teacher ({d!r} already belongs to {owner[d]!r})",
        )
      owner[d] = name
    if t.get("devices", 0):
      _validate_own_devices(config, name)
    if t.get("tokenizer"):
      _validate_cross_tokenizer(config, name)
  _validate_device_count(config)
  weights = {name: config.teachers[name].weight for name in config.teachers.keys()}
  if not any(w > 0 for w in weights.values()):
    fail("teachers.<name>.weight", weights, "at least one teacher with weight > 0")


def _validate_cross_tokenizer(config, name: str) -> None:
  """A teacher with its own `tokenizer`: only what the span path supports (sampled-token or
  the dense reverse KL, resident, single-turn OPD)."""
  t, where = config.teachers[name], f"teachers.{name}.tokenizer"
  need = "a teacher with another tokenizer"
  if t.loss not in ("sampled_token", "reverse_kl"):
    fail(
      where, t.tokenizer,
      f"None with loss {t.loss!r}: {need} needs loss = sampled_token or reverse_kl",
    )  # fmt: skip
  if t.get("placement", "resident") != "resident":
    fail(where, t.tokenizer, f"None with placement {t.placement!r}: {need} is resident")
  if config.stage != "opd":
    fail(where, t.tokenizer, f"None in stage {config.stage!r}: {need} is for stage opd")
  if config.get("episode") and config.episode.get("environment"):
    fail(where, t.tokenizer, f"None with episode.environment: {need} scores single turns")
  if t.get("dense_match", "token") != "token" and t.loss != "reverse_kl":
    fail(f"teachers.{name}.dense_match", t.dense_match, "'token' unless loss = reverse_kl")
  if not isinstance(t.get("length_ratio", 1.5), (int, float)) or t.length_ratio < 1:
    fail(f"teachers.{name}.length_ratio", t.length_ratio, "a number ≥ 1")


def _validate_own_devices(config, name: str) -> None:
  """A teacher on its own `devices`: a resident, same-tokenizer OPD teacher whose rows split
  evenly over them."""
  t, where = config.teachers[name], f"teachers.{name}.devices"
  n = t.devices
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    fail(where, n, "an integer >= 0")
  if not n:
    return
  if config.stage != "opd":
    fail(where, n, f"0 in stage {config.stage!r} (own devices are for stage opd)")
  if t.get("placement", "resident") != "resident":
    fail(where, n, f"0 with placement {t.placement!r} (a teacher on its own devices is resident)")
  if t.get("tokenizer"):
    fail(where, n, "0 with a teacher tokenizer (own devices need the student's tokenizer)")
  slots = config.data.slots_per_teacher
  if slots % n:
    fail(where, n, f"a divisor of data.slots_per_teacher={slots} (its rows split over them)")


def _validate_device_count(config) -> None:
  """The teachers' own devices and the sampler's leave the training mesh at least one."""
  own = {name: config.teachers[name].get("devices", 0) for name in teacher_names(config)}
  taken = sum(own.values()) + config.rollout.devices
  if config.num_devices and any(own.values()) and taken >= config.num_devices:
    fail(
      "teachers.<name>.devices",
      {k: v for k, v in own.items() if v},
      f"a total that, with rollout.devices={config.rollout.devices}, is fewer than "
      f"num_devices={config.num_devices} (training keeps at least one device)",
    )
