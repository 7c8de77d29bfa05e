"""Sampled rollouts, token by token, recorded on the trainer's logging steps → `samples.jsonl`.

On a logging step the OPD trainer hands `SampleRecorder.record` the step's batch and the student
params that are about to be updated (the train step itself is unchanged). For the first
`train.sample_rows` rows of each teacher, one small jitted function (`token_table`) runs the
student and that teacher on those rows and returns, per target position:

  teacher_logp, student_logp   log p_teacher(x_t), log q_student(x_t) at temperature 1
  outside_nucleus              1 where the teacher puts x_t outside its top-p nucleus
                               (`config.overlap.top_p`; the `in_teacher_top_p` metric's notion)
  icepop_masked, clipped       the sampled estimators' IcePop mask and PPO clip (0 for the others)
  top_ids, top_logp            the teacher's `train.sample_topk` most likely tokens `[k]`

The host decodes the completion's tokens and appends one JSON line per row to
`<output_dir>/samples.jsonl`:

  {"step": 5, "teacher": "math", "row": 0, "prompt": "...",
   "tokens": [{"text": "4", "id": 17, "teacher_logp": -0.3, "student_logp": -1.2,
               "outside_nucleus": 0, "icepop_masked": 0, "clipped": 0, "environment": 0,
               "top": [["4", -0.3], ["5", -2.1], ...]}, ...]}

`environment` is 1 on a multi-turn episode's environment tokens (`model_mask` 0): context, no
target of the loss. Its cost is one student and one teacher forward on a few rows per
logging step (measured in docs/performance.md).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import losses
from jdistill.step.common import shifted_inputs, teacher_hidden

SAMPLES = "samples.jsonl"


def token_table(
  student_graphdef,
  params,
  teacher_graphdef,
  teacher_state,
  batch: dict,
  rows,
  *,
  settings: losses.LossSettings,
  top_p: float,
  topk: int,
) -> dict:
  """Per-token records of `rows` (int `[n]`) of `batch` (the step's batch layout,
  `jdistill.step.common`) under the student `params` and one teacher → arrays `[n, L-1]`
  (position t scores token t + 1), `top_ids` / `top_logp` `[n, L-1, k]`, and the
  `completion` / `environment` masks `[n, L-1]` of the targets.

  `rows` is traced, so the teachers of one architecture and loss share one compile."""
  batch = {k: jnp.take(v, rows, axis=0) for k, v in batch.items()}
  x = shifted_inputs(batch)
  every = tuple(range(rows.shape[0]))
  s_hidden, s_unembed = teacher_hidden(student_graphdef, params, x, every)  # any model's forward
  t_hidden, t_unembed = teacher_hidden(teacher_graphdef, teacher_state, x, every)
  s_logp = jax.nn.log_softmax(losses.project_logits(s_hidden, s_unembed), axis=-1)
  t_logp = jax.nn.log_softmax(losses.project_logits(t_hidden, t_unembed), axis=-1)
  targets = x["targets"][..., None]
  student = jnp.take_along_axis(s_logp, targets, axis=-1)[..., 0]
  teacher = jnp.take_along_axis(t_logp, targets, axis=-1)[..., 0]
  # `losses.support_diagnostics`' `in_teacher_top_p`, without its other (costly) metrics: the
  # teacher's mass on tokens strictly more likely than the target reaches top_p
  above = jnp.where(t_logp > teacher[..., None], jnp.exp(t_logp), 0.0)
  outside = (jnp.sum(above, axis=-1) >= top_p).astype(jnp.float32)
  behaviour = x["behaviour_logp"]
  zeros = jnp.zeros_like(student)
  icepop, clipped = zeros, zeros
  if settings.loss == "sampled_token":
    baseline = None
    if settings.kl_baseline:  # the exact per-position KL(q ‖ p_T)
      baseline = jnp.sum(jnp.exp(s_logp) * (s_logp - t_logp), axis=-1)
    _, aux = losses.sampled_token_terms(
      student, teacher, behaviour, None, settings.clip_eps, settings.icepop_c,
      settings.kl_weight, baseline,
    )  # fmt: skip
    icepop, clipped = aux["icepop_masked"], aux["clipped"]
  elif settings.loss in losses.SAMPLED_LOSSES:  # overlap_aware: IcePop on its sampled term
    icepop = losses.icepop_mask(jnp.exp(student - behaviour), settings.icepop_c)
  top_logp, top_ids = jax.lax.top_k(t_logp, topk)
  completion = batch["completion_mask"][:, 1:].astype(jnp.float32)
  model = batch["model_mask"][:, 1:].astype(jnp.float32) if "model_mask" in batch else 1.0
  target = x["mask"]  # the loss's targets: an environment token is never masked or clipped
  return dict(
    teacher_logp=teacher,
    student_logp=student,
    outside_nucleus=outside,
    icepop_masked=icepop * target,
    clipped=clipped * target,
    top_ids=top_ids,
    top_logp=top_logp,
    completion=completion,
    environment=completion * (1.0 - model),
    tokens=batch["tokens"],
    lengths=batch["lengths"],
  )


def rows_to_records(table: dict, tokenizer, *, step: int, teacher: str) -> list[dict]:
  """`token_table`'s host arrays → one JSON-ready record per row (only the completion's
  tokens; the prompt as text)."""
  records = []
  decode = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))
  for r in range(table["tokens"].shape[0]):
    tokens, length = table["tokens"][r], int(table["lengths"][r])
    positions = [t for t in range(length - 1) if table["completion"][r, t] > 0]
    first = positions[0] + 1 if positions else length
    out = []
    for t in positions:
      token = int(tokens[t + 1])
      out.append(
        {
          "text": decode(token),
          "id": token,
          **{k: round(float(table[k][r, t]), 4) for k in ("teacher_logp", "student_logp")},
          **{
            k: int(table[k][r, t])
            for k in ("outside_nucleus", "icepop_masked", "clipped", "environment")
          },
          "top": [
            [decode(int(i)), round(float(lp), 4)]
            for i, lp in zip(table["top_ids"][r, t], table["top_logp"][r, t])
          ],
        }
      )
    prompt = tokenizer.decode([int(i) for i in tokens[:first]], skip_special_tokens=False)
    records.append({"step": step, "teacher": teacher, "row": r, "prompt": prompt, "tokens": out})
  return records


def read_samples(out_dir: str) -> list[dict]:
  """The records of `<out_dir>/samples.jsonl` (none if it does not exist)."""
  path = os.path.join(out_dir, SAMPLES)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class SampleRecorder:
  """Records `rows` rows per teacher of a logging step's batch into `<out_dir>/samples.jsonl`."""

  def __init__(
    self, *, out_dir, tokenizer, student_graphdef, teachers, rows, topk, top_p, vocab, mesh
  ):
    """`teachers`: the trainer's `build.Teachers` (each teacher's graphdef and state through
    `member`, its rows and loss settings through `specs`); `vocab`: the shared vocabulary size
    (bounds `topk`)."""
    self.path = os.path.join(out_dir, SAMPLES)
    self.tokenizer, self.teachers = tokenizer, teachers
    self.rows, self.topk, self.top_p = rows, min(topk, vocab), top_p
    self.student_graphdef = student_graphdef
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._table = jax.jit(
      token_table,
      static_argnames=("student_graphdef", "teacher_graphdef", "settings", "top_p", "topk"),
      out_shardings=replicated,
    )

  def truncate(self, step: int) -> None:
    """Drops the records after `step` (a resumed run records them again)."""
    records = read_samples(os.path.dirname(self.path))
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records):
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def record(self, step: int, params, batch: dict) -> list[dict]:
    """Scores and writes the sample rows of `batch` (the batch of `step`, sampled by the
    student whose `params` are given); returns the records written."""
    records = []
    for i, spec in enumerate(self.teachers.specs):
      if spec.spans:  # another tokenizer: the table scores the student's ids with the teacher
        continue
      graphdef, state = self.teachers.member(i)
      table = self._table(
        student_graphdef=self.student_graphdef,
        params=params,
        teacher_graphdef=graphdef,
        teacher_state=state,
        batch=batch,
        rows=np.asarray(spec.rows[: self.rows], np.int32),
        settings=spec.settings,
        top_p=self.top_p,
        topk=self.topk,
      )
      table = {k: np.asarray(v) for k, v in jax.device_get(table).items()}
      records += rows_to_records(table, self.tokenizer, step=step, teacher=spec.name)
    if jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records
