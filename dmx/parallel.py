"""Data parallelism for DiffMask: the train step over a 1-D ``data`` mesh.

The global batch is split over the mesh's ``data`` axis; the train state and
the frozen model's parameters are replicated. The step is the ordinary
:func:`dmx.train.make_train_step` run under ``jax.shard_map`` with explicit
``lax.pmean`` of the gradients, of the constraint statistics that drive the
Lagrange multipliers and of the metrics: what ``pmap`` used to do, written
out. Gate noise is drawn for the global batch and sliced per shard, so a run
on N devices takes the same steps as a run on one device with the same
global batch (up to the order of floating-point sums).

Across hosts, call ``jax.distributed.initialize()`` first: :func:`data_mesh`
then spans every process's devices, and :func:`shard_batch` assembles the
global batch from each process's local rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dmx import train
from dmx.models.base import MaskableModel

DATA_AXIS = 'data'


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError('a data mesh needs at least one device')
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state and the frozen parameters: a full copy per device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: the leading (example) axis split over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Puts every array of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
  """Splits a batch (a pytree of ``(batch, ...)`` arrays) over the ``data`` axis.

  On one host ``batch`` is the global batch; with several processes each
  passes its own rows (``global batch / process count``), in process order.
  Raises ValueError when the rows do not divide evenly over the devices.
  """
  sharding = batch_sharding(mesh)
  num_shards = mesh.shape[DATA_AXIS]
  num_processes = jax.process_count()

  def put(array):
    array = np.asarray(array)
    global_rows = array.shape[0] * num_processes
    if global_rows % num_shards:
      raise ValueError(f'a global batch of {global_rows} rows does not split over '
                       f'{num_shards} devices; use a multiple of {num_shards}')
    return jax.make_array_from_process_local_data(sharding, array)

  return jax.tree_util.tree_map(put, batch)


def make_parallel_train_step(model: MaskableModel, probe: nn.Module, config: train.DiffMaskConfig,
                             mesh: Mesh) -> Callable[[train.DiffMaskState, Any, dict, jax.Array],
                                                     tuple[train.DiffMaskState, dict]]:
  """The jitted data-parallel step ``(state, frozen_params, batch, key) -> (state, metrics)``.

  ``state``, ``frozen_params`` and ``key`` are replicated, ``batch`` sharded
  along ``data`` (:func:`shard_batch`); the new state and the metrics come
  back replicated. The state is donated, the frozen parameters never are.
  """
  num_shards = mesh.shape[DATA_AXIS]
  step = train.make_train_step(model, probe, config, axis_name=DATA_AXIS, num_shards=num_shards)
  replicated_spec, sharded_spec = PartitionSpec(), PartitionSpec(DATA_AXIS)
  sharded_step = jax.shard_map(
      step, mesh=mesh, in_specs=(replicated_spec, replicated_spec, sharded_spec, replicated_spec),
      out_specs=(replicated_spec, replicated_spec),
      # models scan from constant initial carries (zeros) that vma typing would
      # want cast to 'varying'; replication is guaranteed by the explicit pmeans
      check_vma=False)
  return jax.jit(sharded_step, donate_argnums=0)
