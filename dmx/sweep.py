"""Sweeps: K DiffMask probes trained in one compiled program.

The members of a sweep differ in their seed (probe initialisation and the
stream of depth and gate samples) and, optionally, in their margin; they see
the same batches. Their train states are stacked on a leading ``member`` axis
and one ``vmap``-ed :func:`dmx.train.make_train_step` advances all of them, so
the paper's stability experiment (the spread of attributions over 5 seeds) is
a single program instead of 5 runs.

Depths, and what they cost. Under ``vmap`` a depth that differs between
members turns a model's "resume at the injection point" branch into a select
that runs every branch: for hidden gates each member then pays for the
masked pass from every depth, and one program can cost more than K runs
(1.15x on the toy task, docs/BENCHMARKS.md). With a ``depth_key`` the members
share one depth per step, drawn from ``fold_in(depth_key, t)``; the depth is
then one value for the whole program and the branch stays a branch. The
members still differ in initialisation and gate noise; what they share is
the order in which depths are visited (common random numbers). A member is
then the run :func:`dmx.train.fit` makes with the same ``depth_key``.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dmx import attribute, probes, train
from dmx import checkpoint as checkpoints
from dmx.models.base import MaskableModel


def member_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(probe_key, run_key)`` of the member with ``seed``: its probe initialisation and step stream."""
  probe_key, run_key = jax.random.split(jax.random.key(seed))
  return probe_key, run_key


def init_sweep(model: MaskableModel, frozen_params, probe: nn.Module,
               config: train.DiffMaskConfig, batch: dict, seeds: Sequence[int],
               baselines: Sequence[jax.Array] = ()) -> train.DiffMaskState:
  """Stacked fresh train states, one per seed: every leaf gets a leading ``(K,)`` axis.

  ``baselines``: ``(dim_k,)`` vectors where the probe's first baselines start
  (:func:`dmx.probes.set_baselines`; ``dmx diffmask`` takes them from
  :func:`dmx.pipelines.diffmask_text.initial_baselines`), the same for every
  member; ``()`` keeps the probe's own initialisation.
  """
  if not seeds:
    raise ValueError('a sweep needs at least one seed')
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds must be distinct, got {list(seeds)}')
  # frozen parameters and batch go in as arguments: closed over, jit would bake them in
  init = jax.jit(lambda frozen, key, batch: train.init_probe_params(key, model, probe, frozen,
                                                                     batch))
  states = []
  for seed in seeds:
    params = probes.set_baselines(init(frozen_params, member_keys(seed)[0], batch), baselines)
    states.append(train.init_state(config, params, len(model.state_dims)))
  return stack_members(states)


def make_sweep_step(model: MaskableModel, probe: nn.Module, config: train.DiffMaskConfig,
                    margins: Sequence[float] | None = None):
  """The jitted step ``(states, frozen_params, batch, keys, depth_key) -> (states, metrics)`` of K members.

  ``states`` and ``keys`` ``(K,)`` carry the member axis; ``batch`` and the
  frozen parameters are shared. ``depth_key``: ``None`` (each member samples
  its depth from its own key) or the key whose ``fold_in`` with the step
  number draws the one depth every member trains (:func:`fit_sweep`). With
  ``margins`` (one per member) member k trains with margin ``margins[k]``;
  everything else comes from ``config``. Metrics come back with a leading
  ``(K,)`` axis.
  """
  step = train.make_train_step(model, probe, config)
  if margins is None:
    margins = jnp.full((), config.margin, jnp.float32)
    margin_axis = None
  else:
    margins = jnp.asarray(margins, jnp.float32)
    if not bool(jnp.all(margins >= 0)):
      raise ValueError(f'margins must be >= 0, got {margins.tolist()}')
    margin_axis = 0
  vmapped = jax.vmap(step, in_axes=(0, None, None, 0, margin_axis, None))

  def sweep_step(states, frozen_params, batch, keys, depth_key):
    depth = None
    if depth_key is not None:
      # drawn once, outside vmap, so it is one value for every member (the depth
      # weights do not depend on a member's state here: member 0's serve all); the
      # same draw as train_step(..., depth_key=depth_key) makes for a member alone
      depth = train.sample_depth(jax.random.fold_in(depth_key, states.step[0]),
                                 member(states, 0), config)
    return vmapped(states, frozen_params, batch, keys, margins, depth)

  return jax.jit(sweep_step, donate_argnums=0)


