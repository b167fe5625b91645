"""DiffMask training: the config, the train state and one pure, jittable step.

``train_step(state, frozen_params, batch, key)`` does all of DiffMask in one
function: the clean pass of the frozen model, the probe's votes, one sample of
the depth ``l`` and of the gates, the masked pass resumed at the injection
point, and both updates of the saddle point (probe and baselines down,
Lagrange multiplier of depth ``l`` up). ``frozen_params`` are an argument,
never optimised and never donated; jit the step with ``donate_argnums=0``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dmx import checkpoint as checkpoints
from dmx import hard_concrete, objective, optim, probes, relaxations
from dmx.models.base import MaskableModel

# the clock of the history's ``seconds`` (a module attribute, so tests can replace it)
_clock = time.monotonic


@dataclasses.dataclass(frozen=True)
class DiffMaskConfig:
  """Hyperparameters of DiffMask; defaults are the original code's.

  Attributes:
    gate: ``'input'`` masks the input embeddings ``h0`` from the votes of all
      states up to depth l; ``'hidden'`` masks the state ``h_l`` itself.
    margin: tolerated divergence ``m`` (SST 0.1, SQuAD 1, toy 0.05).
    divergence_tail: the constraint bounds the mean divergence of the worst
      ``divergence_tail`` fraction of each batch (its conditional value at
      risk, :func:`dmx.objective.tail_divergence`). ``1.0``, the paper's and
      the original's constraint, bounds the batch mean, which lets a few
      examples far over the margin be paid for by many under it; smaller
      fractions push on exactly those few.
    divergence: ``'kl'`` for ``KL(y || y_hat)`` or ``'squared_error'``.
    flip_penalty: ``w >= 0``; the constraint then bounds
      ``D + w * argmax_flip`` (:func:`dmx.objective.argmax_flip`): a masked
      pass that changes the clean prediction pays the log-probability ratio
      of its flip on top of its KL. Near-ties flip at a KL far below the
      margin, so the paper's bound does not see them. ``0``, the paper's and
      the original's objective, leaves the constraint as it is. Needs
      ``divergence='kl'`` (class logits).
    sparsity: ``'log_l0'`` (original: mean ``log P(z != 0)``) or ``'l0'``
      (paper: expected L0, mean ``P(z != 0)``).
    temperature, stretch: the Hard Concrete parameters.
    relaxation: the gates' distribution, one of :data:`dmx.relaxations.NAMES`
      (``'hard_concrete'``, the original's, by default). Its parameters:
      ``binary_concrete_temperature``; ``hard_kuma_b`` and
      ``hard_kuma_stretch``; ``straight_through_temperature`` (of its backward
      pass); ``reinforce_baseline_decay``, the decay of the per-depth moving
      average of the divergence that the score-function estimator subtracts.
    probe_learning_rate, baseline_learning_rate, warmup_steps, rmsprop_decay,
      rmsprop_eps, lookahead_sync_period, lookahead_slow_step: the primal optimiser.
    dual_optimizer, multiplier_learning_rate, multiplier_init, multiplier_max:
      the dual ascent on one multiplier per state, projected to ``[0, max]``.
    running_decay: decay of the running agreement and keep fraction per state.
    slow_converged_layers: sample a converged depth ``converged_weight`` times as
      often as the others (the original's ``stop_train``); converged means
      running agreement > ``converged_agreement``, running keep fraction <
      ``converged_l0`` and more than ``converged_min_steps`` steps at that depth.
    layers: the depths to train; ``None`` trains every state.
    probe_average_decay: ``d > 0`` keeps an exponential moving average of the
      probe's iterates (Polyak averaging, bias-corrected as in Adam, so step
      ``t`` weighs ``(1 - d) d^(T - t)`` after normalisation), and that
      average is the probe the run evaluates and saves
      (:attr:`DiffMaskState.probe_params`). The last iterate of a saddle
      point oscillates around the constraint with the multiplier; the average
      damps that noise. ``0`` (the original) uses the last iterate.
  """
  gate: str = 'hidden'
  margin: float = 0.1
  divergence_tail: float = 1.0
  divergence: str = 'kl'
  flip_penalty: float = 0.0
  sparsity: str = 'log_l0'
  temperature: float = hard_concrete.DEFAULT_TEMPERATURE
  stretch: tuple[float, float] = hard_concrete.DEFAULT_STRETCH
  relaxation: str = 'hard_concrete'
  binary_concrete_temperature: float = relaxations.DEFAULT_BINARY_CONCRETE_TEMPERATURE
  hard_kuma_b: float = relaxations.DEFAULT_KUMA_B
  hard_kuma_stretch: tuple[float, float] = relaxations.DEFAULT_KUMA_STRETCH
  straight_through_temperature: float = 1.0
  reinforce_baseline_decay: float = 0.9
  probe_learning_rate: float = 3e-4
  baseline_learning_rate: float = 1e-3
  warmup_steps: int = 1200
  rmsprop_decay: float = 0.99
  rmsprop_eps: float = 1e-8
  lookahead_sync_period: int = 6
  lookahead_slow_step: float = 0.5
  dual_optimizer: str = 'lookahead_rmsprop'
  multiplier_learning_rate: float = 0.3
  multiplier_init: float = 1.0
  multiplier_max: float = 200.0
  running_decay: float = 0.9
  slow_converged_layers: bool = False
  converged_agreement: float = 0.75
  converged_l0: float = 0.1
  converged_min_steps: int = 100
  converged_weight: float = 0.1
  layers: tuple[int, ...] | None = None
  probe_average_decay: float = 0.0

  def __post_init__(self):
    if self.gate not in probes.GATES:
      raise ValueError(f'gate must be one of {probes.GATES}, got {self.gate!r}')
    if self.divergence not in objective.DIVERGENCES:
      raise ValueError(f'divergence must be one of {objective.DIVERGENCES}, got {self.divergence!r}')
    if self.sparsity not in objective.SPARSITY_LOSSES:
      raise ValueError(f'sparsity must be one of {objective.SPARSITY_LOSSES}, got {self.sparsity!r}')
    if self.dual_optimizer not in optim.DUAL_OPTIMIZERS:
      raise ValueError(
          f'dual_optimizer must be one of {optim.DUAL_OPTIMIZERS}, got {self.dual_optimizer!r}')
    hard_concrete.check_parameters(self.temperature, self.stretch)
    if self.relaxation not in relaxations.NAMES:
      raise ValueError(f'relaxation must be one of {relaxations.NAMES}, got {self.relaxation!r}')
    for name in relaxations.NAMES:  # a nonsense parameter is refused even when unused
      relaxations.by_name(name, **self._relaxation_options(name))
    if not 0.0 <= self.reinforce_baseline_decay < 1.0:
      raise ValueError(
          f'reinforce_baseline_decay must lie in [0, 1), got {self.reinforce_baseline_decay}')
    if self.margin < 0:
      raise ValueError(f'margin must be >= 0, got {self.margin}')
    if not 0.0 < self.divergence_tail <= 1.0:
      raise ValueError(f'divergence_tail must lie in (0, 1], got {self.divergence_tail}')
    # inf * 0 would make every kept prediction's term NaN
    if not (self.flip_penalty >= 0 and math.isfinite(self.flip_penalty)):
      raise ValueError(f'flip_penalty must be a finite number >= 0, got {self.flip_penalty}')
    if self.flip_penalty > 0 and self.divergence != 'kl':
      raise ValueError('flip_penalty needs divergence="kl": a flip is a change of argmax class')
    for name in ('probe_learning_rate', 'baseline_learning_rate', 'multiplier_learning_rate',
                 'multiplier_max'):
      if not getattr(self, name) > 0:
        raise ValueError(f'{name} must be > 0, got {getattr(self, name)}')
    if not 0 <= self.multiplier_init <= self.multiplier_max:
      raise ValueError('multiplier_init must lie in [0, multiplier_max]')
    if self.warmup_steps < 0 or self.lookahead_sync_period < 1:
      raise ValueError('warmup_steps must be >= 0 and lookahead_sync_period >= 1')
    if self.layers is not None and not self.layers:
      raise ValueError('layers must name at least one depth, or be None for all')
    if not 0.0 <= self.probe_average_decay < 1.0:
      raise ValueError(f'probe_average_decay must lie in [0, 1), got {self.probe_average_decay}')

  def gate_relaxation(self) -> relaxations.Relaxation:
    """The :class:`dmx.relaxations.Relaxation` that ``relaxation`` and its parameters name."""
    return relaxations.by_name(self.relaxation, **self._relaxation_options(self.relaxation))

  def _relaxation_options(self, name: str) -> dict:
    return {
        'hard_concrete': dict(temperature=self.temperature, stretch=self.stretch),
        'binary_concrete': dict(temperature=self.binary_concrete_temperature),
        'hard_kuma': dict(b=self.hard_kuma_b, stretch=self.hard_kuma_stretch),
        'straight_through': dict(temperature=self.straight_through_temperature),
    }.get(name, {})

  def check_num_states(self, num_states: int) -> None:
    """Raises when ``layers`` names a depth the model does not have."""
    if self.layers is not None and not all(0 <= k < num_states for k in self.layers):
      raise ValueError(f'layers {self.layers} out of range for a model with {num_states} states')


class DiffMaskState(NamedTuple):
  """Everything that changes during DiffMask training (a pytree).

  Attributes:
    step: int32 scalar, number of steps taken.
    params: probe parameters (votes and baselines) as ``LookaheadParams``.
    opt_state: the primal optimiser's state.
    multipliers: ``LookaheadParams`` of ``(num_states,)`` Lagrange multipliers.
    multiplier_opt_state: the dual optimiser's state.
    running_agreement: ``(num_states,)`` running agreement of masked predictions.
    running_l0: ``(num_states,)`` running fraction of open gates (P(z != 0)).
    running_steps: ``(num_states,)`` int32 steps taken at each depth.
    score_baseline: ``(num_states,)`` moving average of the divergence at each
      depth, the REINFORCE baseline (stored without bias correction; see
      :func:`make_gradient_fn`); ``None`` for every other relaxation, so their
      states (and checkpoints) keep the fields they always had.
    averaged_params: the bias-corrected moving average of the probe's fast
      weights (``config.probe_average_decay``); ``None`` when it is 0.
  """
  step: jax.Array
  params: optax.LookaheadParams
  opt_state: optax.OptState
  multipliers: optax.LookaheadParams
  multiplier_opt_state: optax.OptState
  running_agreement: jax.Array
  running_l0: jax.Array
  running_steps: jax.Array
  score_baseline: jax.Array | None = None
  averaged_params: Any = None

  @property
  def probe_params(self):
    """The probe parameters to use: the iterate average when kept, else the last iterate."""
    return self.last_iterate_params if self.averaged_params is None else self.averaged_params

  @property
  def last_iterate_params(self):
    """The probe parameters the optimiser holds now (Lookahead's fast weights)."""
    return self.params.fast

  @property
  def lagrange_multipliers(self) -> jax.Array:
    return self.multipliers.fast


def make_optimizers(config: DiffMaskConfig):
  """The primal and dual optax transformations that ``config`` describes."""
  primal = optim.primal_optimizer(
      probe_learning_rate=config.probe_learning_rate,
      baseline_learning_rate=config.baseline_learning_rate,
      warmup_steps=config.warmup_steps, decay=config.rmsprop_decay, eps=config.rmsprop_eps,
      sync_period=config.lookahead_sync_period, slow_step_size=config.lookahead_slow_step)
  dual = optim.dual_optimizer(
      config.dual_optimizer, learning_rate=config.multiplier_learning_rate,
      decay=config.rmsprop_decay, eps=config.rmsprop_eps,
      sync_period=config.lookahead_sync_period, slow_step_size=config.lookahead_slow_step)
  return primal, dual


def init_probe_params(key: jax.Array, model: MaskableModel, probe: nn.Module, frozen_params,
                      batch: dict):
  """Initialises ``probe`` on the states of ``batch``'s clean pass (see :func:`clean_pass`)."""
  _, states = clean_pass(model, frozen_params, batch)
  return probe.init(key, states)


def _fresh_copy(tree):
  # fresh buffers: donating the state must not delete the caller's arrays,
  # nor one copy held in the state another
  return jax.tree_util.tree_map(jnp.array, tree)


def _synced(tree) -> optax.LookaheadParams:
  return optax.LookaheadParams(fast=_fresh_copy(tree), slow=_fresh_copy(tree))


def init_state(config: DiffMaskConfig, probe_params, num_states: int) -> DiffMaskState:
  """A fresh train state around ``probe_params`` for a model with ``num_states`` states."""
  config.check_num_states(num_states)
  primal, dual = make_optimizers(config)
  params = _synced(probe_params)
  multipliers = _synced(jnp.full((num_states,), config.multiplier_init, jnp.float32))
  return DiffMaskState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=primal.init(params),
      multipliers=multipliers,
      multiplier_opt_state=dual.init(multipliers),
      running_agreement=jnp.zeros((num_states,), jnp.float32),
      running_l0=jnp.ones((num_states,), jnp.float32),
      running_steps=jnp.zeros((num_states,), jnp.int32),
      score_baseline=(jnp.zeros((num_states,), jnp.float32)
                      if config.gate_relaxation().gradient == relaxations.SCORE_FUNCTION else None),
      averaged_params=(_fresh_copy(probe_params) if config.probe_average_decay > 0 else None),
  )


def layer_logits(state: DiffMaskState, config: DiffMaskConfig) -> jax.Array:
  """Log-weights ``(num_states,)`` of the distribution the step samples depths from."""
  num_states = state.running_steps.shape[0]
  weights = jnp.ones((num_states,), jnp.float32)
  if config.layers is not None:
    weights = jnp.zeros_like(weights).at[jnp.asarray(config.layers)].set(1.0)
  if config.slow_converged_layers:
    converged = ((state.running_agreement > config.converged_agreement)
                 & (state.running_l0 < config.converged_l0)
                 & (state.running_steps > config.converged_min_steps))
    weights = weights * jnp.where(converged, config.converged_weight, 1.0)
  return jnp.log(weights)


def sample_depth(key: jax.Array, state: DiffMaskState, config: DiffMaskConfig) -> jax.Array:
  """The depth ``l`` (an int32 scalar) a step trains, drawn with ``key`` from :func:`layer_logits`."""
  return jax.random.categorical(key, layer_logits(state, config))


def masked_pass(model: MaskableModel, frozen_params, batch: dict, states: Sequence[jax.Array],
                gate: str, gates: jax.Array, baselines: Sequence[jax.Array], layer_index):
  """The model's output with the gated state replaced by the baseline.

  Input gates replace ``h0`` and rerun the whole model; hidden gates replace
  ``h_l`` and resume at depth ``l`` from the clean states.

  Args:
    gates: ``(batch, seq)`` gates in ``[0, 1]``.
    baselines: the probe's baseline vectors (one for input gates).
    layer_index: the depth ``l`` (traced or int).

  Returns:
    ``(batch, ..., classes)`` masked outputs.
  """
  if gate == 'input':
    # the input has one baseline, whatever index a model's dispatch passes
    intervention = lambda index, state: probes.replace_with_baseline(state, gates, baselines[0])
    start = 0
  else:
    intervention = lambda index, state: probes.replace_with_baseline(
        state, gates, probes.select_baseline(baselines, index))
    start = layer_index
  return model.forward_from(frozen_params, batch, tuple(states), start, intervention)


CLEAN_KEYS = ('clean_outputs', 'clean_states')


def clean_pass(model: MaskableModel, frozen_params, batch: dict):
  """The frozen model's ``(outputs, states)`` on ``batch``, without gradient.

  A batch that carries ``clean_outputs`` ``(batch, ..., classes)`` and
  ``clean_states`` (a tuple of ``(batch, seq, dim_k)``) computed once for a
  fixed dataset (the frozen model is deterministic) skips the pass; this is
  exactly the same computation, cached.
  """
  if all(name in batch for name in CLEAN_KEYS):
    return batch['clean_outputs'], tuple(batch['clean_states'])
  if any(name in batch for name in CLEAN_KEYS):
    raise ValueError(f'a batch with a cached clean pass needs both {CLEAN_KEYS}')
  return jax.lax.stop_gradient(model.forward(frozen_params, batch))


def agreement(reference_outputs: jax.Array, other_outputs: jax.Array) -> jax.Array:
  """``(batch,)`` 1.0 where the argmax of every head agrees, else 0.0."""
  same = jnp.argmax(reference_outputs, axis=-1) == jnp.argmax(other_outputs, axis=-1)
  return same.reshape(same.shape[0], -1).all(axis=-1).astype(jnp.float32)


def make_gradient_fn(model: MaskableModel, probe: nn.Module, config: DiffMaskConfig,
                     axis_name: str | None = None, num_shards: int = 1) -> Callable:
  """Builds ``gradients(state, frozen_params, batch, key[, margin, layer_index])``.

  It returns ``(loss, aux, probe_grads, multiplier_grads, layer_index)``: the
  one-sample gradient estimate a train step takes (before the shard mean and
  the optimisers; see :func:`make_train_step` for the arguments), the
  Lagrangian's value, the metrics ``aux`` (``divergence``,
  ``constrained_divergence``, ``sparsity``, ``keep_fraction``,
  ``open_fraction``, ``agreement``) and the depth used. The constraint bounds
  ``constrained_divergence``: the batch mean of ``D``, or with
  ``config.divergence_tail < 1`` the mean of the batch's worst tail (over the
  global batch when sharded); with ``config.flip_penalty > 0`` ``D`` there is
  ``KL + flip_penalty * argmax_flip`` (``divergence`` stays the plain KL).
  Exposed so that the estimator itself can be studied, e.g. its variance over
  gate-noise draws (``dmx compare relaxations``).

  The gates come from ``config.gate_relaxation()``. With a score-function
  relaxation (``'reinforce'``) the sampled gates carry no gradient, and the
  loss gains the REINFORCE surrogate
  ``mean_batch(stop_gradient(lambda_l * (D - b_l)) * sum_tokens log p(z))``,
  whose value is subtracted again (the reported loss is the Lagrangian's) but
  whose gradient is the score-function estimate of ``d E[lambda_l D] / d probe``
  (``D`` there and below is the constrained per-example term).
  ``b_l`` is the bias-corrected moving average of the divergence at depth
  ``l`` over earlier steps (``state.score_baseline``): it does not depend on
  this step's sample, so it lowers the variance without adding bias. Padding
  tokens are left out of ``log p(z)``: the models here never read them.
  """
  relaxation = config.gate_relaxation()
  score_function = relaxation.gradient == relaxations.SCORE_FUNCTION

  def gradients(state: DiffMaskState, frozen_params, batch: dict, key: jax.Array,
                margin: jax.Array | float | None = None, layer_index: jax.Array | None = None):
    margin = config.margin if margin is None else margin
    layer_key, gate_key = jax.random.split(key)
    outputs, states = clean_pass(model, frozen_params, batch)
    if layer_index is None:
      layer_index = sample_depth(layer_key, state, config)
    mask = batch['mask']
    if axis_name is None:
      shard_kwargs = {}
    else:
      local_batch = mask.shape[0]
      shard_kwargs = dict(example_offset=jax.lax.axis_index(axis_name) * local_batch,
                          global_batch=local_batch * num_shards)

    if score_function:
      reward_baseline = _corrected_score_baseline(state, layer_index,
                                                  config.reinforce_baseline_decay)

    def constrained_divergence(divergence):
      if config.divergence_tail == 1.0:
        return divergence
      everyone = (divergence if axis_name is None
                  else jax.lax.all_gather(divergence, axis_name, tiled=True))
      threshold = jax.lax.stop_gradient(
          objective.tail_threshold(everyone, config.divergence_tail))
      return objective.tail_divergence(divergence, threshold, config.divergence_tail)

    def loss_fn(probe_params, multipliers):
      vote_logits = probe.apply(probe_params, states)
      baselines = probe.apply(probe_params, method='baseline_vectors')
      gates, log_keep = probes.sample_gates(config.gate, gate_key, vote_logits, layer_index,
                                            relaxation=relaxation, **shard_kwargs)
      masked_outputs = masked_pass(model, frozen_params, batch, states, config.gate, gates,
                                   baselines, layer_index)
      divergence = objective.output_divergence(config.divergence, outputs, masked_outputs)
      penalised = divergence
      if config.flip_penalty > 0:
        penalised = divergence + config.flip_penalty * objective.argmax_flip(outputs,
                                                                             masked_outputs)
      constrained = constrained_divergence(penalised)
      sparsity = objective.sparsity_loss(config.sparsity, log_keep, mask)
      loss = objective.lagrangian(multipliers[layer_index], constrained, margin, sparsity)
      if score_function:
        log_prob = probes.sample_log_prob(config.gate, vote_logits, gates, layer_index,
                                          relaxation=relaxation)
        reward = multipliers[layer_index] * (constrained - reward_baseline)
        loss = loss + jnp.mean(relaxations.score_function_surrogate(reward, log_prob, mask))
      aux = dict(divergence=divergence.mean(), constrained_divergence=constrained.mean(),
                 sparsity=sparsity.mean(),
                 keep_fraction=objective.masked_mean(jnp.exp(log_keep), mask).mean(),
                 open_fraction=objective.masked_mean((gates > 0).astype(jnp.float32), mask).mean(),
                 agreement=agreement(outputs, masked_outputs).mean())
      return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, aux), (probe_grads, multiplier_grads) = grad_fn(state.params.fast,
                                                            state.multipliers.fast)
    return loss, aux, probe_grads, multiplier_grads, layer_index

  return gradients


