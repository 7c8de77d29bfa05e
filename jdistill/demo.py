"""`make demo`: a few minutes of multi-teacher OPD on the CPU, from the embedded config.

Builds a toy world (tokenizer, prompts, a Llama and a Qwen3 teacher, a Llama
student — nothing downloaded), trains, and ends with a per-teacher before/after
table of the full-vocab reverse KL on held-out student rollouts. Outputs under
`--out`: metrics.jsonl, learning_curves.png, before_after.json, the checkpoints
and the exported student (an HF directory).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags, logging

from jdistill import train
from jdistill.toy import make_toy_world, tiny_config

flags.DEFINE_string(
  "out", "demo_out", "Output directory (replaced on each run, if the demo wrote it)."
)
flags.DEFINE_integer("steps", 200, "Training steps.")
FLAGS = flags.FLAGS
MARKER = ".jdistill-demo"  # the demo only ever deletes a directory that carries this


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  out = os.path.abspath(FLAGS.out)
  if os.path.exists(out):
    if not os.path.exists(os.path.join(out, MARKER)):
      raise SystemExit(
        f"demo: {out} exists and was not written by the demo (no {MARKER} in it); "
        "nothing was deleted — pass another --out"
      )
    print(f"demo: replacing the previous demo output in {out}")
    shutil.rmtree(out)
  os.makedirs(out)
  open(os.path.join(out, MARKER), "w").close()
  t0 = time.time()
  paths = make_toy_world(os.path.join(out, "world"))
  config = tiny_config(paths)
  config.output_dir = out
  config.train.steps = FLAGS.steps
  config.checkpoint.dir = os.path.join(out, "ckpt")
  config.export_dir = os.path.join(out, "student_hf")
  print(
    "demo: the embedded CPU config (jdistill/toy.py: tiny_config); teachers "
    f"math=reverse_kl (Llama), code=sampled_token (Qwen3); {config.train.steps} steps"
  )
  trainer = train.Trainer(config)
  before = trainer.evaluate()
  trainer.run()
  after = trainer.evaluate()
  table = train.format_before_after(before, after)
  print("\nPer-teacher, on held-out student rollouts:\n" + table)
  with open(os.path.join(out, "before_after.json"), "w") as f:
    json.dump({"before": before, "after": after}, f, indent=2)
  trainer.export(config.export_dir)
  print(
    f"\ndemo: done in {time.time() - t0:.0f} s; outputs in {out} "
    "(metrics.jsonl, learning_curves.png, before_after.json, ckpt/, student_hf/)"
  )


if __name__ == "__main__":
  app.run(main)
