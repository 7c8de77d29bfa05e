"""The one vocabulary of loss names: what a teacher's ``config.teachers.<name>.loss`` may be.

Each user-facing name is one :class:`Loss` record in :data:`REGISTRY`: the kernel loss it
runs (``LossSettings.loss``, dispatched in :mod:`jdistill.losses.distill`), the settings
the name fixes (``topk_teacher`` is the "topk" kernel with ``topk_support="teacher"``), a
one-line description, and whether it reads the sampled tokens' behaviour log-probs. Every
other list of loss names is derived from it: ``config.LOSSES`` (config validation),
``LOSS_NAMES`` (the kernel names ``LossSettings.validate`` accepts), ``SAMPLED_LOSSES``
(the kernels the OPD step hands ``behaviour_logp``), and ``losses.settings_for``, which maps
a config name to its ``LossSettings``; the demo's and the experiment grid's selections are
checked against it (:func:`check_names`), and ``tests/losses/test_losses.py`` checks that every
name here appears in docs/configs.md.

Adding a loss takes two places:

1. the kernel: its per-token terms in its own branch of ``_make_token_fn`` (whose final
   ``else`` is "topk") and, for a sampled estimator, its ``*_terms`` in ``estimators.py``
   wired in ``_per_token_loss_fn`` and ``distill_loss``; a new kernel name is accepted once
   it is in this registry;
2. its entry here: ``Loss(name, kernel, description, fixed, sampled)``.

Config, runtime and the step then accept it; docs/configs.md and docs/design.md must name it
(the tests fail until docs/configs.md does). Only a new hyper-parameter takes more: a field
of ``LossSettings`` checked in ``LossSettings.validate``, and its ``config.loss.*`` field,
check, row in docs/configs.md and line in ``build.loss_settings``.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Loss(NamedTuple):
  """One user-facing loss name and what it runs."""

  name: str  # the value of config.teachers.<name>.loss
  kernel: str  # LossSettings.loss: the kernel loss it runs
  description: str  # one line: the objective per position
  fixed: tuple[tuple[str, Any], ...] = ()  # LossSettings fields this name sets
  sampled: bool = False  # reads the sampled tokens and their behaviour log-probs π(x)

  def settings_fields(self) -> dict[str, Any]:
    """The ``LossSettings`` fields this name sets: ``loss`` and the ``fixed`` ones."""
    return {"loss": self.kernel, **dict(self.fixed)}


REGISTRY: dict[str, Loss] = {
  loss.name: loss
  for loss in (
    Loss(
      "sampled_token",
      "sampled_token",
      "k1 = log p_s(x) - log p_t(x) of the sampled token as a per-token advantage",
      sampled=True,
    ),
    Loss(
      "sampled_token_baseline",
      "sampled_token",
      "sampled-token with the exact per-position reverse KL as its baseline (same expectation)",
      fixed=(("kl_baseline", True),),
      sampled=True,
    ),
    Loss("reverse_kl", "reverse_kl", "full-vocabulary KL(student || teacher)"),
    Loss("forward_kl", "forward_kl", "full-vocabulary KL(teacher || student)"),
    Loss("jsd", "jsd", "generalized JSD(beta), as TRL's generalized_jsd_loss"),
    Loss(
      "topk_teacher",
      "topk",
      "KL on the teacher's top-k tokens",
      fixed=(("topk_support", "teacher"),),
    ),
    Loss(
      "topk_student",
      "topk",
      "KL on the student's top-k tokens",
      fixed=(("topk_support", "student"),),
    ),
    Loss(
      "topk_union",
      "topk",
      "KL on the union of both top-k supports",
      fixed=(("topk_support", "union"),),
    ),
    Loss(
      "overlap_aware",
      "overlap_aware",
      "reverse KL where the student's tokens are on the teacher's support, sampled-token off it",
      sampled=True,
    ),
  )
}

NAMES: tuple[str, ...] = tuple(REGISTRY)  # the config names, in the docs' order
KERNEL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(loss.kernel for loss in REGISTRY.values()))
SAMPLED_LOSSES: tuple[str, ...] = tuple(
  dict.fromkeys(loss.kernel for loss in REGISTRY.values() if loss.sampled)
)


def lookup(name: str) -> Loss:
  """The registry entry of a config loss name; ValueError naming the allowed ones."""
  if name not in REGISTRY:
    raise ValueError(f"loss must be one of {NAMES}, got {name!r}")
  return REGISTRY[name]


def check_names(names: tuple[str, ...], what: str) -> tuple[str, ...]:
  """``names`` itself when every one is a registry name (a selection of losses, e.g. the
  demo's); else ValueError naming ``what`` and the allowed names."""
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(f"{what}: {unknown} are not loss names; allowed: {NAMES}")
  return tuple(names)
