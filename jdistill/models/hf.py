"""Hugging Face checkpoints ⇄ sharded jdistill models.

Import reads a local directory with `config.json` and `model.safetensors` (or
sharded `model-*.safetensors` with `model.safetensors.index.json`); each tensor is
read once on the host, converted to jdistill's layout and placed directly into
its shards with `jax.make_array_from_callback`. Export writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Only safetensors are
read (never pickle) and no remote code is run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jdistill.models.config import ModelConfig
from jdistill.models.transformer import Transformer, stacked_layer_ids
from jdistill.runtime import sharding as shd

_HF_CLASSES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "qwen2_moe": "Qwen2MoeForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
  "deepseek_v3": "DeepseekV3ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
  "nemotron_h": "NemotronHForCausalLM",
}
_MOE_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v3")
# HF's Nemotron-H `layers_block_type` names of the `hybrid_override_pattern` characters
_NEMOTRON_KINDS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def config_from_hf(
  hf: dict,
  *,
  param_dtype: str = "float32",
  dtype: str = "float32",
  scan_layers: bool | None = None,
  remat_policy: str = "none",
) -> ModelConfig:
  """ModelConfig from a `config.json` dict; unsupported features raise, naming the field."""
  model_type = hf.get("model_type")
  if model_type not in _HF_CLASSES:
    raise ValueError(
      f"config.json: model_type={model_type!r} is not supported; allowed: {sorted(_HF_CLASSES)}"
    )
  if model_type == "nemotron_h":
    return _nemotron_from_hf(
      hf, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy
    )
  biased = ("attention_bias", "mlp_bias") if model_type in ("llama", "deepseek_v3") else ()
  for field in biased or ("mlp_bias",):
    if hf.get(field):
      raise ValueError(f"config.json: {field}=true is not supported for {model_type}")
  if hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported")
  for field in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
  ):
    if field not in hf:
      raise ValueError(f"config.json: missing required field {field!r}")
  heads = hf["num_attention_heads"]
  gemma = _gemma_from_hf(hf) if model_type == "gemma3_text" else {}
  if gemma:  # the global layers' RoPE (the local layers': `rope_local_theta`)
    rope = dict(gemma.pop("full_rope"))
  else:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  rope.pop("type", None)
  rope["rope_type"] = rope_type
  rope_scaling = None if rope_type == "default" else tuple(sorted(rope.items()))
  return ModelConfig(
    **_moe_from_hf(hf, model_type),
    **_mla_from_hf(hf, model_type),
    **gemma,
    model_type=model_type,
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=heads if model_type == "deepseek_v3" else hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    rope_theta=float(theta),
    rope_scaling=rope_scaling,
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma3_text")),
    qkv_bias=model_type == "qwen2"
    or (model_type == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
    or bool(hf.get("attention_bias", False)),
    qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
    param_dtype=param_dtype,
    dtype=dtype,
    scan_layers=scan_layers,
    remat_policy=remat_policy,
  )


def _nemotron_from_hf(hf: dict, **kw) -> ModelConfig:
  """ModelConfig of a Nemotron-H `config.json` (`layers_block_type` or the older
  `hybrid_override_pattern`); what jdistill does not implement raises, naming the field."""
  if hf.get("layers_block_type"):
    kinds = hf["layers_block_type"]
    bad = sorted(set(kinds) - set(_NEMOTRON_KINDS))
    if bad:
      raise ValueError(f"config.json: layers_block_type has unknown kinds {bad}")
    pattern = "".join(_NEMOTRON_KINDS[k] for k in kinds)
  elif hf.get("hybrid_override_pattern"):
    pattern = hf["hybrid_override_pattern"]
  else:
    raise ValueError("config.json: nemotron_h needs layers_block_type or hybrid_override_pattern")
  unsupported = ("mlp_bias", "use_bias", "mamba_proj_bias", "attention_bias")
  for field, value in ((name, True) for name in unsupported):
    if hf.get(field) == value:
      raise ValueError(f"config.json: {field}=true is not supported for nemotron_h")
  if hf.get("moe_latent_size") is not None:
    raise ValueError("config.json: moe_latent_size (latent MoE projections) is not supported")
  if hf.get("sliding_window") is not None:
    raise ValueError("config.json: sliding_window is not supported for nemotron_h")
  for field, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
    if hf.get(field, want) != want:
      raise ValueError(f"config.json: {field}={hf[field]!r} is not supported (only {want!r})")
  for field in ("vocab_size", "hidden_size", "num_attention_heads"):
    if field not in hf:
      raise ValueError(f"config.json: missing required field {field!r}")
  limit = hf.get("time_step_limit", hf.get("mamba_dt_limit", (0.0, float("inf"))))
  limit = tuple(float(v["__float__"]) if isinstance(v, dict) else float(v) for v in limit)
  experts = hf.get("n_routed_experts", 0) if "E" in pattern else 0
  heads = hf["num_attention_heads"]
  moe = {}
  if experts:
    moe = dict(
      num_experts=experts,
      num_experts_per_tok=hf.get("num_experts_per_tok", 0),
      moe_intermediate_size=hf.get("moe_intermediate_size", 0),
      # HF builds the shared expert whatever n_shared_experts says
      shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 0),
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      n_group=hf.get("n_group") or 1,
      topk_group=hf.get("topk_group") or 1,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )
  return ModelConfig(
    **moe,
    **kw,
    model_type="nemotron_h",
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf.get("intermediate_size", 1),
    num_layers=len(pattern),
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    layer_pattern=pattern,
    mamba_num_heads=hf.get("mamba_num_heads", 0),
    mamba_head_dim=hf.get("mamba_head_dim", 0),
    ssm_state_size=hf.get("ssm_state_size", 0),
    mamba_n_groups=hf.get("n_groups", hf.get("mamba_n_groups", 1)),
    conv_kernel=hf.get("conv_kernel", hf.get("mamba_d_conv", 4)),
    mamba_chunk_size=hf.get("chunk_size", hf.get("mamba_chunk_size", 128)),
    use_conv_bias=bool(hf.get("use_conv_bias", hf.get("mamba_conv_bias", True))),
    time_step_limit=limit,
  )


def _nemotron_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict:
  """A Nemotron-H `config.json` dict (transformers 5's field names)."""
  kinds = {v: k for k, v in _NEMOTRON_KINDS.items()}
  low, high = cfg.time_step_limit
  return {
    "architectures": [_HF_CLASSES[cfg.model_type]],
    "model_type": "nemotron_h",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "layers_block_type": [kinds[c] for c in cfg.layer_pattern],
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "attention_bias": False,
    "mlp_bias": False,
    "use_bias": False,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": cfg.rms_norm_eps,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "max_position_embeddings": cfg.max_position_embeddings,
    "mamba_num_heads": cfg.mamba_num_heads,
    "mamba_head_dim": cfg.mamba_head_dim,
    "ssm_state_size": cfg.ssm_state_size,
    "n_groups": cfg.mamba_n_groups,
    "conv_kernel": cfg.conv_kernel,
    "chunk_size": cfg.mamba_chunk_size,
    "use_conv_bias": cfg.use_conv_bias,
    # json has no infinity: transformers writes it as {"__float__": "Infinity"}, and reads that
    "time_step_limit": [low, high if high != float("inf") else {"__float__": "Infinity"}],
    "n_routed_experts": cfg.num_experts,
    "num_experts_per_tok": cfg.num_experts_per_tok,
    "moe_intermediate_size": cfg.moe_intermediate_size,
    "moe_shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
    "n_shared_experts": 1,
    "norm_topk_prob": cfg.norm_topk_prob,
    "n_group": cfg.n_group,
    "topk_group": cfg.topk_group,
    "routed_scaling_factor": cfg.routed_scaling_factor,
    "num_nextn_predict_layers": 0,
    "torch_dtype": torch_dtype,
    "dtype": torch_dtype,
  }


def _nemotron_param_map(cfg: ModelConfig) -> dict:
  """Nemotron-H's `_param_map` (HF's `backbone.*` names, as `save_pretrained` writes them)."""
  h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  ident = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)

  def proj_in(heads):  # HF [heads*hd, d] ⇄ ours [d, heads, hd]
    return (lambda w: w.T.reshape(d, heads, hd), lambda w: w.reshape(d, heads * hd).T)

  # Mamba-2: HF's fused in_proj rows [z | x | B, C | dt] and conv channels [x | B, C] are held
  # by role; each role is a part (`#i`) of the HF tensor, its rows `[lo, hi)`
  mh, mp = cfg.mamba_num_heads, cfg.mamba_head_dim
  inner, gn = mh * mp, cfg.mamba_n_groups * cfg.ssm_state_size
  bc_shape = (2, cfg.mamba_n_groups, cfg.ssm_state_size)

  def rows(lo, hi, shape):  # HF [rows, d] ⇄ ours [d, *shape]
    return (lambda w: w[lo:hi].T.reshape(d, *shape), lambda w: w.reshape(d, hi - lo).T)

  def conv_rows(lo, hi, shape):  # HF conv1d [C, 1, K] ⇄ ours [K, *shape]
    k = cfg.conv_kernel
    return (
      lambda w: w[lo:hi, 0, :].T.reshape(k, *shape),
      lambda w: w.reshape(k, hi - lo).T[:, None, :],
    )

  def bias_rows(lo, hi, shape):
    return (lambda w: w[lo:hi].reshape(shape), lambda w: w.reshape(hi - lo))

  mamba = {
    "z_proj": ("in_proj.weight#0", *rows(0, inner, (mh, mp))),
    "x_proj": ("in_proj.weight#1", *rows(inner, 2 * inner, (mh, mp))),
    "bc_proj": ("in_proj.weight#2", *rows(2 * inner, 2 * inner + 2 * gn, bc_shape)),
    "dt_proj": ("in_proj.weight#3", *rows(2 * inner + 2 * gn, 2 * inner + 2 * gn + mh, (mh,))),
    "conv_x": ("conv1d.weight#0", *conv_rows(0, inner, (mh, mp))),
    "conv_bc": ("conv1d.weight#1", *conv_rows(inner, inner + 2 * gn, bc_shape)),
    "dt_bias": ("dt_bias", *ident),
    "A_log": ("A_log", *ident),
    "D": ("D", *ident),
    "norm": ("norm.weight", lambda w: w.reshape(mh, mp), lambda w: w.reshape(inner)),
    "out_proj": (
      "out_proj.weight",
      lambda w: w.T.reshape(mh, mp, d),
      lambda w: w.reshape(inner, d).T,
    ),
  }
  if cfg.use_conv_bias:
    mamba["conv_x_bias"] = ("conv1d.bias#0", *bias_rows(0, inner, (mh, mp)))
    mamba["conv_bc_bias"] = ("conv1d.bias#1", *bias_rows(inner, inner + 2 * gn, bc_shape))
  stacked = (lambda ws: np.stack([w.T for w in ws]), lambda w: [e.T for e in w])
  table = {
    ("embed",): ("backbone.embeddings.weight", *ident),
    ("final_norm",): ("backbone.norm_f.weight", *ident),
  }
  if not cfg.tie_word_embeddings:
    table[("lm_head",)] = ("lm_head.weight", *transpose)
  for i, kind in enumerate(cfg.layer_pattern):
    pre = f"backbone.layers.{i}."
    layer = {("norm",): ("norm.weight", *ident)}
    if kind == "*":
      layer[("mixer", "q_proj")] = ("mixer.q_proj.weight", *proj_in(h))
      layer[("mixer", "k_proj")] = ("mixer.k_proj.weight", *proj_in(kv))
      layer[("mixer", "v_proj")] = ("mixer.v_proj.weight", *proj_in(kv))
      layer[("mixer", "o_proj")] = (
        "mixer.o_proj.weight",
        lambda w: w.T.reshape(h, hd, d),
        lambda w: w.reshape(h * hd, d).T,
      )
    elif kind == "M":
      for name, (hf_name, *convert) in mamba.items():
        layer[("mixer", name)] = (f"mixer.{hf_name}", *convert)
    elif kind == "-":
      layer[("mixer", "up_proj")] = ("mixer.up_proj.weight", *transpose)
      layer[("mixer", "down_proj")] = ("mixer.down_proj.weight", *transpose)
    else:
      experts = range(cfg.num_experts)
      layer[("mixer", "router")] = ("mixer.gate.weight", *transpose)
      layer[("mixer", "score_bias")] = ("mixer.gate.e_score_correction_bias", *ident)
      for proj in ("up_proj", "down_proj"):
        names = tuple(f"mixer.experts.{e}.{proj}.weight" for e in experts)
        layer[("mixer", proj)] = (names, *stacked)
      if cfg.shared_expert_intermediate_size:
        layer[("mixer", "shared_up_proj")] = ("mixer.shared_experts.up_proj.weight", *transpose)
        layer[("mixer", "shared_down_proj")] = (
          "mixer.shared_experts.down_proj.weight",
          *transpose,
        )
    for path, (name, *convert) in layer.items():
      full = tuple(pre + n for n in name) if isinstance(name, tuple) else pre + name
      table[("layers", i, *path)] = (full, *convert)
  return table