def fit_sweep(model: MaskableModel, frozen_params, probe: nn.Module, config: train.DiffMaskConfig,
              states: train.DiffMaskState, batches: Iterator[dict], num_steps: int,
              seeds: Sequence[int], *, margins: Sequence[float] | None = None,
              depth_key: jax.Array | None = None, progress: bool = True,
              description: str = 'sweep', checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int = 1000, run_info: dict | None = None,
              retired_run_info: Sequence[str] = ()) -> tuple[train.DiffMaskState, dict]:
  """Trains all members for ``num_steps`` shared batches.

  Member k's step t uses ``fold_in(run_key, t)`` with ``run_key`` from
  :func:`member_keys`, the key stream of a single ``train.fit`` run with it.
  With ``depth_key`` every member trains the depth drawn from
  ``fold_in(depth_key, t)`` at step t (see the module docstring), as
  ``train.fit(..., depth_key=depth_key)`` does; the depth distribution must
  then be the same for every member, so ``config.slow_converged_layers`` is
  refused. With ``checkpoint_dir`` the stacked states are saved every
  ``checkpoint_every`` steps and at the end, and a run started again resumes
  from there bit-for-bit (a checkpoint of another sweep is an error), as in
  :func:`dmx.train.fit` (``run_info`` and ``retired_run_info`` as there).
  Returns the states and the last step's metrics (each
  ``(K,)``; empty when a finished sweep is resumed).
  """
  if margins is not None and len(margins) != len(seeds):
    raise ValueError(f'{len(margins)} margins for {len(seeds)} members')
  if depth_key is not None and config.slow_converged_layers:
    raise ValueError('members cannot share depths with slow_converged_layers (each member '
                     'would sample from its own depth weights); use independent depths')
  if checkpoint_every < 1:
    raise ValueError(f'checkpoint_every must be >= 1, got {checkpoint_every}')
  first_step = int(states.step[0])
  last_step = first_step + num_steps
  run_metadata = dict(
      diffmask_config=train.jsonable_config(config), first_step=first_step, last_step=last_step,
      seeds=[int(seed) for seed in seeds],
      margins=None if margins is None else [float(margin) for margin in margins],
      run_info=json.loads(json.dumps(run_info or {})))
  if depth_key is not None:
    run_metadata['depth_key'] = train.key_fingerprint(depth_key)
  start = first_step
  if checkpoint_dir is not None and checkpoints.exists(checkpoint_dir):
    states, _ = train.resume_checkpoint(checkpoint_dir, states, run_metadata, retired_run_info)
    start = int(states.step[0])
    if start < last_step:
      for _ in range(start - first_step):
        next(batches)  # replays the batch order up to the checkpoint
  step_fn = make_sweep_step(model, probe, config, margins)
  base_keys = jnp.stack([member_keys(seed)[1] for seed in seeds])
  fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
  metrics = {}
  for step in tqdm(range(start, last_step), initial=start - first_step, total=num_steps,
                   desc=description, disable=not progress, unit='step'):
    states, metrics = step_fn(states, frozen_params, next(batches), fold(base_keys, step),
                              depth_key)
    done = step + 1
    if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == last_step):
      train.save_checkpoint(checkpoint_dir, states, run_metadata)
  return states, jax.device_get(metrics)


def stack_members(states: Sequence[train.DiffMaskState]) -> train.DiffMaskState:
  """Train states stacked on a leading ``(K,)`` member axis (the inverse of :func:`member`)."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def member(states: train.DiffMaskState, index: int) -> train.DiffMaskState:
  """Member ``index`` of stacked states, as an ordinary train state."""
  return jax.tree_util.tree_map(lambda leaf: leaf[index], states)


def sweep_keep_probs(model: MaskableModel, frozen_params, probe: nn.Module,
                     config: train.DiffMaskConfig, states: train.DiffMaskState, batch: dict
                     ) -> np.ndarray:
  """Keep probabilities of every member: ``(K, num_states, batch, seq)``."""
  outputs_and_states = jax.jit(model.forward)(frozen_params, batch)
  model_states = outputs_and_states[1]

  def keep(probe_params):
    keep_prob, _ = attribute.keep_probs_and_gates(probe, probe_params, config, model_states,
                                                  batch['mask'])
    return keep_prob

  return np.asarray(jax.jit(jax.vmap(keep))(states.probe_params))


def attribution_spread(keep_probs: np.ndarray, mask: np.ndarray) -> dict:
  """Spread of attributions across members, as the paper's stability number.

  Args:
    keep_probs: ``(K, num_states, batch, seq)`` keep probabilities of K members.
    mask: ``(batch, seq)`` true on real tokens.

  Returns:
    ``std_per_state`` (``num_states`` floats: the standard deviation over
    members of each token's keep probability, averaged over real tokens) and
    ``std`` (their mean over states).
  """
  keep_probs = np.asarray(keep_probs, np.float64)
  if keep_probs.shape[0] < 2:
    raise ValueError('the spread across members needs at least two members')
  real = np.asarray(mask).astype(bool)
  spread = keep_probs.std(axis=0)  # (num_states, batch, seq), population std as numpy's default
  per_state = [float(spread[k][real].mean()) for k in range(spread.shape[0])]
  return dict(std_per_state=per_state, std=float(np.mean(per_state)))
