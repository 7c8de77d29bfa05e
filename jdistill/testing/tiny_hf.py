"""Tiny random Hugging Face checkpoints written locally (tests and the CPU demo; no hub)."""

from __future__ import annotations

HF_CONFIGS = {
  "llama": dict(
    model_type="llama",
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
  ),
  "qwen2": dict(model_type="qwen2"),
  "qwen3": dict(model_type="qwen3", head_dim=32),
  "qwen3_moe": dict(
    model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32
  ),
  "qwen2_moe": dict(
    model_type="qwen2_moe",
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
  ),
  # MLA with a q latent, YaRN, one dense layer then MoE (8 experts in 4 groups, 2 kept)
  "deepseek_v3": dict(
    model_type="deepseek_v3",
    q_lora_rank=24,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rope_interleave=True,
    rope_scaling={
      "rope_type": "yarn",
      "factor": 4.0,
      "original_max_position_embeddings": 64,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 0.8,
    },
  ),
  # sliding-window layers every other layer (window 4, local RoPE base 100), global layers
  # with linear RoPE scaling, a query scale that is not head_dim's, tied embeddings
  "gemma3_text": dict(
    model_type="gemma3_text",
    head_dim=16,
    sliding_window=4,
    sliding_window_pattern=2,
    query_pre_attn_scalar=24,
    rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    },
  ),
  # every layer kind (Mamba-2, attention, MLP, MoE), 2 B/C groups, SSD chunks of 4 tokens
  "nemotron_h": dict(
    model_type="nemotron_h",
    hybrid_override_pattern="M*-EM",
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=8,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
  ),
}


def tiny_hf_model(
  kind: str,
  *,
  vocab_size: int = 128,
  hidden_size: int = 64,
  layers: int = 2,
  heads: int = 4,
  kv_heads: int = 2,
  intermediate_size: int = 96,
  tie: bool = False,
  seed: int = 0,
  **extra,
):
  """A random transformers CausalLM of the given family (`llama`, `qwen2`, `qwen3`, `qwen2_moe`,
  `qwen3_moe`, `deepseek_v3`, `gemma3_text`, `nemotron_h`); `extra` overrides config fields (say
  `mlp_only_layers=[0]`)."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  spec = dict(HF_CONFIGS[kind])
  model_type = spec.pop("model_type")
  spec.update(extra)
  if model_type == "deepseek_v3":
    kv_heads = heads  # MLA expands the latent into one key per head (HF repeats none)
  if model_type == "nemotron_h":  # its depth is the pattern's
    layers = len(spec["hybrid_override_pattern"])
  config = AutoConfig.for_model(
    model_type,
    vocab_size=vocab_size,
    hidden_size=hidden_size,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    intermediate_size=intermediate_size,
    tie_word_embeddings=tie,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    **spec,
  )
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():  # HF inits biases and norms to 0/1; randomise so they are tested
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
      elif name.endswith(("mlp.gate.weight", "mixer.gate.weight")):  # router logits of std ~1
        p.copy_(torch.randn_like(p) / hidden_size**0.5)
      elif ".experts." in name or "shared_expert" in name:  # experts that move the logits
        p.copy_(0.1 * torch.randn_like(p))
      elif name.endswith(("mixer.A_log", "mixer.D")):  # Mamba-2's per-head decay and skip
        p.add_(0.3 * torch.randn_like(p))
    for name, b in model.named_buffers():  # DeepSeek-V3's bias that changes which experts win
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.2 * torch.randn_like(b))
  return model


def padded_batch(vocab: int, rows: int = 3):
  """A fixed left-padded batch for parity tests → (tokens, mask, positions), each `[rows, 11]`:
  row 1 padded by 4, row 2 by 7, positions counting the real tokens from 0."""
  import numpy as np

  rng = np.random.RandomState(0)
  tokens = rng.randint(3, vocab, (rows, 11))
  mask = np.ones((rows, 11), bool)
  mask[1, :4] = False
  mask[2, :7] = False
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return tokens, mask, positions


def torch_logits(model, tokens, mask, positions):
  """transformers' logits `[rows, seq, vocab]` of `padded_batch`'s arrays (numpy)."""
  import numpy as np
  import torch

  with torch.no_grad():
    return model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()


def jax_logits(graphdef, state, tokens, positions, mask):
  """jdistill's logits `[rows, seq, vocab]` of a split model (`nnx.split`), jitted once."""
  return _jitted_forward()(graphdef, state, tokens, positions, mask)


