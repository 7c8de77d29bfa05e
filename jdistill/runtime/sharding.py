"""Device mesh, logical-axis rules → PartitionSpecs, and directly-sharded model creation.

Parameters carry `logical_axes` metadata (e.g. `("embed", "mlp")`); a rule list
maps each logical name to a mesh axis (or a tuple of mesh axes, or None). A
dimension that a mesh axis does not divide is replicated instead, and a mesh axis
is used at most once per array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Batch over data-parallel axes; weights FSDP-sharded on `embed`, Megatron-style
# tensor parallel on heads / mlp / vocab. Mixture-of-experts weights are split by expert
# over an `expert` mesh axis, which also carries batch rows outside the experts (expert
# parallelism). A mesh without some axis (say `expert`) leaves those dimensions replicated.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
  ("batch", ("data", "fsdp", "expert")),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("expert", "expert"),
  ("moe_mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("latent", None),  # MLA's low-rank q / kv latents (every head reads all of it)
  ("norm", None),
  ("seq", None),
  ("layers", None),  # the stacked axis of scanned layers: every device holds every layer
)


def make_mesh(
  axes: Sequence[tuple[str, int]] | dict[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Mesh with the named axes; at most one size may be -1 ("the rest of the devices")."""
  items = list(axes.items()) if isinstance(axes, dict) else list(axes)
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in items]
  sizes = [int(size) for _, size in items]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axes: duplicate axis name in {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes: at most one axis may be -1, got {dict(items)}")
  for name, size in zip(names, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh axes: size of {name!r} is {size}; allowed: a positive integer or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"mesh axes {dict(items)}: {len(devices)} devices are not divisible by {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh axes {dict(zip(names, sizes))} multiply to {math.prod(sizes)}, "
      f"but there are {len(devices)} devices"
    )
  return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def logical_to_spec(
  logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> P:
  """PartitionSpec for an array with these logical axis names on this mesh."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    kept = tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in kept)
    if not kept or dim % size:
      spec.append(None)  # replicate rather than fail on an indivisible dimension
      continue
    used.update(kept)
    spec.append(kept[0] if len(kept) == 1 else kept)
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding per leaf of an nnx State; leaves without `logical_axes` are replicated."""

  def one(var):
    axes = getattr(var, "logical_axes", None)
    shape = var.shape
    spec = P() if axes is None else logical_to_spec(axes, shape, mesh, rules)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def value_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """`state_shardings` as plain NamedShardings (the Variables' values): what `jax.device_put`
  of a state onto another mesh (the sampler's, a teacher's own) takes."""
  return jax.tree.map(
    lambda v: v.get_value(), state_shardings(state, mesh, rules), is_leaf=_is_variable
  )


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """Number of shards of the batch dimension (product of the `batch` rule's mesh axes)."""
  axes = dict(rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a `[batch, ...]` array: batch over the data axes, rest replicated."""
  table = dict(rules)
  axes = table.get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  kept = tuple(a for a in axes if a in mesh.shape)
  first = None if not kept else (kept[0] if len(kept) == 1 else kept)
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def create_sharded(
  constructor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> nnx.Module:
  """Builds a module whose parameters are created directly in their shards.

  `nnx.eval_shape` gives the abstract state; a jitted init with `out_shardings`
  then materialises each parameter only as its shards (no full host copy).
  """
  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.split(constructor())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_sharded_state(
  constructor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES
):
  """(graphdef, abstract state of ShapeDtypeStructs carrying their NamedShardings)."""
  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)
  sds = jax.tree.map(
    lambda var, sh: var.replace(
      jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh.get_value())
    ),
    abstract_state,
    shardings,
    is_leaf=_is_variable,
  )
  return graphdef, sds


def optimizer_shardings(optimizer, params, replicated):
  """Shardings of the optimizer state: moments like their parameter, scalars replicated."""
  by_path = {
    tuple(map(str, path)): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)
  }

  def one(path, leaf):
    path = tuple(map(str, path))
    for i in range(len(path)):
      if path[i:] in by_path and leaf.ndim:
        return by_path[path[i:]]
    return replicated

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, params))


def move_rows(x: jax.Array, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """`x` `[B, ...]`, its rows split over some devices, → `sharding` (its rows split over
  other devices), copied shard by shard from device to device.

  `jax.device_put` across meshes whose shards do not match one to one went through the
  host and blocked until the sampler had finished (measured on 2 + 6 devices). Used for the
  sampler's batches (`rollout.devices`) and the hidden states of a teacher on its own devices."""
  sources = {}  # row range -> one device's copy of those rows
  for shard in x.addressable_shards:
    rows = shard.index[0].indices(x.shape[0])[:2]
    sources.setdefault(rows, shard.data)
  pieces = []
  for device, index in sharding.addressable_devices_indices_map(x.shape).items():
    start, stop = index[0].indices(x.shape[0])[:2]
    parts = [
      jax.device_put(data[max(start, lo) - lo : min(stop, hi) - lo], device)
      for (lo, hi), data in sorted(sources.items())
      if max(start, lo) < min(stop, hi)
    ]
    pieces.append(parts[0] if len(parts) == 1 else jax.numpy.concatenate(parts))
  return jax.make_array_from_single_device_arrays(x.shape, sharding, pieces)