GEMMA_ACTIVATION = "gelu_pytorch_tanh"


def _gemma_from_hf(hf: dict) -> dict:
  """ModelConfig's Gemma 3 fields from a `gemma3_text` `config.json`, and `full_rope`: the
  global layers' RoPE dict (transformers 5 writes `rope_parameters` per layer type; older
  files `rope_theta`, `rope_scaling` and `rope_local_base_freq`)."""
  act = hf.get("hidden_activation") or hf.get("hidden_act") or GEMMA_ACTIVATION
  if act != GEMMA_ACTIVATION:
    raise ValueError(
      f"config.json: hidden_activation={act!r} is not supported; allowed: {GEMMA_ACTIVATION!r}"
    )
  for field in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(field) is not None:  # Gemma 3's checkpoints have neither (Gemma 2's had both)
      raise ValueError(f"config.json: {field}={hf[field]} is not supported (only null)")
  for field in ("use_bidirectional_attention", "attention_bias"):
    if hf.get(field):
      raise ValueError(f"config.json: {field}=true is not supported for gemma3_text")
  layers = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types is None:
    pattern = hf.get("sliding_window_pattern", 6)
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
  else:
    full = dict(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
  local_type = local.get("rope_type", local.get("type", "default"))
  if local_type != "default":
    raise ValueError(
      f"config.json: rope_parameters.sliding_attention.rope_type={local_type!r} is not "
      "supported; allowed: 'default'"
    )
  full.setdefault("rope_theta", 1_000_000.0)
  return dict(
    full_rope=full,
    layer_types=tuple(types),
    sliding_window=hf.get("sliding_window"),
    rope_local_theta=float(local.get("rope_theta", 10_000.0)),
    query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
  )


def _mla_from_hf(hf: dict, model_type: str) -> dict:
  """ModelConfig's latent-attention fields from a DeepSeek-V3 `config.json`."""
  if model_type != "deepseek_v3":
    return {}
  for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    if field not in hf:
      raise ValueError(f"config.json: missing required field {field!r} for deepseek_v3")
  return dict(
    q_lora_rank=hf.get("q_lora_rank"),
    kv_lora_rank=hf["kv_lora_rank"],
    qk_nope_head_dim=hf["qk_nope_head_dim"],
    qk_rope_head_dim=hf["qk_rope_head_dim"],
    v_head_dim=hf["v_head_dim"],
    rope_interleave=bool(hf.get("rope_interleave", True)),
  )


def _moe_from_hf(hf: dict, model_type: str) -> dict:
  """ModelConfig's mixture-of-experts fields from a Qwen2-MoE / Qwen3-MoE / DeepSeek-V3
  `config.json`."""
  if model_type not in _MOE_TYPES:
    return {}
  if model_type == "deepseek_v3":
    moe_width = hf.get("moe_intermediate_size", 0)
    return dict(
      num_experts=hf.get("n_routed_experts", 0),
      num_experts_per_tok=hf.get("num_experts_per_tok", 0),
      moe_intermediate_size=moe_width,
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * moe_width,
      n_group=hf.get("n_group") or 1,
      topk_group=hf.get("topk_group") or 1,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
    )
  # transformers v5 writes Qwen3-MoE's `num_experts` as `num_local_experts`
  experts = hf.get("num_experts", hf.get("num_local_experts", 0))
  out = dict(
    num_experts=experts,
    num_experts_per_tok=hf.get("num_experts_per_tok", 0),
    moe_intermediate_size=hf.get("moe_intermediate_size", 0),
    norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    decoder_sparse_step=hf.get("decoder_sparse_step", 1),
    mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    # HF adds the balancing loss to its loss only with output_router_logits
    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001))
    if hf.get("output_router_logits")
    else 0.0,
    router_z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)),
  )
  if model_type == "qwen2_moe":
    out["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size", 0)
  return out


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
  """A `config.json` dict for transformers."""
  if cfg.hybrid:
    return _nemotron_to_hf(cfg, torch_dtype)
  rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
  rope["rope_theta"] = cfg.rope_theta
  out = {
    "architectures": [_HF_CLASSES[cfg.model_type]],
    "model_type": cfg.model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_parameters": rope,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "max_position_embeddings": cfg.max_position_embeddings,
    "torch_dtype": torch_dtype,
    "dtype": torch_dtype,
  }
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = dict(rope)
  if cfg.model_type == "llama":
    out["attention_bias"] = False
    out["mlp_bias"] = False
  if cfg.model_type in ("qwen3", "qwen3_moe"):
    out["attention_bias"] = cfg.qkv_bias
  if cfg.mla:
    out.update(_mla_to_hf(cfg))
    return out
  if cfg.gemma:
    del out["rope_theta"], out["hidden_act"]
    out.pop("rope_scaling", None)
    out.update(
      hidden_activation=GEMMA_ACTIVATION,
      rope_parameters={
        "full_attention": rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
      },
      layer_types=list(cfg.layer_types),
      sliding_window=cfg.sliding_window,
      query_pre_attn_scalar=cfg.query_pre_attn_scalar,
      final_logit_softcapping=None,
      attn_logit_softcapping=None,
      attention_bias=False,
    )
    return out
  if cfg.model_type == "qwen2_moe":
    out["qkv_bias"] = cfg.qkv_bias
    out["use_sliding_window"] = False
    out["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
  if cfg.model_type in _MOE_TYPES:
    out.update(
      num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.num_experts_per_tok,
      moe_intermediate_size=cfg.moe_intermediate_size,
      norm_topk_prob=cfg.norm_topk_prob,
      decoder_sparse_step=cfg.decoder_sparse_step,
      mlp_only_layers=list(cfg.mlp_only_layers),
      output_router_logits=cfg.router_aux_loss_coef > 0,
    )
    if cfg.router_aux_loss_coef > 0:
      out["router_aux_loss_coef"] = cfg.router_aux_loss_coef
    if cfg.router_z_loss_coef > 0:
      out["router_z_loss_coef"] = cfg.router_z_loss_coef
  return out


def _mla_to_hf(cfg: ModelConfig) -> dict:
  """DeepSeek-V3's own `config.json` fields (MLA, its router, the dense first layers)."""
  shared, width = cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size
  if width and shared % width:
    raise ValueError(
      f"ModelConfig.shared_expert_intermediate_size={shared} is not a multiple of "
      f"moe_intermediate_size={width} (HF's n_shared_experts)"
    )
  return dict(
    num_key_value_heads=cfg.num_heads,
    head_dim=cfg.qk_rope_head_dim,
    attention_bias=False,
    q_lora_rank=cfg.q_lora_rank,
    kv_lora_rank=cfg.kv_lora_rank,
    qk_nope_head_dim=cfg.qk_nope_head_dim,
    qk_rope_head_dim=cfg.qk_rope_head_dim,
    v_head_dim=cfg.v_head_dim,
    rope_interleave=cfg.rope_interleave,
    n_routed_experts=cfg.num_experts,
    num_experts_per_tok=cfg.num_experts_per_tok,
    moe_intermediate_size=width,
    n_shared_experts=shared // width if width else 0,
    norm_topk_prob=cfg.norm_topk_prob,
    n_group=cfg.n_group,
    topk_group=cfg.topk_group,
    routed_scaling_factor=cfg.routed_scaling_factor,
    first_k_dense_replace=cfg.first_k_dense_replace if cfg.num_experts else cfg.num_layers,
    num_nextn_predict_layers=0,
  )


# --- name and layout mapping -------------------------------------------------


def _param_map(cfg: ModelConfig) -> dict[tuple, tuple[str | tuple[str, ...], Callable, Callable]]:
  """jdistill state path → (HF tensor name, HF→ours, ours→HF).

  Expert weights are one jdistill tensor `[experts, ...]` from one HF tensor per expert (the
  per-expert names `save_pretrained` writes): the name is then a tuple and the converters
  take / return a list.
  """
  if cfg.hybrid:
    return _nemotron_param_map(cfg)
  h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  ident = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)

  def proj_in(heads):  # HF [heads*hd, d] ⇄ ours [d, heads, hd]
    return (lambda w: w.T.reshape(d, heads, hd), lambda w: w.reshape(d, heads * hd).T)

  def bias(heads):
    return (lambda w: w.reshape(heads, hd), lambda w: w.reshape(heads * hd))

  o_proj = (lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T)
  table = {
    ("embed",): ("model.embed_tokens.weight", *ident),
    ("final_norm",): ("model.norm.weight", *ident),
  }
  if not cfg.tie_word_embeddings:
    table[("lm_head",)] = ("lm_head.weight", *transpose)
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    layer = {
      ("input_norm",): ("input_layernorm.weight", *ident),
      ("post_attn_norm",): ("post_attention_layernorm.weight", *ident),
    }
    if cfg.gemma:
      layer[("pre_mlp_norm",)] = ("pre_feedforward_layernorm.weight", *ident)
      layer[("post_mlp_norm",)] = ("post_feedforward_layernorm.weight", *ident)
    if cfg.mla:
      layer.update(_mla_param_map(cfg))
    else:
      layer[("attn", "q_proj")] = ("self_attn.q_proj.weight", *proj_in(h))
      layer[("attn", "k_proj")] = ("self_attn.k_proj.weight", *proj_in(kv))
      layer[("attn", "v_proj")] = ("self_attn.v_proj.weight", *proj_in(kv))
      layer[("attn", "o_proj")] = ("self_attn.o_proj.weight", *o_proj)
    if cfg.is_moe_layer(i):
      layer.update(_moe_param_map(cfg, pre))
    else:
      layer[("mlp", "gate_proj")] = ("mlp.gate_proj.weight", *transpose)
      layer[("mlp", "up_proj")] = ("mlp.up_proj.weight", *transpose)
      layer[("mlp", "down_proj")] = ("mlp.down_proj.weight", *transpose)
    if cfg.qkv_bias:
      layer[("attn", "q_bias")] = ("self_attn.q_proj.bias", *bias(h))
      layer[("attn", "k_bias")] = ("self_attn.k_proj.bias", *bias(kv))
      layer[("attn", "v_bias")] = ("self_attn.v_proj.bias", *bias(kv))
    if cfg.qk_norm:
      layer[("attn", "q_norm")] = ("self_attn.q_norm.weight", *ident)
      layer[("attn", "k_norm")] = ("self_attn.k_norm.weight", *ident)
    for path, (name, *convert) in layer.items():
      full = tuple(pre + n for n in name) if isinstance(name, tuple) else pre + name
      table[("layers", i, *path)] = (full, *convert)
  return table


