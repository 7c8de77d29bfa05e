"""Calibration of the support-overlap metrics on teachers with a known overlap knob.

Teacher = student + α · (a bias on 5% of the vocabulary, "the domain"). At α = 0 the teacher
IS the student, whatever its entropy, so a calibrated metric must read full overlap there
at every entropy and vocabulary size, and fall as α grows. The student's entropy is set by
scaling random logits (the temperature knob). Every metric is its exact expectation over
x ~ student (no sampling noise):

  calibrated: overlap = Σ min(q, p) = 1 − TV; nucleus = min(1, q(N_p) / p(N_p)), N_p the
              teacher's top-0.9 nucleus; excess cross-entropy E_q[−log p] − H(p) (nats)
  raw:        top-8 coverage q(top-8 of p); off-support rate q({p < 1e-3})

Writes a table to stdout and `overlap_calibration.png` to --out.

    python bench/overlap_calibration.py [--out runs/bench]
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np

from jdistill import losses

ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
ENTROPY_FRACTIONS = (0.1, 0.5, 0.9)  # of log V
METRICS = ("overlap", "nucleus_coverage", "excess_xent", "top8_coverage", "off_support")


def logits_with_entropy(vocab, entropy, rows, seed):
  z = np.random.RandomState(seed).standard_normal((rows, vocab)) * 3.0
  out = np.empty_like(z)
  for i in range(rows):
    lo, hi = 1e-3, 1e3
    for _ in range(80):
      mid = np.sqrt(lo * hi)
      p = np.exp(mid * z[i] - np.max(mid * z[i]))
      p /= p.sum()
      h = -np.sum(p * np.log(np.maximum(p, 1e-300)))
      lo, hi = (mid, hi) if h > entropy else (lo, mid)
    out[i] = mid * z[i]
  return out


def read(student, teacher):
  s = losses.log_softmax(jnp.asarray(student, jnp.float32))
  t = losses.log_softmax(jnp.asarray(teacher, jnp.float32))
  out = {k: float(jnp.mean(v)) for k, v in losses.calibrated_overlap(s, t, 0.9).items()}
  q = jnp.exp(s)
  out["top8_coverage"] = float(jnp.mean(jnp.sum(jnp.where(losses._topk_mask(t, 8), q, 0), -1)))
  out["off_support"] = float(jnp.mean(jnp.sum(jnp.where(t < np.log(1e-3), q, 0), -1)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/bench")
  parser.add_argument("--rows", type=int, default=8)
  args = parser.parse_args()
  results = {}
  for vocab in (384, 32_000):
    domain = np.random.RandomState(1).choice(vocab, vocab // 20, replace=False)
    bias = np.zeros(vocab)
    bias[domain] = 1.0
    for frac in ENTROPY_FRACTIONS:
      entropy = frac * np.log(vocab)
      student = logits_with_entropy(vocab, entropy, args.rows, seed=vocab)
      results[vocab, frac] = [read(student, student + a * bias) for a in ALPHAS]

  print(f"{'vocab':>6}{'H nats':>8}{'metric':>18}" + "".join(f"{f'α={a:g}':>9}" for a in ALPHAS))
  for (vocab, frac), rows in results.items():
    for metric in METRICS:
      cells = "".join(f"{r[metric]:>9.3f}" for r in rows)
      print(f"{vocab:>6}{frac * np.log(vocab):>8.2f}{metric:>18}{cells}")

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 7), sharex=True)
  for i, vocab in enumerate((384, 32_000)):
    for j, metric in enumerate(METRICS):
      ax = axes[i, j]
      for frac in ENTROPY_FRACTIONS:
        values = [r[metric] for r in results[vocab, frac]]
        ax.plot(ALPHAS, values, marker="o", label=f"H = {frac * np.log(vocab):.1f} nats")
      kind = "calibrated" if j < 3 else "raw"
      ax.set_title(f"{metric} ({kind}), V={vocab}", fontsize=9)
      ax.grid(alpha=0.3)
      if i == 1:
        ax.set_xlabel("α (teacher = student + α · domain bias)")
  for row in axes:
    row[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "overlap_calibration.png")
  fig.savefig(path, dpi=90)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
