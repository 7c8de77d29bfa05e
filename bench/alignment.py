"""Host cost of the cross-tokenizer alignment (`jdistill.data.alignment`) per 512-token row.

A Qwen-like student's rollout (byte-level BPE, 300 tokens) aligned with a Llama-3-like
teacher's tokenisation (360 tokens), both from `jdistill.testing.tokenizers`: text rollouts
and random non-special ids (invalid UTF-8 and all), against the baseline measured in the
same process, the teacher's own `encode` of the same text (the part no alignment avoids).

Also the loss kernels on the aligned arrays: `span_sampled_token_loss` fwd+bwd against
`sampled_token_loss` on the same `[B, T]` log-probs (jitted, same process).

  python bench/alignment.py [--rows 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jdistill.data import alignment
from jdistill.testing.tokenizers import CORPUS, llama3_like, qwen_like


def median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def unstable_share(student, teacher, ids, every=8):
  """Share of span ends e (every `every`-th) where the alignment of the text up to e differs,
  before e, from the full text's: spans the teacher re-tokenises once more text follows (the
  condition under which the span estimator is exactly its stated objective)."""
  full = alignment.align_row(student, teacher, ids)
  changed, cuts = 0, 0
  for k in range(0, full.n_spans - 1, every):
    end = int(np.searchsorted(full.student_span, k, side="right"))  # student tokens of 0..k
    part = alignment.align_row(student, teacher, ids[:end])
    nt = int(np.searchsorted(full.teacher_span, k, side="right"))
    same = np.array_equal(part.student_span, full.student_span[:end]) and np.array_equal(
      part.teacher_ids, full.teacher_ids[:nt]
    )
    changed += not same
    cuts += 1
  return changed / cuts


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--tokens", type=int, default=512)
  args = ap.parse_args()
  s_tok, t_tok = qwen_like(), llama3_like()
  student, teacher = alignment.Vocab.of(s_tok), alignment.Vocab.of(t_tok)
  ids = np.asarray(s_tok.encode(" ".join(CORPUS * 40))[: args.tokens])
  rng = np.random.RandomState(0)
  plain = [i for i in range(len(student.pieces)) if i not in student.special]
  rows = {
    "text": np.stack([np.roll(ids, 7 * r) for r in range(args.rows)]),
    "random ids": rng.choice(plain, (args.rows, args.tokens)),
  }
  mask = np.ones((args.rows, args.tokens), np.float32)
  for name, batch in rows.items():
    texts = [b"".join(student.pieces[i] for i in row).decode(errors="replace") for row in batch]
    encode = median_ms(
      lambda texts=texts: [t_tok.encode(t, add_special_tokens=False) for t in texts], args.repeats
    )
    align = median_ms(
      lambda batch=batch: alignment.align_batch(student, teacher, batch, mask, 2 * args.tokens),
      args.repeats,
    )
    out = alignment.align_batch(student, teacher, batch, mask, 2 * args.tokens)
    unstable = np.mean([unstable_share(student, teacher, row) for row in batch[:8]])
    spans = (out["student_span"].max(1) + 1).mean()
    print(
      f"{name}: {args.rows} rows x {args.tokens} tokens: align_batch {align / args.rows:.2f} "
      f"ms/row, the teacher's encode alone {encode / args.rows:.2f} ms/row "
      f"({align / encode:.1f}x); {spans:.0f} spans/row; prefix-unstable span ends "
      f"{100 * unstable:.1f}%"
    )
    same, across = kernel_ratio(out, args.rows, args.tokens, args.repeats)
    print(
      f"  loss fwd+bwd on [{args.rows}, {args.tokens}]: same-tokenizer {same:.2f} ms, "
      f"span {across:.2f} ms ({across / same:.1f}x)"
    )


def kernel_ratio(out, rows, tokens, repeats):
  import jax
  import jax.numpy as jnp

  from jdistill import losses

  rng = np.random.RandomState(1)
  s = jnp.asarray(-rng.rand(rows, tokens), jnp.float32)
  behaviour = s + 0.1
  t_len = out["teacher_span"].shape[1]
  teacher = jnp.asarray(-rng.rand(rows, t_len), jnp.float32)
  mask = jnp.ones((rows, tokens), jnp.float32)
  spans = jnp.asarray(out["student_span"]), jnp.asarray(out["teacher_span"])

  def same(x):
    return losses.sampled_token_loss(x, teacher[:, :tokens], mask, behaviour_logp=behaviour)[0]

  def across(x):
    return losses.span_sampled_token_loss(x, teacher, *spans, mask, behaviour_logp=behaviour)[0]

  def run(f):
    g = jax.jit(jax.grad(f))
    return median_ms(lambda: jax.block_until_ready(g(s)), repeats)

  return run(same), run(across)


if __name__ == "__main__":
  main()
