"""Why a loss wins, measured: how far one step's gradient is from the exact gradient it claims.

The sampled-token estimators (and overlap_aware) claim the gradient of the full-vocabulary
reverse KL at every position of the student's rollouts: their expectation over the sampled
token equals it (tests/losses/test_estimators.py enumerates it). On the same rollouts the
full-vocabulary kernel computes that gradient exactly, so

  noise = ‖g_loss − g_exact‖ / ‖g_exact‖      (one batch: what one optimiser step sees)

is the estimator's relative error on that batch, with nothing else different: same params,
same rollouts, same teachers. A top-k loss claims the same objective; its distance is its
truncation bias, not noise. A full-vocabulary loss claims its own objective (distance 0).
`gradient_noise` averages over a few batches of a trainer's own rollouts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.step import opd as opd_step

# the losses whose gradient estimates the full-vocabulary reverse KL's (the others are exact)
CLAIMS_REVERSE_KL = ("sampled_token", "overlap_aware", "topk")


def claimed_specs(specs):
  """The teachers' specs with each loss replaced by the exact objective it claims."""
  out = []
  for spec in specs:
    s = spec.settings
    if s.loss in CLAIMS_REVERSE_KL:
      s = dataclasses.replace(s, loss="reverse_kl", clip_eps=None, kl_baseline=False)
    out.append(dataclasses.replace(spec, settings=s))
  return tuple(out)


def _flat(tree):
  return jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(tree)])


def gradient_noise(trainer, batches: int = 4, seed: int = 7, specs=None) -> dict:
  """On `batches` rollout batches of an OPD `trainer` (`jdistill.stages.opd.OPDTrainer`) at
  its current params → {"noise": mean relative error ‖g − g_exact‖/‖g_exact‖ over batches,
  "cosine": mean cosine of g and g_exact, "norm_ratio": mean ‖g‖/‖g_exact‖, "batches"}.
  `specs`: the teachers' specs to measure (default the trainer's own). The prompts are
  batches far down the training stream, read without moving the trainer's iterator."""
  c, t = trainer.config, trainer.teachers
  specs = t.specs if specs is None else tuple(specs)
  structure = dict(
    student_graphdef=trainer.graphdef,
    teacher_graphdefs=t.graphdefs,
    groups=t.groups,
    # as the trainer's step: an episode's window is its whole length after the prompt
    loss_window=c.episode.max_total_tokens if trainer.environment else c.sampling.max_new_tokens,
  )

  def grad_of(specs):
    objective = functools.partial(opd_step.distill_objective, specs=specs, **structure)
    return jax.jit(
      lambda p, s, b, cache: _flat(
        jax.grad(lambda q: objective(q, teacher_states=s, batch=b, teacher_cache=cache)[0])(p)
      )
    )

  estimate, exact = grad_of(specs), grad_of(claimed_specs(specs))
  params = trainer.state["params"]
  noise, cosine, ratio = [], [], []
  for i in range(batches):
    prompts = trainer.batcher.batch(10**5 + i)  # far from the training stream's batches
    batch = trainer.rollouts(prompts, jax.random.key(seed * 1000 + i))
    cache = trainer.teacher_cache(batch)
    g, g0 = estimate(params, t.states, batch, cache), exact(params, t.states, batch, cache)
    n0 = jnp.linalg.norm(g0)
    noise.append(float(jnp.linalg.norm(g - g0) / n0))
    cosine.append(float(g @ g0 / (jnp.linalg.norm(g) * n0)))
    ratio.append(float(jnp.linalg.norm(g) / n0))
  return {
    "noise": float(np.mean(noise)),
    "cosine": float(np.mean(cosine)),
    "norm_ratio": float(np.mean(ratio)),
    "batches": batches,
  }