def _mla_param_map(cfg: ModelConfig) -> dict:
  """One latent-attention layer's entries (names relative to the layer)."""
  h, d = cfg.num_heads, cfg.hidden_size
  qk, kv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
  ident = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)

  def heads_out(rows, width):  # HF [heads*width, rows] ⇄ ours [rows, heads, width]
    return (lambda w: w.T.reshape(rows, h, width), lambda w: w.reshape(rows, h * width).T)

  dv = cfg.v_head_dim
  table = {
    ("attn", "kv_a_proj"): ("self_attn.kv_a_proj_with_mqa.weight", *transpose),
    ("attn", "kv_a_norm"): ("self_attn.kv_a_layernorm.weight", *ident),
    ("attn", "kv_b_proj"): ("self_attn.kv_b_proj.weight", *heads_out(cfg.kv_lora_rank, kv)),
    ("attn", "o_proj"): (
      "self_attn.o_proj.weight",
      lambda w: w.T.reshape(h, dv, d),
      lambda w: w.reshape(h * dv, d).T,
    ),
  }
  if cfg.q_lora_rank is None:
    table[("attn", "q_proj")] = ("self_attn.q_proj.weight", *heads_out(d, qk))
  else:
    table[("attn", "q_a_proj")] = ("self_attn.q_a_proj.weight", *transpose)
    table[("attn", "q_a_norm")] = ("self_attn.q_a_layernorm.weight", *ident)
    table[("attn", "q_b_proj")] = ("self_attn.q_b_proj.weight", *heads_out(cfg.q_lora_rank, qk))
  return table


