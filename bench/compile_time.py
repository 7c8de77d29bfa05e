"""Compile time of scanned vs unrolled layers (`ModelConfig.scan_layers`), same process.

Shape: a 32-layer student of width 64 (4 heads, 2 KV, MLP 128, vocab 256), one 2-layer
teacher (unrolled in both runs); 4 rows of 32 tokens. Timed: trace + lower + compile of
the forward (`forward_logits`) and of the OPD train step (teacher forward, student
forward/backward, reverse-KL loss, AdamW), with `remat_policy` from the command line.
`--pattern` makes the student a Nemotron-H of that `layer_pattern` (`nano`: Nemotron 3
Nano's 52 layers; Mamba-2 4 x 16 heads, state 16; MoE 8 experts, 2 active), scanned as
runs of a repeated unit (`jdistill.models.layer_runs`).

  python bench/compile_time.py [--layers 32] [--remat_policy full] [--pattern nano]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.losses import LossSettings
from jdistill.models import ModelConfig, Transformer
from jdistill.models.layer_runs import repeat_runs
from jdistill.step import common as step_common
from jdistill.step import opd as ts

NANO = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # Nemotron 3 Nano's pattern


def compile_seconds(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0


def measure(cfg: ModelConfig, rows: int = 4, length: int = 32) -> dict[str, float]:
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  small = dict(layer_pattern=cfg.layer_pattern[:2]) if cfg.hybrid else {}
  teacher_cfg = cfg.replace(num_layers=2, scan_layers=False, remat_policy="none", **small)
  t_graphdef, t_state = nnx.split(nnx.eval_shape(lambda: Transformer(teacher_cfg, nnx.Rngs(1))))
  tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)

  def forward(params, tokens):
    return nnx.merge(graphdef, params).forward_logits(tokens)

  specs = (
    step_common.TeacherSpec("t", LossSettings(loss="reverse_kl", chunk_size=16), 1.0, (0, 1, 2, 3)),
  )
  opt, sched = step_common.make_optimizer(1e-3, steps=10, warmup_steps=0)
  step = functools.partial(
    ts.train_step,
    student_graphdef=graphdef,
    teacher_graphdefs=(t_graphdef,),
    specs=specs,
    optimizer=opt,
    schedule=sched,
  )
  state = {
    "params": params,
    "opt_state": jax.eval_shape(opt.init, params),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  f32 = jax.ShapeDtypeStruct((rows, length), jnp.float32)
  batch = {
    "tokens": tokens,
    "completion_mask": f32,
    "logprobs": f32,
    "sampling_logprobs": f32,
    "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32),
  }
  return {
    "forward": compile_seconds(forward, params, tokens),
    "opd_step": compile_seconds(step, state, (t_state,), batch),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--remat_policy", default="full")
  parser.add_argument("--pattern", default="", help="a Nemotron-H layer_pattern, or `nano`")
  args = parser.parse_args()
  if args.pattern:
    pattern = NANO if args.pattern == "nano" else args.pattern
    base = ModelConfig(
      model_type="nemotron_h", vocab_size=256, hidden_size=64, intermediate_size=128,
      num_layers=len(pattern), num_heads=4, num_kv_heads=2, head_dim=16, layer_pattern=pattern,
      mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, mamba_chunk_size=16,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1,
      moe_dispatch="dense", remat_policy=args.remat_policy,
    )  # fmt: skip
    runs = repeat_runs(pattern)
    print(f"runs {runs}: {sum(len(u) for u, _ in runs)} of {len(pattern)} layers compiled")
    args.layers = len(pattern)
  else:
    base = ModelConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_layers=args.layers,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      remat_policy=args.remat_policy,
    )
  print(f"{jax.devices()[0].platform}, {args.layers} layers, remat_policy={args.remat_policy}")
  unrolled = measure(base.replace(scan_layers=False))
  scanned = measure(base.replace(scan_layers=True))
  for name in ("forward", "opd_step"):
    u, s = unrolled[name], scanned[name]
    print(f"{name:<10} unrolled {u:7.2f} s   scanned {s:7.2f} s   scanned/unrolled {s / u:.3f}")


if __name__ == "__main__":
  main()
