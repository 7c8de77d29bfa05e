"""Distillation loss kernels: pure, jittable functions of arrays.

Conventions shared by every function here
-----------------------------------------
* Logits are ``[..., V]``; masks are ``[B, T]`` (float weights or bool).
  "Per-token" functions return one value per position (``[B, T]`` for ``[B, T, V]``
  logits).
* Position ``t`` predicts ``targets[:, t]``: the caller has already shifted.
* Softmax / log-softmax are computed in float32 whatever the input dtype.
* ``temperature`` divides both student and teacher logits before the softmax.
* P = teacher, Q = student. Reverse KL is KL(Q||P) = sum_v q (log q - log p), the
  on-policy objective; forward KL is KL(P||Q).
* Argument checks (names, ranges, shapes) run in Python at trace time and raise
  ``ValueError`` naming the argument and the allowed values.

Modules
-------
Every public name is re-exported here (``losses.X``); private helpers live in their module
(``losses.distill._fused_pass``).

* :mod:`~jdistill.losses.registry`: the one vocabulary of loss names (config name → kernel
  loss and fixed settings); what adding a loss takes.
* :mod:`~jdistill.losses.settings`: :class:`LossSettings` and the argument checks.
* :mod:`~jdistill.losses.divergences`: log-softmax, per-token KL / JSD / top-k KL, masked
  means and token weights.
* :mod:`~jdistill.losses.estimators`: the sampled-token and overlap-aware estimators,
  IcePop, group and combined advantages, k3.
* :mod:`~jdistill.losses.span`: the sampled-token estimator across tokenizers (one advantage
  per aligned span) and the dense loss on spans of one equal token per side.
* :mod:`~jdistill.losses.support`: support-overlap diagnostics, the teacher nucleus, the
  calibrated overlap and the overlap-aware gate.
* :mod:`~jdistill.losses.chunking`: logits chunk by chunk over T (memory), token log-probs
  and cross-entropy from hidden states.
* :mod:`~jdistill.losses.distill`: :func:`distill_loss`, the fused chunked kernel, and the
  unchunked reference.
"""

from jdistill.losses import registry
from jdistill.losses.chunking import (
  AUTO_CHUNK_BYTES,
  AUTO_CHUNK_TOKENS_CPU,
  chunk_positions,
  chunked_token_values,
  cross_entropy_loss,
  project_logits,
  token_logprobs,
)
from jdistill.losses.distill import distill_loss, unchunked_distill_loss
from jdistill.losses.divergences import (
  _topk_mask,
  forward_kl_per_token,
  jsd_per_token,
  log_softmax,
  masked_mean,
  reverse_kl_per_token,
  token_logp,
  token_weights,
  topk_kl_per_token,
)
from jdistill.losses.estimators import (
  combined_advantage,
  group_advantages,
  icepop_mask,
  k3_kl,
  overlap_aware_loss,
  overlap_aware_terms,
  sampled_token_loss,
  sampled_token_terms,
)
from jdistill.losses.registry import REGISTRY, SAMPLED_LOSSES, Loss
from jdistill.losses.settings import (
  KL_DIRECTIONS,
  LOSS_NAMES,
  NORMALIZE_MODES,
  OVERLAP_CRITERIA,
  TOPK_SUPPORTS,
  TOPK_TAILS,
  LossSettings,
  settings_for,
)
from jdistill.losses.span import (
  matched_reverse_kl,
  span_dense_loss,
  span_k1,
  span_sampled_token_loss,
  span_sampled_token_terms,
  span_sums,
)
from jdistill.losses.support import (
  calibrated_overlap,
  overlap_gate,
  support_diagnostics,
  teacher_nucleus,
)