def _moe_param_map(cfg: ModelConfig, pre: str) -> dict:
  """One sparse layer's entries (names relative to the layer)."""
  transpose = (lambda w: w.T, lambda w: w.T)
  # each HF expert is an nn.Linear `[out, in]`; ours stack `[experts, in, out]`
  stacked = (lambda ws: np.stack([w.T for w in ws]), lambda w: [e.T for e in w])

  def experts(proj):
    return tuple(f"mlp.experts.{e}.{proj}.weight" for e in range(cfg.num_experts))

  table = {
    ("mlp", "router"): ("mlp.gate.weight", *transpose),
    ("mlp", "gate_proj"): (experts("gate_proj"), *stacked),
    ("mlp", "up_proj"): (experts("up_proj"), *stacked),
    ("mlp", "down_proj"): (experts("down_proj"), *stacked),
  }
  if cfg.model_type == "deepseek_v3":
    table[("mlp", "score_bias")] = ("mlp.gate.e_score_correction_bias", lambda w: w, lambda w: w)
  shared = "shared_experts" if cfg.model_type == "deepseek_v3" else "shared_expert"
  if cfg.shared_expert_intermediate_size:
    table[("mlp", "shared_gate_proj")] = (f"mlp.{shared}.gate_proj.weight", *transpose)
    table[("mlp", "shared_up_proj")] = (f"mlp.{shared}.up_proj.weight", *transpose)
    table[("mlp", "shared_down_proj")] = (f"mlp.{shared}.down_proj.weight", *transpose)
  if cfg.shared_expert_intermediate_size and cfg.model_type == "qwen2_moe":
    table[("mlp", "shared_expert_gate")] = (
      "mlp.shared_expert_gate.weight",
      lambda w: w.reshape(-1),
      lambda w: w.reshape(1, -1),
    )
  return table


