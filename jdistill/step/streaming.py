"""Streamed teachers: params parked in host memory, on the mesh one teacher at a time.

DeepSeek V4's placement for teachers that do not all fit next to the student. Before
each train step, the streamed teachers run one after another, ordered by teacher: each
one's compiled forward takes its params from pinned host memory (`memory_kind=
"pinned_host"`), moves them onto the mesh inside the program (`jax.device_put` to the
device memory kind, which XLA frees when the forward ends) and returns only the last
hidden states of its own rows, `[rows, L-1, d_model]` in `hidden_dtype` (bfloat16 by
default). The train step then rebuilds that teacher's logits chunk by chunk from the
cached hidden states and its unembedding `[d_model, vocab]`, which alone stays resident.

The programs run in order on the devices, so at most one streamed teacher's params are
in device memory at a time; a resident teacher (`common.teacher_hidden`) and a
streamed one give the same hidden states when `hidden_dtype` is the teacher's compute
dtype, hence the same loss and gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.runtime import sharding as shd
from jdistill.step import common

PLACEMENTS = ("resident", "streamed")


def host_shardings(state):
  """The state's shardings with the pinned-host memory kind (same partition specs)."""
  return jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), state)


def device_shardings(state):
  return jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), state)


@dataclasses.dataclass
class StreamedTeacher:
  """One teacher whose params live in host memory between steps.

  `host_state`: its `nnx.State`, every leaf in pinned host memory; `unembed`: its
  `[d_model, vocab]` output matrix, resident on the mesh; `index`: its position in the
  step's `specs`.
  """

  index: int
  graphdef: nnx.GraphDef
  host_state: nnx.State
  unembed: jax.Array
  hidden_dtype: str
  rows: tuple[int, ...]
  _forward: object = dataclasses.field(default=None, repr=False)

  @classmethod
  def park(cls, index, graphdef, state, *, rows, hidden_dtype: str, mesh) -> StreamedTeacher:
    """Moves a loaded teacher's device state to pinned host memory; keeps its unembedding."""
    unembed_of = lambda s: nnx.merge(graphdef, s).unembedding()  # noqa: E731
    shape = jax.eval_shape(unembed_of, state).shape
    spec = shd.logical_to_spec(("embed", "vocab"), shape, mesh)
    unembed = jax.jit(unembed_of, out_shardings=jax.sharding.NamedSharding(mesh, spec))(state)
    host_state = jax.device_put(state, host_shardings(state))
    jax.tree.map(lambda x: x.delete(), state)  # the device copy is gone from here on
    return cls(index, graphdef, host_state, unembed, hidden_dtype, tuple(rows))

  def forward(self, batch_shardings: dict, hidden_sharding):
    """The compiled forward: (host state, batch) → hidden `[rows, L-1, d_model]`.

    Its rows are an argument of the program (`shared_forward`), so every streamed teacher
    of one graphdef, row count and hidden dtype runs the same compiled program."""
    if self._forward is None:
      run = shared_forward(
        self.graphdef,
        self.hidden_dtype,
        host_shardings(self.host_state),
        batch_shardings,
        hidden_sharding,
      )
      replicated = jax.sharding.NamedSharding(hidden_sharding.mesh, jax.sharding.PartitionSpec())
      rows = jax.device_put(jnp.asarray(self.rows, jnp.int32), replicated)
      self._forward = lambda host_state, batch: run(host_state, batch, rows)
    return self._forward

  def device_state(self):
    """A device copy of the params (for the occasional probe that needs the whole model)."""
    return jax.device_put(self.host_state, device_shardings(self.host_state))


_FORWARDS: dict = {}  # (graphdef, dtype, shardings) -> the jitted forward they share


def shared_forward(graphdef, hidden_dtype: str, host_state_shardings, batch_shardings, hidden_out):
  """The jitted streamed forward `(host state, batch, rows int32 [S]) → hidden [S, L-1, D]`,
  one per graphdef, hidden dtype and shardings: teachers that differ only in their params
  and rows share it (one compile for all, where a program per teacher compiled N times)."""
  leaves, treedef = jax.tree.flatten(host_state_shardings)
  key = (graphdef, hidden_dtype, treedef, tuple(leaves), tuple(sorted(batch_shardings.items())))
  key += (hidden_out,)
  if key not in _FORWARDS:
    on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), host_state_shardings)
    dtype = jnp.dtype(hidden_dtype)

    def run(host_state, batch, rows):
      state = jax.device_put(host_state, on_device)
      x = common.shifted_inputs(batch)
      take = lambda a: jnp.take(a, rows, axis=0)  # noqa: E731
      teacher = nnx.merge(graphdef, state)
      hidden, _ = teacher(take(x["inputs"]), take(x["positions"]), kv_mask=take(x["kv_mask"]))
      return hidden.astype(dtype)

    replicated = jax.sharding.NamedSharding(hidden_out.mesh, jax.sharding.PartitionSpec())
    _FORWARDS[key] = jax.jit(
      run,
      in_shardings=(host_state_shardings, batch_shardings, replicated),
      out_shardings=hidden_out,
    )
  return _FORWARDS[key]


def hidden_sharding(mesh, rows: int):
  """`[rows, L-1, D]` hidden states: rows over the data axes where they divide, else replicated."""
  if rows % shd.data_parallel_size(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return shd.batch_sharding(mesh, 3)


def teacher_cache(streamed, batch: dict, batch_shardings: dict, mesh) -> dict:
  """Runs every streamed teacher in turn → `{index: (hidden [S, L-1, D], unembed [D, V])}`,
  the train step's `teacher_cache`."""
  out = {}
  for teacher in streamed:
    forward = teacher.forward(batch_shardings, hidden_sharding(mesh, len(teacher.rows)))
    hidden = forward(teacher.host_state, batch)
    out[teacher.index] = (hidden, teacher.unembed)
  return out
