"""A teacher of another tokenizer in the OPD stage: the span path equals today's sampled-token
path when the tokenizers agree, and a student learns from a teacher of another tokenizer."""

import dataclasses

import jax
import numpy as np

from jdistill.stages import opd as train
from jdistill.step import opd as ts
from jdistill.testing.toy import short_run_config


def test_same_tokenizer_through_the_span_path_gives_todays_loss_and_gradients(
  small_world, tmp_path
):
  """`teachers.code.tokenizer` = the student's own sends it through the span path (host
  alignment, its own forward, span sums): one span per token, so on the same rollouts the
  objective and its gradients are today's sampled-token path's."""
  c = short_run_config(small_world, tmp_path, steps=1, eval_every=0)
  c.num_devices = 1
  c.teachers.code.tokenizer = small_world["tokenizer"]
  trainer = train.OPDTrainer(c)
  t = trainer.teachers
  (cross,) = t.cross
  batch = trainer.rollouts(next(trainer.data_iter), jax.random.key(0))
  assert "teacher_layouts" in batch
  cache = trainer.teacher_cache(batch)  # takes the layouts out of the batch
  assert set(cache) == {cross.index} and "teacher_layouts" not in batch
  # today's path: the same teacher resident in its own group, a plain sampled-token spec
  today = dict(
    teacher_graphdefs=(*t.graphdefs, cross.graphdef),
    teacher_states=(*t.states, cross.state),
    specs=tuple(dataclasses.replace(s, spans=False) for s in t.specs),
    groups=(*t.groups, (cross.index,)),
    teacher_cache={},
  )
  spans = dict(
    teacher_graphdefs=t.graphdefs,
    teacher_states=t.states,
    specs=t.specs,
    groups=t.groups,
    teacher_cache=cache,
  )
  results = {}
  for name, kw in (("today", today), ("spans", spans)):

    def objective(params, kw=kw):
      return ts.distill_objective(
        params, trainer.graphdef, batch=batch, diagnostics=False,
        loss_window=c.sampling.max_new_tokens, **kw,
      )  # fmt: skip

    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(trainer.params)
    results[name] = (float(loss), float(metrics["code"]["loss"]), jax.device_get(grads))
  (loss0, code0, g0), (loss1, code1, g1) = results["today"], results["spans"]
  assert code0 != 0.0
  np.testing.assert_allclose(code1, code0, rtol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)