def _join_parts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Parts `name#0`, `name#1`, ... (one jdistill tensor each) → HF's fused `name`, concatenated
  on the first axis in part order."""
  out = {n: t for n, t in tensors.items() if "#" not in n}
  parts: dict[str, dict[int, np.ndarray]] = {}
  for name, t in tensors.items():
    if "#" in name:
      base, i = name.split("#")
      parts.setdefault(base, {})[int(i)] = t
  for base, pieces in parts.items():
    out[base] = np.ascontiguousarray(np.concatenate([pieces[i] for i in sorted(pieces)], axis=0))
  return out


def _path_key(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)


def _entries(table: dict, key: tuple, cfg: ModelConfig) -> list[tuple[str, Callable, Callable]]:
  """The `_param_map` entries behind one state path: one per layer for a scanned leaf (stacked
  on its leading axis: `transformer.stacked_layer_ids`), else the path's own."""
  stacked = stacked_layer_ids(cfg, key)
  if stacked is not None:
    ids, rest = stacked
    return [table[("layers", i, *rest)] for i in ids]
  return [table[key]]


@contextlib.contextmanager
def _open_safetensors(path: str):
  """`safe_open` whose errors (missing, truncated, not safetensors) name the file."""
  try:
    handle = safe_open(path, framework="numpy")
  except Exception as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  with handle as f:
    yield f