_FORWARD = []


def _jitted_forward():
  if not _FORWARD:
    import jax
    from flax import nnx

    _FORWARD.append(jax.jit(lambda g, s, t, p, m: nnx.merge(g, s).forward_logits(t, p, m)))
  return _FORWARD[0]


def assert_greedy_equals_generate(torch_model, tokens, prompts, new: int) -> None:
  """Each row of `tokens` ([batch, ≥ prompt + new], the sampler's greedy output) equals
  transformers' greedy `generate` of its prompt for `new` tokens (no EOS stop)."""
  import numpy as np
  import torch

  torch_model.generation_config.eos_token_id = None
  for b, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = torch_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
      )
    np.testing.assert_array_equal(np.asarray(tokens[b, : len(prompt) + new]), ref[0].numpy())


def opd_step(model, vocab: int, mesh=None):
  """One compiled OPD step (reverse KL) with `model` as the student and its
  weights scaled by 1.05 as the teacher, on 4 fixed rows of 12 tokens (5 completion tokens
  each); with `mesh` the rows are split over its data axes (the model's params already
  placed there). Returns (params, the params after it, its metrics, the loss of a second
  step on the same batch, the step's gradients after global-norm clipping): a family's step
  on one device and on a mesh, compared."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from jdistill.losses import LossSettings
  from jdistill.runtime import sharding as shd
  from jdistill.step import common
  from jdistill.step import opd as ts

  graphdef, params = nnx.split(model)
  t_state = jax.tree.map(lambda x: x * 1.05, params)
  spec = common.TeacherSpec("t", LossSettings(loss="reverse_kl", chunk_size=4), 1.0, (0, 1, 2, 3))
  mask = np.zeros((4, 12), np.float32)
  mask[:, 5:10] = 1
  batch = {
    "tokens": np.random.RandomState(0).randint(3, vocab, (4, 12)).astype(np.int32),
    "completion_mask": mask,
    "logprobs": np.full((4, 12), -2.0, np.float32),
    "sampling_logprobs": np.full((4, 12), -2.0, np.float32),
    "lengths": np.full((4,), 10, np.int32),
  }
  if mesh is None:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
  else:
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  b1 = 0.9
  opt, sched = common.make_optimizer(2e-5, steps=10, warmup_steps=0, b1=b1)  # ~2e-5 a weight
  step = jax.jit(
    functools.partial(
      ts.train_step, student_graphdef=graphdef, teacher_graphdefs=(graphdef,), specs=(spec,),
      optimizer=opt, schedule=sched,
    )
  )  # fmt: skip
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  new, metrics = step(state, (t_state,), batch)
  _, again = step(new, (t_state,), batch)
  # Adam's first moment after one step is (1 - b1) times the (clipped) gradient
  grads = jax.tree.map(lambda m: m / (1 - b1), optax.tree_utils.tree_get(new["opt_state"], "mu"))
  if jax.tree.structure(grads) != jax.tree.structure(params):  # tree_get gives None if absent
    raise ValueError("opd_step: the optimizer state has no first moment shaped as the params")
  return params, new["params"], metrics, float(again["loss"]), grads


def assert_step_equals_one_device(one, sharded) -> None:
  """`opd_step`'s results on a mesh (`sharded`) equal one device's (`one`) to f32 reordering:
  the loss (a reverse KL of ~1e-4, a sum of terms of ~|log p| ~ 5, so the error is absolute),
  every gradient, and the second step's loss. (Not the updated weights: Adam's first update
  is ~lr·sign(g), which reordering flips where a gradient is ~0.)"""
  import jax
  import numpy as np

  _, _, metrics1, again1, grads1 = one
  _, _, metrics8, again8, grads8 = sharded
  np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=0, atol=1e-6)
  np.testing.assert_allclose(float(metrics8["grad_norm"]), float(metrics1["grad_norm"]), rtol=1e-4)
  leaves = zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8), strict=True)
  for (path, a), b in leaves:
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-12, err_msg=str(path))
  np.testing.assert_allclose(again8, again1, rtol=0, atol=1e-6)
