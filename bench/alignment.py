"""Host cost of the cross-tokenizer alignment (`jdistill.data.alignment`) per 512-token row.

A Qwen-like student's rollout (byte-level BPE, 300 tokens) aligned with a Llama-3-like
teacher's tokenisation (360 tokens), both from `jdistill.testing.tokenizers`: text rollouts
and random non-special ids (invalid UTF-8 and all), against the baseline measured in the
same process, the teacher's own `encode` of the same text (the part no alignment avoids).

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
    spans = (out["student_span"].max(1) + 1).mean()
    print(
      f"{name}: {args.rows} rows x {args.tokens} tokens: align_batch {align / args.rows:.2f} "
      f"ms/row, the teacher's encode alone {encode / args.rows:.2f} ms/row "
      f"({align / encode:.1f}x); {spans:.0f} spans/row"
    )


if __name__ == "__main__":
  main()
