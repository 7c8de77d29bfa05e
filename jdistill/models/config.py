"""Architecture config of the one decoder family jdistill runs (Llama 3, Qwen2, Qwen3, the
Qwen2-MoE / Qwen3-MoE mixture-of-experts variants, DeepSeek-V3's latent attention with
shared-expert MoE, Gemma 3's interleaved sliding-window and global attention, and Nemotron-H's
hybrid of Mamba-2, attention, MLP and MoE layers)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = (
  "llama",
  "qwen2",
  "qwen3",
  "qwen2_moe",
  "qwen3_moe",
  "deepseek_v3",
  "gemma3_text",
  "nemotron_h",
)
MOE_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v3", "nemotron_h")
# Nemotron-H's layer kinds (`ModelConfig.layer_pattern`, HF's `hybrid_override_pattern`)
LAYER_KINDS = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE"}
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Gemma 3's `layer_types` entries (HF's names)
LAYER_TYPES = ("full_attention", "sliding_attention")
MOE_DISPATCHES = ("ragged", "blocked", "dense")
# Names of `ModelConfig.remat_policy`; `transformer.checkpoint_policy` maps them to jax policies.
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "save_qkv_proj",
)
# `scan_layers=None` (auto) scans models with at least this many layers.
SCAN_MIN_LAYERS = 8


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a decoder-only transformer.

  `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of
  matmuls and activations (softmax, norms and logits are always float32).
  `rope_scaling` is a tuple of (key, value) pairs so the config stays hashable
  (it is a static argument of jitted functions).

  Mixture of experts (`num_experts > 0`): layer `i` is sparse unless `i` is in
  `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0` (HF's rule); dense layers
  keep the `intermediate_size` MLP. Each token goes to its `num_experts_per_tok` experts
  of width `moe_intermediate_size`; `shared_expert_intermediate_size > 0` adds Qwen2-MoE's
  sigmoid-gated shared expert. `moe_dispatch`: `blocked` (block-padded grouped matmul),
  `ragged` (`jax.lax.ragged_dot`) or `dense` (every expert on every token, a reference for
  tests); all three drop no token. The router coefficients weight the optional training losses
  (`jdistill.models.moe.aux_losses`); 0 turns them off.

  DeepSeek-V3 (`model_type="deepseek_v3"`): multi-head latent attention (MLA) replaces
  grouped-query attention (`num_kv_heads` and `head_dim` are unused): queries come from
  `hidden -> q_lora_rank -> heads x (qk_nope_head_dim + qk_rope_head_dim)` (`q_lora_rank=None`:
  one `hidden -> heads x ...` projection); keys and values from a `kv_lora_rank` latent and one
  shared `qk_rope_head_dim` RoPE key; values are `v_head_dim` wide. `rope_interleave`: the RoPE
  dims come in interleaved pairs (DeepSeek's checkpoints). Layers `i >= first_k_dense_replace`
  are sparse; their router scores are sigmoids, picked (with a score-correction bias that
  only selects) from the best `topk_group` of `n_group` expert groups, and scaled by
  `routed_scaling_factor`; `shared_expert_intermediate_size` is the ungated shared experts'
  width (HF's `n_shared_experts * moe_intermediate_size`).

  Gemma 3 (`model_type="gemma3_text"`, HF's text-only `Gemma3ForCausalLM`): layer `i` attends
  to the last `sliding_window` keys (itself included) when `layer_types[i]` is
  `"sliding_attention"`, with plain RoPE of base `rope_local_theta`; the `"full_attention"`
  layers use `rope_theta` and `rope_scaling`. Scores are scaled by `query_pre_attn_scalar **
  -0.5`; embeddings are multiplied by `sqrt(hidden_size)`; every RMSNorm scales by `(1 + w)`
  (the stored `w` is HF's); each block has four norms (input, post-attention, pre- and
  post-feedforward), q/k norms, and a GELU-tanh gated MLP. Gemma 3 layers are never scanned
  (local and global layers carry caches of different lengths).

  Nemotron-H (`model_type="nemotron_h"`): `layer_pattern` holds one character per layer (HF's
  `hybrid_override_pattern`): `M` a Mamba-2 mixer (`jdistill.models.mamba2`), `*` grouped-query
  attention without RoPE, `-` a squared-ReLU MLP (`up`, `down`; `intermediate_size`), `E` a
  MoE of squared-ReLU experts routed as DeepSeek-V3's (sigmoid, score-correction bias, groups)
  plus an ungated shared expert of `shared_expert_intermediate_size`; each layer is one
  pre-norm residual mixer. The Mamba-2 mixer has `mamba_num_heads` heads of `mamba_head_dim`,
  `mamba_n_groups` groups of B/C of `ssm_state_size`, a causal depthwise conv of `conv_kernel`
  taps, and scans in chunks of `mamba_chunk_size` tokens; `time_step_limit` clamps its dt.

  `scan_layers`: stack the blocks' params on a leading `layers` axis and run them under
  `jax.lax.scan` (one block compiled instead of `num_layers`; layers of two kinds or more,
  as Nemotron-H's pattern or DeepSeek-V3's dense first layers, as runs of a repeated unit,
  one scan each: `jdistill.models.layer_runs`; never Gemma 3's). `None` (auto) is resolved
  once, in `__post_init__`, to `num_layers >= SCAN_MIN_LAYERS`, so the stored value is a
  bool and `model_config.json` records the layout. `remat_policy`: what each block keeps for
  the backward pass (`none`: everything, no remat; `full`: nothing, recompute the block;
  `dots_saveable` / `dots_with_no_batch_dims_saveable`: the matmul outputs (the jax
  policies of those names); `save_qkv_proj`: only the q/k/v projections).
  """

  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768  # carried through HF import/export; not enforced
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  attention_chunk: int = 0  # > 0: cache-less attention in blocks of this many queries
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  shared_expert_intermediate_size: int = 0
  moe_dispatch: str = "blocked"
  router_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0
  scan_layers: bool | None = None
  remat_policy: str = "none"
  # DeepSeek-V3 (MLA and its router); see the class docstring
  q_lora_rank: int | None = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = False
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  first_k_dense_replace: int = 0
  # Gemma 3 (interleaved local / global attention); see the class docstring
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  rope_local_theta: float = 10000.0
  query_pre_attn_scalar: float | None = None
  # Nemotron-H (the hybrid pattern and its Mamba-2 mixers); see the class docstring
  layer_pattern: str = ""
  mamba_num_heads: int = 0
  mamba_head_dim: int = 0
  ssm_state_size: int = 0
  mamba_n_groups: int = 1
  conv_kernel: int = 4
  mamba_chunk_size: int = 128
  use_conv_bias: bool = True
  time_step_limit: tuple[float, float] = (0.0, float("inf"))

  def __post_init__(self):
    self.validate()
    if self.scan_layers is None:
      auto = self.num_layers >= SCAN_MIN_LAYERS and not self.gemma
      object.__setattr__(self, "scan_layers", auto)
    elif self.scan_layers and self.gemma:
      raise ValueError(
        "ModelConfig.scan_layers=True is invalid for model_type='gemma3_text' (its sliding and "
        "global layers hold caches of different lengths); allowed: False or None (auto)"
      )

  def validate(self) -> None:
    def bad(field, value, allowed):
      raise ValueError(f"ModelConfig.{field}={value!r} is invalid; allowed: {allowed}")

    if self.model_type not in MODEL_TYPES:
      bad("model_type", self.model_type, MODEL_TYPES)
    for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
    ):
      value = getattr(self, name)
      if not _is_positive_int(value):
        bad(name, value, "a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad(
        "num_kv_heads",
        self.num_kv_heads,
        f"a divisor of num_heads={self.num_heads} (grouped-query attention)",
      )
    if self.rope_theta <= 0:
      bad("rope_theta", self.rope_theta, "a positive float")
    if self.rms_norm_eps <= 0:
      bad("rms_norm_eps", self.rms_norm_eps, "a positive float")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        bad(name, getattr(self, name), DTYPES)
    if not (self.scan_layers is None or isinstance(self.scan_layers, bool)):
      bad("scan_layers", self.scan_layers, f"None (auto: from {SCAN_MIN_LAYERS} layers) or a bool")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", self.remat_policy, REMAT_POLICIES)
    rope = self.rope_dict
    if rope is not None:
      rope_type = rope.get("rope_type", "default")
      if rope_type not in ROPE_TYPES:
        bad("rope_scaling.rope_type", rope_type, ROPE_TYPES)
      needed = {
        "linear": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings"),
        "llama3": (
          "factor",
          "low_freq_factor",
          "high_freq_factor",
          "original_max_position_embeddings",
        ),
      }.get(rope_type, ())
      for key in needed:
        if key not in rope:
          raise ValueError(f"ModelConfig.rope_scaling: rope_type={rope_type!r} needs {key!r}")

    if not isinstance(self.attention_chunk, int) or self.attention_chunk < 0:
      bad("attention_chunk", self.attention_chunk, "an integer >= 0 (0: one block)")
    self._validate_mla(bad)
    self._validate_hybrid(bad)
    self._validate_moe(bad)
    self._validate_gemma(bad)

  def _validate_gemma(self, bad) -> None:
    if not self.gemma:
      for name in ("layer_types", "sliding_window", "query_pre_attn_scalar"):
        if getattr(self, name) not in ((), None):
          bad(name, getattr(self, name), "unset unless model_type='gemma3_text'")
      return
    types = self.layer_types
    if not isinstance(types, tuple) or len(types) != self.num_layers:
      bad("layer_types", types, f"a tuple of num_layers={self.num_layers} entries of {LAYER_TYPES}")
    if any(t not in LAYER_TYPES for t in types):
      bad("layer_types", types, f"entries of {LAYER_TYPES}")
    window = self.sliding_window
    if "sliding_attention" in types and not _is_positive_int(window):
      bad("sliding_window", window, "a positive integer (layer_types has sliding layers)")
    if self.rope_local_theta <= 0:
      bad("rope_local_theta", self.rope_local_theta, "a positive float")
    scalar = self.query_pre_attn_scalar
    if scalar is not None and not scalar > 0:
      bad("query_pre_attn_scalar", scalar, "None (head_dim) or a positive number")
    if self.num_experts or self.qkv_bias:
      name = "num_experts" if self.num_experts else "qkv_bias"
      bad(name, getattr(self, name), "0 / False for model_type='gemma3_text'")
    if not self.qk_norm:  # every Gemma 3 attention has q/k norms (HF's export needs them)
      bad("qk_norm", self.qk_norm, "True for model_type='gemma3_text'")

  def _validate_hybrid(self, bad) -> None:
    if not self.hybrid:
      if self.layer_pattern:
        bad("layer_pattern", self.layer_pattern, "'' (only model_type='nemotron_h' has one)")
      return
    pattern = self.layer_pattern
    if (
      not isinstance(pattern, str)
      or len(pattern) != self.num_layers
      or set(pattern) - set(LAYER_KINDS)
    ):
      bad("layer_pattern", pattern, f"num_layers={self.num_layers} characters of {LAYER_KINDS}")
    if ("E" in pattern) != (self.num_experts > 0):
      bad("num_experts", self.num_experts, "> 0 exactly when layer_pattern has an 'E' layer")
    if "M" not in pattern:
      return
    for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "mamba_n_groups"):
      value = getattr(self, name)
      if not _is_positive_int(value):
        bad(name, value, "a positive integer (layer_pattern has 'M' layers)")
    if self.mamba_num_heads % self.mamba_n_groups:
      bad(
        "mamba_n_groups",
        self.mamba_n_groups,
        f"a divisor of mamba_num_heads={self.mamba_num_heads}",
      )
    if not isinstance(self.conv_kernel, int) or self.conv_kernel < 2:
      bad("conv_kernel", self.conv_kernel, "an integer >= 2")
    if not _is_positive_int(self.mamba_chunk_size):
      bad("mamba_chunk_size", self.mamba_chunk_size, "a positive integer")
    low, high = self.time_step_limit
    if not 0 <= low < high:
      bad("time_step_limit", self.time_step_limit, "(low, high) with 0 <= low < high")

  def _validate_mla(self, bad) -> None:
    if not self.mla:
      return
    q = self.q_lora_rank
    if q is not None and not _is_positive_int(q):
      bad("q_lora_rank", q, "None (a full-rank query projection) or a positive integer")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      value = getattr(self, name)
      if not _is_positive_int(value):
        bad(name, value, "a positive integer (model_type='deepseek_v3')")
    if self.qk_rope_head_dim % 2:
      bad("qk_rope_head_dim", self.qk_rope_head_dim, "an even integer (RoPE rotates pairs)")
    if self.qkv_bias or self.qk_norm:
      bad("qkv_bias" if self.qkv_bias else "qk_norm", True, "False for model_type='deepseek_v3'")

  def _validate_moe(self, bad) -> None:
    if self.moe_dispatch not in MOE_DISPATCHES:
      bad("moe_dispatch", self.moe_dispatch, MOE_DISPATCHES)
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
      if getattr(self, name) < 0:
        bad(name, getattr(self, name), "a float >= 0")
    if not isinstance(self.num_experts, int) or self.num_experts < 0:
      bad("num_experts", self.num_experts, "an integer >= 0 (0: a dense model)")
    if self.num_experts == 0:
      return
    if self.model_type not in MOE_TYPES:
      bad("model_type", self.model_type, f"one of {MOE_TYPES} when num_experts > 0")
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      bad("num_experts_per_tok", self.num_experts_per_tok, f"1..num_experts={self.num_experts}")
    if not _is_positive_int(self.moe_intermediate_size):
      bad("moe_intermediate_size", self.moe_intermediate_size, "a positive integer")
    if not _is_positive_int(self.decoder_sparse_step):
      bad("decoder_sparse_step", self.decoder_sparse_step, "a positive integer")
    if not isinstance(self.mlp_only_layers, tuple) or any(
      not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.mlp_only_layers
    ):
      allowed = f"a tuple of layer indices in [0, {self.num_layers})"
      bad("mlp_only_layers", self.mlp_only_layers, allowed)
    shared = self.shared_expert_intermediate_size
    if not isinstance(shared, int) or shared < 0:
      bad("shared_expert_intermediate_size", shared, "an integer >= 0")
    first = self.first_k_dense_replace
    if not isinstance(first, int) or not 0 <= first <= self.num_layers:
      bad("first_k_dense_replace", first, f"an integer in [0, num_layers={self.num_layers}]")
    if self.model_type not in ("deepseek_v3", "nemotron_h"):
      return
    if self.router_aux_loss_coef or self.router_z_loss_coef:
      name = "router_aux_loss_coef" if self.router_aux_loss_coef else "router_z_loss_coef"
      bad(name, getattr(self, name), "0 for deepseek_v3 and nemotron_h (sigmoid routers)")
    groups, top = self.n_group, self.topk_group
    if not _is_positive_int(groups) or self.num_experts % groups:
      bad("n_group", groups, f"a positive divisor of num_experts={self.num_experts}")
    if not isinstance(top, int) or not 1 <= top <= groups:
      bad("topk_group", top, f"1..n_group={groups}")
    if self.num_experts // groups < 2:
      bad("n_group", groups, "at most num_experts / 2 (a group scores its best two experts)")
    if self.num_experts_per_tok > top * (self.num_experts // groups):
      bad("num_experts_per_tok", self.num_experts_per_tok, "at most the kept groups' experts")

  @property
  def uniform_layers(self) -> bool:
    """Whether every layer is the same kind of block (all dense or all sparse; Gemma 3's
    never, as its layers' caches differ; Nemotron-H's never, its blocks are built per kind).
    Scanned, a stack of two kinds or more runs as runs of a repeated unit (`scanned_runs`)."""
    return (
      not self.gemma
      and not self.hybrid
      and len({self.is_moe_layer(i) for i in range(self.num_layers)}) == 1
    )

  @property
  def gemma(self) -> bool:
    """Whether the blocks are Gemma 3's (`jdistill.models.transformer.GemmaBlock`)."""
    return self.model_type == "gemma3_text"

  def is_sliding_layer(self, i: int) -> bool:
    """Whether layer `i` attends to a `sliding_window` of keys (Gemma 3's local layers)."""
    return self.gemma and self.layer_types[i] == "sliding_attention"

  @property
  def hybrid(self) -> bool:
    """Whether the layers are Nemotron-H's mixers of `layer_pattern`'s kinds."""
    return self.model_type == "nemotron_h"

  @property
  def rope(self) -> bool:
    """Whether attention rotates q and k (Nemotron-H's attention has no positional encoding)."""
    return not self.hybrid

  @property
  def scanned_runs(self) -> bool:
    """Whether the layers are scanned as runs of a repeated unit of `layer_kinds`
    (`jdistill.models.layer_runs`): scanned, and of two kinds or more (or Nemotron-H's)."""
    return bool(self.scan_layers) and not self.uniform_layers

  @property
  def layer_kinds(self) -> str:
    """One character per layer: Nemotron-H's `layer_pattern`; else `-` for a dense block and
    `E` for a sparse (MoE) one."""
    if self.hybrid:
      return self.layer_pattern
    return "".join("E" if self.is_moe_layer(i) else "-" for i in range(self.num_layers))

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer `i` is sparse (HF's `mlp_only_layers` / `decoder_sparse_step` /
    `first_k_dense_replace` rules; Nemotron-H: an `E` in `layer_pattern`)."""
    if self.hybrid:
      return self.layer_pattern[i] == "E"
    return (
      self.num_experts > 0
      and i >= self.first_k_dense_replace
      and i not in self.mlp_only_layers
      and (i + 1) % self.decoder_sparse_step == 0
    )

  @property
  def mla(self) -> bool:
    """Whether attention is DeepSeek's multi-head latent attention (`jdistill.models.mla`)."""
    return self.model_type == "deepseek_v3"

  @property
  def rope_dim(self) -> int:
    """The width RoPE rotates: `qk_rope_head_dim` under MLA, else `head_dim`."""
    return self.qk_rope_head_dim if self.mla else self.head_dim

  @property
  def rope_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)
