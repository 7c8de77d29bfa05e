"""jdistill vs Tunix vs transformers/PyTorch, side by side, from one run (CPU).

Shape (the issue's): a tiny Qwen3 — 4 layers, width 256, 4 heads (2 KV, head_dim 64), MLP
768, tied embeddings, float32 — batch 16, prompt 64, 128 new tokens, sampling at T=1 (no
top-k, no top-p, no stop token: every row decodes all 128). The sampler rows are repeated at
every `--vocab` (default 32,000 and 151,936). All three systems run the same random weights:
a transformers Qwen3 (`jdistill.testing.tiny_hf.tiny_hf_model`) → `save_pretrained` → loaded by
`jdistill.models.hf.from_hf` and by Tunix's own safetensors loader
(`tunix.models.qwen3.params.create_model_from_safe_tensors`); the loaded Tunix model's logits
are checked against transformers' before timing.

Rows:
  Tunix sampler        `tunix.generate.sampler.Sampler` (KV cache = prompt + new), called the
                       documented way (strings through a tokenizer adapter that maps
                       "id id id" ↔ ids), temperature=1, top_p=1 (its full-vocab categorical)
  transformers         `generate(do_sample=True, temperature=1, top_k=0, top_p=1)`, torch
                       CPU with 2 threads
  jdistill sampler     `Sampler.generate`, SamplingParams(temperature=1)
  PyTorch OPD step     HF generate (T=1, 128 new) + teacher forward (same shape, other
                       seed) + full-vocab reverse KL per completion token (f32 log-softmax of
                       both, masked mean) + backward + grad clip 1.0 + AdamW
  jdistill OPD step    `Sampler.generate` + `rollout_batch` + one jitted `train_step`
                       (reverse_kl, chunk_size=0: chosen from the shapes, donated state as in
                       jdistill/train.py; diagnostics off as on non-logging steps, and on)
  train step, width 512: the compiled step alone at width 512 (8 heads, MLP 1536, vocab 32k,
                       16 x 192 tokens), its FLOP/s (model count, and XLA's cost analysis of
                       the same step with the loss unchunked: the analysis counts a while
                       loop's body once) against `bench/common.py`'s `matmul_peak`, measured
                       in the same run.

Warm runs are timed (median of `--repeats`); first-call (compile) times are reported apart.
The OPD rows run at the first vocab only (PyTorch's full-vocab KL at 151,936 needs several GB).

Tunix is an optional bench dependency (never a runtime one of jdistill):
  make bench-venv     # .venv-bench: jdistill[test,bench] (google-tunix==0.1.7, torch CPU)
  .venv-bench/bin/python bench/compare.py [--vocab 32000,151936] [--repeats 3] [--json o.json]
Without Tunix installed its rows are skipped (and said so).  `--quick`: a small smoke shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import flops_of, matmul_peak
from flax import nnx

from jdistill.losses import LossSettings
from jdistill.models import hf
from jdistill.runtime import sharding as shd
from jdistill.sampling import Sampler, SamplingParams
from jdistill.step import common as step_common
from jdistill.step import opd as ts
from jdistill.testing.tiny_hf import tiny_hf_model

try:
  import tunix
  from tunix.generate import sampler as tunix_sampler
  from tunix.models.qwen3 import model as tunix_qwen3
  from tunix.models.qwen3 import params as tunix_params
except ImportError as e:  # optional: pip install google-tunix (see bench/requirements-tunix.txt)
  tunix = None
  TUNIX_ERROR = repr(e)

GOALS = dict(sampler_vs_tunix=1.5, sampler_vs_transformers=2.5, opd_vs_pytorch=2.0, mfu=0.60)


def pkg_version(name: str) -> str:
  from importlib import metadata

  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "not installed"


def progress(msg: str) -> None:
  """One line per finished row on stderr, so a long quiet run shows where it is."""
  print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def first_and_warm(fn, repeats: int) -> dict:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  med, times = median_time(fn, repeats)
  return dict(first_s=first, median_s=med, runs_s=[round(t, 4) for t in times])


def hf_qwen3(shape: dict, vocab: int, seed: int):
  model = tiny_hf_model(
    "qwen3",
    vocab_size=vocab,
    hidden_size=shape["width"],
    layers=shape["layers"],
    heads=shape["heads"],
    kv_heads=shape["kv_heads"],
    intermediate_size=shape["mlp"],
    head_dim=shape["width"] // shape["heads"],
    tie=True,
    seed=seed,
    # Qwen3's real base; Tunix 0.1.7's Qwen3 attention always ropes with 1e6 (apply_rope's
    # default; ModelConfig.rope_theta is not passed), so the tiny models use it too.
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
  )
  model.generation_config.eos_token_id = None  # no stop token: all rows run every new token
  return model


# --------------------------------------------------------------------------- Tunix


class IdTokenizer:
  """Tunix's sampler takes strings; this maps "5 17 3" ↔ [5, 17, 3] (no BOS; pad 0; the EOS
  id -1 is never drawn, so every row decodes all its tokens)."""

  def encode(self, text: str, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(map(str, ids))

  def bos_id(self):
    return None

  def eos_id(self):
    return -1

  def pad_id(self):
    return 0


def tunix_model(path: str, hf_config, shape: dict, vocab: int):
  cfg = tunix_qwen3.ModelConfig(
    num_layers=shape["layers"],
    vocab_size=vocab,
    embed_dim=shape["width"],
    hidden_dim=shape["mlp"],
    num_heads=shape["heads"],
    head_dim=shape["width"] // shape["heads"],
    num_kv_heads=shape["kv_heads"],
    rope_theta=int(
      getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]
    ),
    norm_eps=hf_config.rms_norm_eps,
    use_tied_embedding=True,
  )
  return tunix_params.create_model_from_safe_tensors(path, cfg, mesh=None), cfg


def tunix_logits_gap(model, torch_model, prompts) -> float:
  """Max |logit difference| of the loaded Tunix model vs transformers on the prompts."""
  b, p = prompts.shape
  positions = np.broadcast_to(np.arange(p), (b, p))
  mask = np.tril(np.ones((p, p), bool))[None].repeat(b, 0)
  ours, _ = model(jnp.asarray(prompts), jnp.asarray(positions), None, jnp.asarray(mask))
  with torch.no_grad():
    ref = torch_model(torch.tensor(prompts, dtype=torch.long)).logits.numpy()
  return float(np.max(np.abs(np.asarray(ours) - ref)))


def bench_tunix(path, torch_model, shape, vocab, prompts, repeats) -> dict:
  if tunix is None:
    return dict(skipped=f"tunix not importable: {TUNIX_ERROR}")
  model, cfg = tunix_model(path, torch_model.config, shape, vocab)
  gap = tunix_logits_gap(model, torch_model, prompts[:2])
  p, new = shape["prompt"], shape["new"]
  cache = tunix_sampler.CacheConfig(
    cache_size=p + new,
    num_layers=cfg.num_layers,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
  )
  sampler = tunix_sampler.Sampler(model, IdTokenizer(), cache)
  texts = [" ".join(map(str, row)) for row in prompts]
  seeds = iter(range(10**6))
  counts = []

  def run():
    out = sampler(
      texts,
      max_generation_steps=new,
      max_prompt_length=p,
      temperature=1.0,
      top_p=1.0,  # top_p given → Tunix's sampling mode (None would be greedy)
      seed=next(seeds),
      eos_tokens=[-1],
    )
    counts.append(sum(len(t) for t in out.tokens))

  res = first_and_warm(run, repeats)
  assert all(c == prompts.shape[0] * new for c in counts), counts
  return dict(res, logits_max_abs_diff_vs_transformers=gap)


# --------------------------------------------------------------------------- transformers


def torch_generate(model, prompts, new: int):
  b, p = prompts.shape
  return model.generate(
    torch.tensor(prompts, dtype=torch.long),
    attention_mask=torch.ones(b, p, dtype=torch.long),
    max_new_tokens=new,
    min_new_tokens=new,
    do_sample=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    use_cache=True,
    pad_token_id=0,
  )


def bench_transformers(model, shape, prompts, repeats) -> dict:
  def run():
    with torch.no_grad():
      out = torch_generate(model, prompts, shape["new"])
    assert out.shape[1] == shape["prompt"] + shape["new"], out.shape

  return first_and_warm(run, repeats)


# --------------------------------------------------------------------------- jdistill


def bench_jdistill_sampler(path, shape, prompts, repeats) -> dict:
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(hf.from_hf(path, mesh))
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(
    max_new_tokens=shape["new"], temperature=1.0, prompt_buckets=(shape["prompt"],)
  )
  lengths = np.full((prompts.shape[0],), shape["prompt"], np.int32)
  keys = iter(range(10**6))

  def run():
    out = sampler.generate(state, (prompts, lengths), jax.random.key(next(keys)), sp)
    jax.block_until_ready(out.tokens)
    assert int(np.asarray(out.completion_lengths).sum()) == prompts.shape[0] * shape["new"]

  res = first_and_warm(run, repeats)
  compiles = sampler.num_compiles
  run()
  assert sampler.num_compiles == compiles, "the sampler recompiled on a warm call"
  return dict(res, compiles=compiles)


# --------------------------------------------------------------------------- OPD steps


def pytorch_opd(student, teacher, prompts, shape, steps: int) -> dict:
  """HF generate + teacher forward + full-vocab reverse KL (f32) + backward + AdamW."""
  new = shape["new"]
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  teacher.requires_grad_(False)
  parts = {"generate": [], "train": []}

  def step():
    t0 = time.perf_counter()
    with torch.no_grad():
      seq = torch_generate(student, prompts, new)
    t1 = time.perf_counter()
    inputs = seq[:, :-1]  # position t predicts token t+1; keep the completion's NEW positions
    mask = torch.ones(seq.shape[0], new)  # no stop token: every completion token counts
    with torch.no_grad():
      t_logits = teacher(inputs, logits_to_keep=new).logits
    s_logits = student(inputs, logits_to_keep=new).logits
    s_logp = torch.log_softmax(s_logits.float(), -1)
    t_logp = torch.log_softmax(t_logits.float(), -1)
    kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)  # reverse KL(student || teacher)
    loss = (kl * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    parts["generate"].append(t1 - t0)
    parts["train"].append(time.perf_counter() - t1)
    return float(loss.detach())

  res = first_and_warm(step, steps)
  res["generate_median_s"] = float(np.median(parts["generate"][1:]))
  res["train_median_s"] = float(np.median(parts["train"][1:]))
  return res


def jdistill_train_fn(
  graphdef, t_graphdef, rows: int, diagnostics: bool, loss_window=None, chunk_size=0
):
  opt, sched = step_common.make_optimizer(1e-4, steps=1000, warmup_steps=0)
  settings = LossSettings(loss="reverse_kl", chunk_size=chunk_size)
  specs = (step_common.TeacherSpec("teacher", settings, 1.0, tuple(range(rows))),)
  step = jax.jit(
    functools.partial(
      ts.train_step,
      student_graphdef=graphdef,
      teacher_graphdefs=(t_graphdef,),
      specs=specs,
      optimizer=opt,
      schedule=sched,
      diagnostics=diagnostics,
      loss_window=loss_window,
    ),
    donate_argnums=(0,),  # as jdistill/train.py: the train state is donated
  )
  return step, opt


def jdistill_opd(path, teacher_path, prompts, shape, steps: int, diagnostics: bool) -> dict:
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  graphdef, params = nnx.split(hf.from_hf(path, mesh))
  t_graphdef, t_state = nnx.split(hf.from_hf(teacher_path, mesh))
  rows = prompts.shape[0]
  # as jdistill/train.py: the loss runs over the completion window (as the PyTorch step's
  # logits_to_keep), not over the prompt positions
  step, opt = jdistill_train_fn(graphdef, t_graphdef, rows, diagnostics, shape["new"])
  box = {
    "state": {
      "params": params,
      "opt_state": jax.jit(opt.init)(params),
      "step": jnp.zeros((), jnp.int32),
    }
  }
  sampler = Sampler(graphdef, mesh)
  sp = SamplingParams(
    max_new_tokens=shape["new"], temperature=1.0, prompt_buckets=(shape["prompt"],)
  )
  lengths = np.full((rows,), shape["prompt"], np.int32)
  parts = {"sampler": [], "train": []}
  keys = iter(range(10**6))

  def one():
    t0 = time.perf_counter()
    out = sampler.generate(
      box["state"]["params"], (prompts, lengths), jax.random.key(next(keys)), sp
    )
    batch = step_common.rollout_batch(out)
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    box["state"], metrics = step(box["state"], (t_state,), batch)
    jax.block_until_ready((box["state"], metrics["loss"]))
    parts["sampler"].append(t1 - t0)
    parts["train"].append(time.perf_counter() - t1)

  res = first_and_warm(one, steps)
  res["sampler_median_s"] = float(np.median(parts["sampler"][1:]))
  res["train_median_s"] = float(np.median(parts["train"][1:]))
  return res


def model_flops(cfg: dict, rows: int, seq: int) -> float:
  """Model FLOPs of one OPD train step (no recompute counted): student forward + backward
  (3x its forward) and one teacher forward of the same shape, unembedding and attention
  (QK and PV over the whole causal block, as computed) included."""
  d, f, v, h, kv = cfg["width"], cfg["mlp"], cfg["vocab"], cfg["heads"], cfg["kv_heads"]
  hd = d // h
  per_token_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
  attention = 2 * 2 * seq * h * hd
  forward = rows * seq * (cfg["layers"] * (per_token_layer + attention) + 2 * d * v)
  return 3 * forward + forward


def width512_train_step(shape: dict, steps: int) -> dict:
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  cfg = dict(shape["w512"])
  rows, seq = shape["batch"], shape["prompt"] + shape["new"]
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for seed in (0, 1):
      m = hf_qwen3(cfg, cfg["vocab"], seed)
      m.save_pretrained(os.path.join(d, str(seed)))
      paths.append(os.path.join(d, str(seed)))
    graphdef, params = nnx.split(hf.from_hf(paths[0], mesh))
    t_graphdef, t_state = nnx.split(hf.from_hf(paths[1], mesh))
  step, opt = jdistill_train_fn(graphdef, t_graphdef, rows, diagnostics=False)
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg["vocab"], (rows, seq)).astype(np.int32)
  mask = np.zeros((rows, seq), np.float32)
  mask[:, shape["prompt"] :] = 1.0
  batch = {
    "tokens": jnp.asarray(tokens),
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.zeros((rows, seq), jnp.float32),
    "sampling_logprobs": jnp.full((rows, seq), -np.log(cfg["vocab"]), jnp.float32),
    "lengths": jnp.full((rows,), seq, jnp.int32),
  }
  state = {
    "params": params,
    "opt_state": jax.jit(opt.init)(params),
    "step": jnp.zeros((), jnp.int32),
  }
  t0 = time.perf_counter()
  step.lower(state, (t_state,), batch).compile()  # (jit reuses it)
  compile_s = time.perf_counter() - t0
  # XLA's cost analysis counts a while loop's body once, so the FLOPs are read from the same
  # step with the loss unchunked (no loop; the same math)
  unchunked, _ = jdistill_train_fn(graphdef, t_graphdef, rows, diagnostics=False, chunk_size=None)
  xla = flops_of(unchunked, state, (t_state,), batch)
  box = {"state": state}

  def one():
    box["state"], metrics = step(box["state"], (t_state,), batch)
    jax.block_until_ready((box["state"], metrics["loss"]))

  res = first_and_warm(one, steps)
  res["compile_s"] = compile_s
  res["model_flops"] = model_flops(cfg, rows, seq - 1)
  res["xla_flops"] = xla
  return res


# --------------------------------------------------------------------------- main


def shapes(quick: bool) -> dict:
  s = dict(layers=4, width=256, heads=4, kv_heads=2, mlp=768, batch=16, prompt=64, new=128)
  s["w512"] = dict(layers=4, width=512, heads=8, kv_heads=4, mlp=1536, vocab=32_000)
  if quick:
    s.update(batch=4, prompt=16, new=16)
    s["w512"] = dict(s["w512"], vocab=8_000)
  return s


def ratio(a, b):
  return None if a is None or b is None else a / b


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab", default="32000,151936", help="comma-separated vocab sizes")
  parser.add_argument("--repeats", type=int, default=3, help="warm runs per row (median)")
  parser.add_argument("--json", default=None, help="also write every number here")
  parser.add_argument("--quick", action="store_true", help="small smoke shape (not the goals')")
  parser.add_argument("--skip", default="", help="comma list of: tunix,torch,opd,w512")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  torch.set_num_threads(2)
  torch.manual_seed(0)
  if args.quick and args.vocab == parser.get_default("vocab"):
    args.vocab = "32000"
  vocabs = [int(v) for v in args.vocab.split(",")]
  shape = shapes(args.quick)
  b, p, new = shape["batch"], shape["prompt"], shape["new"]
  gen_tokens = b * new

  env = dict(
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=pkg_version("jaxlib"),
    flax=pkg_version("flax"),
    optax=pkg_version("optax"),
    tunix=pkg_version("google-tunix"),
    qwix=pkg_version("qwix"),
    torch=torch.__version__,
    transformers=pkg_version("transformers"),
    backend=jax.default_backend(),
    devices=jax.device_count(),
    cpu_count=os.cpu_count(),
    torch_threads=torch.get_num_threads(),
    executable=sys.executable,
  )
  print(
    f"python {env['python']}; jax {env['jax']} / flax {env['flax']} / optax {env['optax']}; "
    f"tunix {env['tunix']}; torch {env['torch']} ({env['torch_threads']} threads); "
    f"transformers {env['transformers']}; backend {env['backend']}, {env['cpu_count']} CPU cores"
  )
  print(
    f"shape: Qwen3 {shape['layers']} layers, width {shape['width']}, {shape['heads']} heads "
    f"({shape['kv_heads']} KV), MLP {shape['mlp']}, tied, f32; batch {b}, prompt {p}, "
    f"{new} new tokens, T=1, no stop token; vocab {', '.join(f'{v:,}' for v in vocabs)}; "
    f"median of {args.repeats} warm runs"
    + ("  [--quick: NOT the goals' shape]" if args.quick else "")
  )
  peak_before = matmul_peak()
  prompts = np.random.RandomState(0).randint(3, min(vocabs), (b, p)).astype(np.int32)
  results = dict(env=env, shape=shape, vocabs=vocabs, repeats=args.repeats, sampler={}, opd=None)

  with tempfile.TemporaryDirectory() as tmp:
    for i, vocab in enumerate(vocabs):
      student, teacher = hf_qwen3(shape, vocab, 0), hf_qwen3(shape, vocab, 1)
      s_path, t_path = os.path.join(tmp, f"s{vocab}"), os.path.join(tmp, f"t{vocab}")
      student.save_pretrained(s_path)
      teacher.save_pretrained(t_path)
      row = {}
      row["jdistill"] = bench_jdistill_sampler(s_path, shape, prompts, args.repeats)
      progress(f"vocab {vocab}: jdistill sampler {row['jdistill']['median_s']:.3f} s")
      if "tunix" not in skip:
        row["tunix"] = bench_tunix(s_path, student, shape, vocab, prompts, args.repeats)
        progress(f"vocab {vocab}: Tunix sampler {row['tunix'].get('median_s')}")
      if "torch" not in skip:
        row["transformers"] = bench_transformers(student, shape, prompts, args.repeats)
        progress(f"vocab {vocab}: transformers generate {row['transformers']['median_s']:.3f} s")
      for r in row.values():
        if "median_s" in r:
          r["tok_per_s"] = gen_tokens / r["median_s"]
      results["sampler"][vocab] = row
      if i == 0 and "opd" not in skip:
        steps = max(args.repeats, 3)
        opd = {}
        opd["jdistill"] = jdistill_opd(s_path, t_path, prompts, shape, steps, diagnostics=False)
        opd["jdistill_diag"] = jdistill_opd(s_path, t_path, prompts, shape, steps, diagnostics=True)
        progress(f"jdistill OPD step {opd['jdistill']['median_s']:.3f} s")
        if "torch" not in skip:
          opd["pytorch"] = pytorch_opd(student, teacher, prompts, shape, steps)
          progress(f"PyTorch OPD step {opd['pytorch']['median_s']:.3f} s")
        results["opd"] = dict(vocab=vocab, **opd)
      del student, teacher

  if "w512" not in skip:
    results["w512"] = width512_train_step(shape, max(args.repeats, 3))
  peak_after = matmul_peak()
  peak = max(peak_before, peak_after)
  results["matmul_peak"] = dict(before=peak_before, after=peak_after, used=peak)
  report(results, gen_tokens, peak)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, default=float)
    print(f"wrote {args.json}")


def report(results: dict, gen_tokens: int, peak: float) -> None:
  goals = {}
  mp = results["matmul_peak"]
  print(
    "\nmatmul peak (f32 2048^3, same run; before/after): "
    f"{mp['before'] / 1e9:.1f} / {mp['after'] / 1e9:.1f} GFLOP/s"
  )
  head = f"{'':<58}{'median':>10}{'rate':>12}  {'first call':>10}  {'jdistill is':>11}"
  for vocab, row in results["sampler"].items():
    print(f"\nsampler, vocab {vocab:,} ({gen_tokens} generated tokens per call)")
    print(head)
    ours = row["jdistill"]["tok_per_s"]
    labels = [
      ("tunix", f"Tunix sampler (tunix.generate.sampler, {results['env']['tunix']})"),
      ("transformers", "transformers generate (torch CPU, 2 threads)"),
      ("jdistill", "jdistill sampler"),
    ]
    for key, label in labels:
      r = row.get(key)
      if r is None:
        continue
      if "skipped" in r:
        print(f"{label:<58}  skipped: {r['skipped']}")
        continue
      x = ours / r["tok_per_s"]
      print(
        f"{label:<58}{r['median_s']:>9.3f}s{r['tok_per_s']:>8,.0f} tok/s  {r['first_s']:>9.2f}s"
        f"  {'' if key == 'jdistill' else f'{x:>10.2f}x'}"
      )
      if key != "jdistill":
        goal = GOALS[f"sampler_vs_{key}"]
        goals[f"sampler_vs_{key}@{vocab}"] = dict(ratio=x, goal=goal, met=x >= goal)
    if "tunix" in row and "logits_max_abs_diff_vs_transformers" in row["tunix"]:
      print(
        f"  (Tunix model loaded from the same safetensors: max |logit diff| vs transformers "
        f"{row['tunix']['logits_max_abs_diff_vs_transformers']:.2e})"
      )
  opd = results.get("opd")
  if opd:
    print(f"\nOPD step, vocab {opd['vocab']:,} (rollout of {gen_tokens} tokens + one update)")
    print(
      f"{'':<58}{'median':>10}{'sample':>9}{'train':>9}  {'first call':>10}  {'jdistill is':>11}"
    )
    ours = opd["jdistill"]["median_s"]
    rows = [
      ("pytorch", "PyTorch OPD step (HF generate+teacher+KL+backward+AdamW)", "generate_median_s"),
      ("jdistill", "jdistill OPD step (sampler + compiled train step)", "sampler_median_s"),
      ("jdistill_diag", "  same, diagnostics on (logging steps)", "sampler_median_s"),
    ]
    for key, label, gen_key in rows:
      r = opd.get(key)
      if r is None:
        continue
      x = r["median_s"] / ours
      print(
        f"{label:<58}{r['median_s']:>9.3f}s{r[gen_key]:>8.3f}s{r['train_median_s']:>8.3f}s"
        f"  {r['first_s']:>9.2f}s  {f'{x:>10.2f}x' if key == 'pytorch' else ''}"
      )
      if key == "pytorch":
        goals["opd_vs_pytorch"] = dict(
          ratio=x, goal=GOALS["opd_vs_pytorch"], met=x >= GOALS["opd_vs_pytorch"]
        )
  w = results.get("w512")
  if w:
    cfg = results["shape"]["w512"]
    model_rate, xla_rate = w["model_flops"] / w["median_s"], w["xla_flops"] / w["median_s"]
    print(
      f"\ntrain step alone, width {cfg['width']} ({cfg['layers']} layers, {cfg['heads']} heads, "
      f"MLP {cfg['mlp']}, vocab {cfg['vocab']:,}; {results['shape']['batch']} x "
      f"{results['shape']['prompt'] + results['shape']['new']} tokens, student + 1 teacher)"
    )
    print(f"  median {w['median_s'] * 1e3:.1f} ms (lower + compile {w['compile_s']:.2f} s)")
    print(
      f"  model FLOPs {w['model_flops'] / 1e9:.2f} G → {model_rate / 1e9:.1f} GFLOP/s = "
      f"{model_rate / peak:.1%} of peak"
    )
    print(
      f"  XLA cost-analysis FLOPs (loss unchunked) {w['xla_flops'] / 1e9:.2f} G → "
      f"{xla_rate / 1e9:.1f} GFLOP/s "
      f"= {xla_rate / peak:.1%} of peak"
    )
    goals["train_step_mfu_w512"] = dict(
      ratio=model_rate / peak, goal=GOALS["mfu"], met=model_rate / peak >= GOALS["mfu"]
    )
  print(
    "\ngoals" + (" (smoke shape: not the goals' shape)" if results["shape"]["new"] != 128 else "")
  )
  for k, g in goals.items():
    print(
      f"  {k:<34} {g['ratio']:>7.2f}{'x' if 'mfu' not in k else ' '} (goal {g['goal']}) "
      f"{'MET' if g['met'] else 'NOT MET'}"
    )
  results["goals"] = goals


if __name__ == "__main__":
  main()