class _TensorReader:
  """Reads named tensors from a single or index-sharded safetensors directory."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    elif os.path.exists(single):
      with _open_safetensors(single) as f:
        self.files = {name: single for name in f.keys()}
    else:
      found = sorted(os.listdir(path))
      if any(n.endswith((".bin", ".pt", ".pth")) for n in found):
        raise ValueError(
          f"{path}: only safetensors weights are loaded (pickle files are never "
          f"read); found {found}"
        )
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ValueError(f"checkpoint is missing tensor {name!r}")
    with _open_safetensors(self.files[name]) as f:
      if name not in f.keys():
        raise ValueError(f"checkpoint index names tensor {name!r} but {self.files[name]} lacks it")
      try:
        return f.get_tensor(name)
      except Exception as e:  # a truncated or corrupt file: say which one
        raise ValueError(f"{self.files[name]}: cannot read tensor {name!r}: {e}") from e


def load_hf_config(path: str, **kw) -> ModelConfig:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path}: no config.json")
  with open(cfg_file) as f:
    return config_from_hf(json.load(f), **kw)


def from_hf(
  path: str,
  mesh: jax.sharding.Mesh | None = None,
  rules: shd.Rules = shd.DEFAULT_RULES,
  *,
  param_dtype: str = "float32",
  dtype: str = "float32",
  scan_layers: bool | None = None,
  remat_policy: str = "none",
) -> Transformer:
  """Loads a local HF checkpoint directory into a Transformer sharded on `mesh`.

  With `scan_layers` (None: auto by depth) each layer's tensors are stacked on the host
  into one `[layers, ...]` array."""
  cfg = load_hf_config(
    path, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy
  )
  mesh = mesh or shd.make_mesh({"data": -1}, jax.devices()[:1])
  graphdef, abstract = shd.abstract_sharded_state(
    lambda: Transformer(cfg, nnx.Rngs(0)), mesh, rules
  )
  reader = _TensorReader(path)
  table = _param_map(cfg)

  def load(path_, var):
    key = _path_key(path_)
    sds = var.get_value()
    stacked = stacked_layer_ids(cfg, key) is not None
    want = sds.shape[1:] if stacked else sds.shape
    parts = []
    for hf_name, to_ours, _ in _entries(table, key, cfg):
      if isinstance(hf_name, tuple):  # one tensor per expert, stacked on the expert axis
        host = np.asarray(to_ours([reader.get(n) for n in hf_name]))
        hf_name = hf_name[0].replace(".experts.0.", ".experts.*.")
      else:  # a part `name#i` of a fused HF tensor reads the whole tensor and slices it
        host = np.asarray(to_ours(reader.get(hf_name.split("#")[0])))
      if host.shape != want:
        raise ValueError(
          f"tensor {hf_name!r} has shape {host.shape} after conversion, "
          f"expected {want} from config.json"
        )
      parts.append(host.astype(sds.dtype))
    host = np.stack(parts) if stacked else parts[0]
    return var.replace(jax.make_array_from_callback(sds.shape, sds.sharding, lambda idx: host[idx]))

  state = jax.tree_util.tree_map_with_path(
    load, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def to_hf(
  model: Transformer,
  out_dir: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int | None = None,
  tokenizer=None,
) -> None:
  """Writes `config.json` + safetensors (split with an index above `max_shard_bytes`).

  Every process must call this (gathering is collective); only process 0 writes.
  """
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  table = _param_map(cfg)
  state = nnx.state(model, nnx.Param)
  tensors: dict[str, np.ndarray] = {}
  for path, var in jax.tree_util.tree_leaves_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    key = _path_key(path)
    # DeepSeek-V3's score-correction bias stays f32 (HF keeps it so: it only ranks experts,
    # and bf16 would reorder close scores)
    keep = key[-1] == "score_bias"
    host = _to_host(var.get_value()).astype(jnp.float32 if keep else jnp.dtype(dtype))
    stacked = stacked_layer_ids(cfg, key) is not None
    parts = host if stacked else [host]  # a scanned leaf: one tensor per layer
    for (hf_name, _, to_hf_layout), part in zip(_entries(table, key, cfg), parts, strict=True):
      if isinstance(hf_name, tuple):  # one tensor per expert
        tensors.update((n, np.ascontiguousarray(w)) for n, w in zip(hf_name, to_hf_layout(part)))
      else:
        tensors[hf_name] = np.ascontiguousarray(to_hf_layout(part))
  tensors = _join_parts(tensors)
  if jax.process_index() != 0:
    return
  # Written into a fresh folder beside `out_dir`, then renamed into place: an existing export
  # (say a sharded one) never leaves stale shards or a stale index behind.
  final_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(final_dir)
  os.makedirs(parent, exist_ok=True)
  out_dir = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".writing-", dir=parent)
  try:  # a failed write (a full disk) leaves neither the temporary folder nor a moved export
    os.chmod(out_dir, 0o755)  # mkdtemp's 0700 is for the temporary name only
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config_to_hf(cfg, torch_dtype=dtype), f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
      nbytes = tensors[name].nbytes
      if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = tensors[name]
      size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
      save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
      total = sum(t.nbytes for t in tensors.values())
      with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(out_dir)
    if os.path.exists(final_dir):
      old = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".replaced-", dir=parent)
      os.rename(final_dir, os.path.join(old, "old"))
      try:
        os.rename(out_dir, final_dir)
      except BaseException:
        os.rename(os.path.join(old, "old"), final_dir)  # the previous export back in place
        os.rmdir(old)
        raise
      shutil.rmtree(old)  # the previous export, replaced as asked
    else:
      os.rename(out_dir, final_dir)
  except BaseException:
    shutil.rmtree(out_dir, ignore_errors=True)
    raise
