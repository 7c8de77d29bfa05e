"""Teachers on their own devices: a sub-mesh per teacher, only hidden states cross.

A teacher with `teachers.<name>.devices = n > 0` keeps its params on a mesh of n devices of
its own (`jdistill.runtime.build.teacher_meshes`: `{fsdp: n}`, the rows split over them and
the params FSDP-sharded), loaded there once. Each step its compiled forward runs on that
mesh on its own rows of the batch and returns only the last hidden states `[rows, L-1,
d_model]` in `hidden_dtype`; they are copied to the training mesh with the step's batch
sharding (`sharding.move_rows`, device to device) and enter the step as a streamed
teacher's do (`teacher_cache`), where its unembedding `[d_model, vocab]`, the one piece of it
resident on the training mesh, rebuilds the logits chunk by chunk.

So the training mesh holds no teacher weights but the unembedding and runs no teacher layers;
the teacher's forward runs beside the student's step (dispatched when the batch is sampled:
with `rollout.devices` and `rollout.staleness` ≥ 1, while the training mesh runs the step
before). With `hidden_dtype` the teacher's compute dtype the loss equals the resident
teacher's (f32 rounding and reduction order aside).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.runtime import sharding as shd
from jdistill.step import common, streaming


@dataclasses.dataclass
class OwnDevicesTeacher:
  """One teacher whose params live on a mesh of its own.

  `state`: its `nnx.State`, on `mesh` (its devices); `unembed`: its `[d_model, vocab]` output
  matrix on the training mesh; `index`: its position in the step's `specs`; `rows`: its rows
  of the batch.
  """

  index: int
  graphdef: nnx.GraphDef
  state: nnx.State
  unembed: jax.Array
  hidden_dtype: str
  rows: tuple[int, ...]
  mesh: jax.sharding.Mesh
  _forward: object = dataclasses.field(default=None, repr=False)

  @classmethod
  def place(cls, index, graphdef, state, *, rows, hidden_dtype: str, training_mesh):
    """A teacher loaded on its own mesh (`state`'s) → with its unembedding copied to the
    training mesh (sharded as a resident teacher's: `[embed, vocab]`)."""
    unembed_of = lambda s: nnx.merge(graphdef, s).unembedding()  # noqa: E731
    unembed = jax.jit(unembed_of)(state)
    spec = shd.logical_to_spec(("embed", "vocab"), unembed.shape, training_mesh)
    unembed = jax.device_put(unembed, jax.sharding.NamedSharding(training_mesh, spec))
    mesh = jax.tree.leaves(state)[0].sharding.mesh
    return cls(index, graphdef, state, unembed, hidden_dtype, tuple(rows), mesh)

  def batch_shardings(self, batch: dict) -> dict:
    """Where the batch's arrays go on this teacher's mesh: rows split over its devices."""
    return {k: shd.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}

  def forward(self, batch_shardings: dict):
    """The compiled forward on this teacher's mesh: (state, batch) → hidden `[rows, L-1,
    d_model]` in `hidden_dtype`, its rows split over the mesh's devices."""
    if self._forward is None:
      graphdef, rows, dtype = self.graphdef, self.rows, jnp.dtype(self.hidden_dtype)

      def run(state, batch):
        hidden, _ = common.teacher_hidden(graphdef, state, common.shifted_inputs(batch), rows)
        return hidden.astype(dtype)

      self._forward = jax.jit(
        run,
        in_shardings=(jax.tree.map(lambda x: x.sharding, self.state), batch_shardings),
        out_shardings=streaming.hidden_sharding(self.mesh, len(self.rows)),
      )
    return self._forward

  def hidden(self, batch: dict, training_mesh) -> jax.Array:
    """This teacher's hidden states on `batch` (on the training mesh) → `[rows, L-1, D]` on
    the training mesh (`streaming.hidden_sharding`). Dispatches; does not wait."""
    shardings = self.batch_shardings(batch)
    mine = {k: shd.move_rows(v, shardings[k]) for k, v in batch.items()}
    hidden = self.forward(shardings)(self.state, mine)
    return shd.move_rows(hidden, streaming.hidden_sharding(training_mesh, len(self.rows)))

  def training_state(self):
    """A copy of the params on the training mesh (for the occasional probe that needs the
    whole model there)."""
    mesh = self.unembed.sharding.mesh
    return jax.device_put(self.state, shd.value_shardings(self.state, mesh))


def teacher_cache(teachers, batch: dict, training_mesh) -> dict:
  """Runs every teacher on its own devices → `{index: (hidden [S, L-1, D], unembed [D, V])}`
  on the training mesh, the train step's `teacher_cache` entries. `batch`: the step's batch
  arrays (no `teacher_layouts`)."""
  return {t.index: (t.hidden(batch, training_mesh), t.unembed) for t in teachers}