def make_train_step(model: MaskableModel, probe: nn.Module, config: DiffMaskConfig,
                    axis_name: str | None = None, num_shards: int = 1
                    ) -> Callable[[DiffMaskState, Any, dict, jax.Array],
                                  tuple[DiffMaskState, dict]]:
  """Builds the pure step ``(state, frozen_params, batch, key[, margin, layer_index]) -> (state, metrics)``.

  One sample of the depth and of the gates serves both the probe update and
  the multiplier update. ``batch['mask']`` ``(batch, seq)`` marks real tokens;
  a batch may carry its clean pass (see :func:`clean_pass`).
  ``metrics`` holds scalars: ``layer_index``, ``loss``, ``divergence``,
  ``sparsity``, ``keep_fraction`` (mean P(z != 0)), ``open_fraction`` (sampled
  gates > 0), ``agreement`` and ``multiplier``.

  ``margin`` (a traced scalar) replaces ``config.margin``; :mod:`dmx.sweep`
  uses it to train members with different margins in one program.
  ``layer_index`` (a traced int) trains that depth instead of sampling one;
  :mod:`dmx.bench` uses it to time every depth in turn. ``depth_key`` draws
  the depth from ``fold_in(depth_key, state.step)`` instead of from ``key``
  (a depth schedule of its own, which :mod:`dmx.sweep` members share).

  With ``axis_name`` the step runs inside ``shard_map`` over ``num_shards``
  shards of the batch (see :mod:`dmx.parallel`): the depth comes from the
  shared key, each shard's gate noise is its rows of the global batch's noise,
  and the gradients of the probe and of the multipliers and the metrics are
  averaged with ``lax.pmean``, so every shard takes the same update as one
  device on the whole batch.

  The gates come from ``config.gate_relaxation()``; the gradient estimate,
  including REINFORCE's surrogate and baseline, is :func:`make_gradient_fn`'s.
  With a score-function relaxation the step also moves ``state.score_baseline``
  of depth ``l`` towards this step's mean divergence (decay
  ``config.reinforce_baseline_decay``).
  """
  primal, dual = make_optimizers(config)
  gradients = make_gradient_fn(model, probe, config, axis_name, num_shards)
  score_function = config.gate_relaxation().gradient == relaxations.SCORE_FUNCTION

  def mean_over_shards(tree):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def train_step(state: DiffMaskState, frozen_params, batch: dict, key: jax.Array,
                 margin: jax.Array | float | None = None, layer_index: jax.Array | None = None,
                 depth_key: jax.Array | None = None):
    if layer_index is None and depth_key is not None:
      layer_index = sample_depth(jax.random.fold_in(depth_key, state.step), state, config)
    loss, aux, probe_grads, multiplier_grads, layer_index = gradients(
        state, frozen_params, batch, key, margin, layer_index)
    # every shard holds the mean over its rows: the mean of the means is the
    # global mean because the shards are equal in size
    loss, aux, probe_grads, multiplier_grads = mean_over_shards(
        (loss, aux, probe_grads, multiplier_grads))
    updates, opt_state = primal.update(probe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    multiplier_updates, multiplier_opt_state = dual.update(
        multiplier_grads, state.multiplier_opt_state, state.multipliers)
    multipliers = optim.project_multipliers(
        optax.apply_updates(state.multipliers, multiplier_updates), config.multiplier_max)

    decay = config.running_decay
    running_agreement = state.running_agreement.at[layer_index].set(
        decay * state.running_agreement[layer_index] + (1 - decay) * aux['agreement'])
    running_l0 = state.running_l0.at[layer_index].set(
        decay * state.running_l0[layer_index] + (1 - decay) * aux['keep_fraction'])
    score_baseline = state.score_baseline
    if score_function:
      baseline_decay = config.reinforce_baseline_decay
      score_baseline = score_baseline.at[layer_index].set(relaxations.moving_average(
          score_baseline[layer_index], aux['constrained_divergence'], baseline_decay))
    averaged_params = state.averaged_params
    if averaged_params is not None:
      averaged_params = average_iterates(averaged_params, params.fast, state.step + 1,
                                         config.probe_average_decay)
    new_state = DiffMaskState(
        step=state.step + 1, params=params, opt_state=opt_state, multipliers=multipliers,
        multiplier_opt_state=multiplier_opt_state, running_agreement=running_agreement,
        running_l0=running_l0, running_steps=state.running_steps.at[layer_index].add(1),
        score_baseline=score_baseline, averaged_params=averaged_params)
    metrics = dict(aux, loss=loss, layer_index=layer_index,
                   multiplier=state.multipliers.fast[layer_index])
    return new_state, metrics

  return train_step


def average_iterates(average, iterate, count: jax.Array, decay: float):
  """The bias-corrected moving average of ``count`` iterates, from that of ``count - 1``.

  With ``m_t = d m_(t-1) + (1 - d) x_t`` started at 0, the corrected
  average ``m_t / (1 - d^t)`` obeys ``a_t = a_(t-1) + w_t (x_t - a_(t-1))``
  with ``w_t = (1 - d) / (1 - d^t)``; ``w_1 = 1``, so ``a_1 = x_1`` whatever
  ``average`` held. Storing ``a_t`` itself keeps the state free of a
  correction to remember.
  """
  count = jnp.asarray(count).astype(jnp.float32)
  weight = (1.0 - decay) / jnp.maximum(1.0 - decay ** count, jnp.finfo(jnp.float32).tiny)
  return optax.incremental_update(iterate, average, jnp.minimum(weight, 1.0))


def _corrected_score_baseline(state: DiffMaskState, layer_index, decay: float) -> jax.Array:
  """The REINFORCE baseline of depth ``layer_index``: its moving average, bias-corrected.

  The average starts at 0; after ``n`` steps at that depth dividing by
  ``1 - decay^n`` makes it a weighted mean of the divergences seen (as in
  Adam). Before the first step it is 0 (plain REINFORCE).
  """
  if state.score_baseline is None:
    raise ValueError('a score-function relaxation needs a train state from init_state with it')
  return relaxations.bias_corrected_average(state.score_baseline[layer_index],
                                            state.running_steps[layer_index], decay)


def fit(model: MaskableModel, frozen_params, probe: nn.Module, config: DiffMaskConfig,
        state: DiffMaskState, batches: Iterator[dict], num_steps: int, key: jax.Array, *,
        progress: bool = True, description: str = 'diffmask', log_every: int = 500,
        mesh=None, checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        run_info: dict | None = None,
        depth_key: jax.Array | None = None,
        retired_run_info: Sequence[str] = (),
        validate: Callable[[DiffMaskState], dict] | None = None,
        validate_every: int | None = None) -> tuple[DiffMaskState, list[dict]]:
  """Trains until ``state.step`` has advanced by ``num_steps``, with a progress bar.

  The key of step ``t`` is ``fold_in(key, t)``, so a run is reproducible from
  ``(key, state.step)`` alone.

  Args:
    batches: the training batches, one per step, in a reproducible order.
    log_every: the history gets one entry of mean metrics per ``log_every``
      steps (and one at every checkpoint), with the mean per depth under
      ``per_layer`` and ``seconds``, the training wall time so far over every
      invocation of this run (a resumed run adds its own to the checkpoint's).
    mesh: a :func:`dmx.parallel.data_mesh`; the step then runs data-parallel,
      each batch split over the mesh's ``data`` axis. ``None``: one device.
    checkpoint_dir: the whole train state is saved there every
      ``checkpoint_every`` steps and at the end. If it already holds a
      checkpoint of this run (same config and key), training resumes from it:
      the first ``checkpoint step - state.step`` batches are skipped, and the
      result is bit-for-bit the uninterrupted run's. A checkpoint of the same
      run with fewer steps is continued (asking for more steps extends a
      finished run); one past ``num_steps`` is refused.
    run_info: JSON-able facts outside ``config`` that a resumed run must share
      (data, batch size, model path); a checkpoint with other facts is refused.
    retired_run_info: ``run_info`` fields older checkpoints carry and this
      caller no longer records (see :func:`resume_checkpoint`).
    depth_key: draw the depth of step ``t`` from ``fold_in(depth_key, t)``
      (:func:`sample_depth`) instead of from the step's own key: the depth
      schedule of a :mod:`dmx.sweep` whose members share their depths, so that
      one member can be rerun alone. Not with ``mesh``.
    validate: called with the state every ``validate_every`` steps (default
      ``checkpoint_every``) and at the last step, before that step's
      checkpoint is written; its JSON-able dict is stored under
      ``'validation'`` in that step's history entry (a held-out evaluation,
      checkpoint selection). Not called again for steps a resumed run restored.

  Returns:
    The final state and the history.

  Raises:
    dmx.checkpoint.CheckpointError: the checkpoint is corrupt or belongs to
      another run (never a silent fresh start).
  """
  from dmx import parallel  # pylint: disable=import-outside-toplevel  (parallel imports train)
  if num_steps < 0:
    raise ValueError(f'num_steps must be >= 0, got {num_steps}')
  validate_every = checkpoint_every if validate_every is None else validate_every
  if checkpoint_every < 1 or log_every < 1 or validate_every < 1:
    raise ValueError('checkpoint_every, log_every and validate_every must be >= 1')
  if depth_key is not None and mesh is not None:
    raise ValueError('depth_key (a shared depth schedule) is not supported with a mesh')
  first_step = int(state.step)
  last_step = first_step + num_steps
  run_metadata = dict(diffmask_config=jsonable_config(config), first_step=first_step,
                      last_step=last_step, key=key_fingerprint(key),
                      run_info=json.loads(json.dumps(run_info or {})))
  if depth_key is not None:  # absent otherwise, so older checkpoints still match
    run_metadata['depth_key'] = key_fingerprint(depth_key)
  history: list[dict] = []
  if checkpoint_dir is not None and checkpoints.exists(checkpoint_dir):
    state, history = resume_checkpoint(checkpoint_dir, state, run_metadata, retired_run_info)
    if int(state.step) < last_step:  # a finished run draws no batch at all
      for _ in range(int(state.step) - first_step):
        next(batches)  # replays the batch order up to the checkpoint

  if mesh is None:
    step_fn = jax.jit(make_train_step(model, probe, config), donate_argnums=0)
    put_batch = lambda batch: batch
  else:
    step_fn = parallel.make_parallel_train_step(model, probe, config, mesh)
    state, frozen_params = parallel.replicate((state, frozen_params), mesh)
    put_batch = lambda batch: parallel.shard_batch(batch, mesh)

  num_states = state.running_steps.shape[0]
  window: list[dict] = []
  start = int(state.step)
  earlier_seconds = history[-1].get('seconds', 0.0) if history else 0.0
  started = _clock()
  bar = tqdm(total=num_steps, initial=start - first_step, desc=description,
             disable=not progress, unit='step')
  for step in range(start, last_step):
    try:
      batch = next(batches)
    except StopIteration:
      raise ValueError(f'batches ran out after {step - first_step} of {num_steps} steps') from None
    step_key = jax.random.fold_in(key, step)
    if depth_key is None:
      state, metrics = step_fn(state, frozen_params, put_batch(batch), step_key)
    else:
      state, metrics = step_fn(state, frozen_params, put_batch(batch), step_key, None, None,
                               depth_key)
    window.append(metrics)
    done = step + 1
    checkpoint_now = checkpoint_dir is not None and (done % checkpoint_every == 0
                                                     or done == last_step)
    validate_now = validate is not None and (done % validate_every == 0 or done == last_step)
    if done % log_every == 0 or done == last_step or checkpoint_now or validate_now:
      summary = _summarise(jax.device_get(window), num_states)
      summary['step'] = done
      summary['seconds'] = earlier_seconds + _clock() - started
      history.append(summary)
      bar.set_postfix(div=f"{summary['divergence']:.3f}", keep=f"{summary['keep_fraction']:.2f}",
                      agree=f"{summary['agreement']:.3f}")
      window = []
    if validate_now:
      history[-1]['validation'] = validate(state)
    if checkpoint_now:
      save_checkpoint(checkpoint_dir, state, run_metadata, history)
    bar.update(1)
  bar.close()
  return state, history


def key_fingerprint(key: jax.Array) -> list[int]:
  """The raw bits of a PRNG key, to recognise the run a checkpoint belongs to."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(bits) for bits in np.asarray(key).ravel()]


def jsonable_config(config: DiffMaskConfig) -> dict:
  """``config`` as JSON-able values (what checkpoints and reports record)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _step_number(state: DiffMaskState) -> int:
  """The step a state (or a :mod:`dmx.sweep`'s stacked states, all at one step) has reached."""
  return int(np.asarray(state.step).reshape(-1)[0])


def save_checkpoint(checkpoint_dir, state: DiffMaskState, run_metadata: dict,
                    history: list[dict] | None = None) -> None:
  """Saves ``state`` (or stacked sweep states) with ``run_metadata``, its step and ``history``.

  :func:`resume_checkpoint` restores it only into a run with equal
  ``run_metadata`` (config, key, step range, ...): the facts that decide
  what the run computes.
  """
  metadata = dict(run_metadata, step=_step_number(state), history=history or [])
  checkpoints.save(checkpoint_dir, jax.device_get(_checkpoint_tree(state)), metadata)


def resume_checkpoint(checkpoint_dir, state: DiffMaskState, run_metadata: dict,
                      retired_run_info: Sequence[str] = ()) -> tuple[DiffMaskState, list[dict]]:
  """The checkpointed state and history, after checking they belong to this run.

  ``state`` gives the tree structure and shapes; ``run_metadata`` must equal
  what :func:`save_checkpoint` was given, except its ``last_step``: a step
  is a function of the step index alone (keys, depths and batches are), so a
  checkpoint of the same run with a smaller target is the longer run's state
  at that step, and the run continues from it. A checkpoint already past
  ``last_step`` is refused. ``retired_run_info`` names ``run_info`` fields
  the caller once recorded and no longer does: a checkpoint's values for them
  are not compared. Raises :class:`dmx.checkpoint.CheckpointError` for a
  checkpoint of another run or an inconsistent one.
  """
  metadata = checkpoints.read_metadata(checkpoint_dir)
  run_metadata = dict(run_metadata)
  last_step = run_metadata.pop('last_step', None)
  if isinstance(metadata.get('run_info'), dict):
    # fields the caller no longer fingerprints, which older checkpoints still carry
    metadata['run_info'] = {name: value for name, value in metadata['run_info'].items()
                            if name not in retired_run_info}
  if last_step is not None and int(metadata.get('step', -1)) > last_step:
    raise checkpoints.CheckpointError(
        f'checkpoint {checkpoint_dir} is at step {metadata.get("step")}, past this run\'s last '
        f'step {last_step}; ask for at least that many steps, or choose another output folder')
  if isinstance(metadata.get('diffmask_config'), dict):
    # a field the checkpoint does not name was added to DiffMaskConfig after it
    # was written, with a default that keeps the old behaviour: that run used it
    metadata['diffmask_config'] = {**jsonable_config(DiffMaskConfig()),
                                   **metadata['diffmask_config']}
  # a run without a depth key must not resume one that had its own depth schedule
  for name, expected in {'depth_key': None, **run_metadata}.items():
    if metadata.get(name) != expected:
      if name in ('diffmask_config', 'run_info') and isinstance(metadata.get(name), dict):
        differing = sorted(field for field in expected
                           if metadata[name].get(field) != expected[field])
        differing += sorted(set(metadata[name]) - set(expected))
        label = 'DiffMask config' if name == 'diffmask_config' else 'run'
        what = f'a different {label} ({", ".join(differing)})'
      else:
        what = f'a different {name.replace("_", " ")}'
      raise checkpoints.CheckpointError(
          f'checkpoint {checkpoint_dir} belongs to another run ({what}); '
          'delete it or choose another output folder')
  restored = DiffMaskState(**checkpoints.restore(checkpoint_dir,
                                                  jax.device_get(_checkpoint_tree(state))))
  if _step_number(restored) != metadata.get('step'):
    raise checkpoints.CheckpointError(f'checkpoint {checkpoint_dir} is inconsistent: state at '
                                      f'step {_step_number(restored)}, metadata '
                                      f'{metadata.get("step")}')
  return jax.tree_util.tree_map(jnp.asarray, restored), list(metadata.get('history', []))


def _checkpoint_tree(state: DiffMaskState) -> dict:
  """The state as saved: a dict of its fields, without those that are None.

  orbax stores a NamedTuple and a dict of its fields alike, so checkpoints
  written before ``score_baseline`` existed restore into this tree unchanged.
  """
  return {name: value for name, value in state._asdict().items() if value is not None}


def _summarise(window: list[dict], num_states: int) -> dict:
  """Mean of each metric over the window, overall and per depth."""
  names = [name for name in window[0] if name != 'layer_index']
  layers = np.array([int(m['layer_index']) for m in window])
  summary = {name: float(np.mean([m[name] for m in window])) for name in names}
  summary['per_layer'] = {
      str(k): {name: float(np.mean([m[name] for m, l in zip(window, layers) if l == k]))
               for name in names}
      for k in range(num_states) if np.any(layers == k)}
  return summary
