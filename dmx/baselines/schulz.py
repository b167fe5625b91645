"""Information bottleneck attribution (Schulz et al., 2020, "Restricting the flow").

A bottleneck is put on state ``h_l``: for each token ``t`` (and, with
``per_feature=True``, each feature ``d``) a gate ``lambda = sigmoid(alpha)``
mixes the state with Gaussian noise of the state's own statistics,

    z = lambda * h + (1 - lambda) * eps,     eps ~ N(mu, sigma^2),

and ``alpha`` is optimised, per example, to keep the prediction while letting
as little information through as possible:

    loss = CE(target | f(z)) + beta * mean_{real t, d} KL(P(z | h) || N(mu, sigma^2)).

``P(z | h) = N(lambda h + (1 - lambda) mu, (1 - lambda)^2 sigma^2)``, so the KL
has a closed form. The attribution of a token is its *capacity*: the KL summed
over features, in bits (Schulz et al.'s attribution map). The original
DiffMask code returned ``sigmoid(alpha)`` instead (one gate per token);
``attribution='gate'`` gives that variant, ``'capacity'`` (default) the
paper's.

Differences from Schulz et al.'s reference: the capacity term is averaged
over the real tokens of each example (images have no padding); the noise
statistics ``mu, sigma`` are passed in (:func:`state_statistics` estimates
them over a dataset's real tokens). Defaults are Schulz et al.'s (``beta=10``,
10 Adam steps at learning rate 1, ``alpha`` initialised to 5); the toy Table 1
uses the original DiffMask code's settings (500 steps of centered RMSprop at
0.1, see :mod:`dmx.pipelines.toy`).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmx.baselines.common import (check_classifier_outputs, check_layer_index, outputs_with_state,
                                  resolve_target, target_log_probs)
from dmx.models.base import MaskableModel
from dmx.optim import torch_rmsprop

SCHULZ_ATTRIBUTIONS = ('capacity', 'gate')


class BottleneckAttribution(NamedTuple):
  """Information-bottleneck attributions for one batch.

  Attributes:
    token_scores: ``(batch, seq)`` the requested attribution (capacity in bits
      summed over features, or the mean gate ``sigmoid(alpha)``); 0 on padding.
    capacity: ``(batch, seq, dim)`` KL of the bottleneck per feature, in bits.
    gates: ``(batch, seq, dim)`` ``sigmoid(alpha)`` (constant over ``dim``
      unless ``per_feature``).
    target: ``(batch,)`` int32 class the bottleneck had to keep.
    final_loss: ``(batch,)`` each example's loss at the last step.
  """
  token_scores: jax.Array
  capacity: jax.Array
  gates: jax.Array
  target: jax.Array
  final_loss: jax.Array


def state_statistics(model: MaskableModel, params, batches: Iterable[dict], layer_index: int,
                     per_position: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation of ``h_l`` over the real tokens of ``batches``.

  Returns ``(mean, std)`` float32, each ``(dim,)``, or ``(seq, dim)`` with
  ``per_position`` (the original DiffMask code's toy statistics; a position
  that no batch fills gets the pooled values).
  """
  return states_statistics(model, params, batches, (layer_index,), per_position)[0]


def states_statistics(model: MaskableModel, params, batches: Iterable[dict],
                      layer_indices: Sequence[int] | None = None, per_position: bool = False
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
  """:func:`state_statistics` of several states from one pass over ``batches``.

  ``layer_indices``: the states ``h_l`` (``None``: every state). Returns one
  ``(mean, std)`` per index, in order.
  """
  if layer_indices is None:
    layer_indices = tuple(range(len(model.state_dims)))
  for layer_index in layer_indices:
    check_layer_index(model, layer_index)
  forward = jax.jit(lambda p, b: [model.forward(p, b)[1][k] for k in layer_indices])
  axes = (0,) if per_position else (0, 1)
  sums = None  # per state: (count, total, squares) in float64
  for batch in batches:
    mask = np.asarray(batch['mask'], np.float64)[..., None]
    batch_sums = []
    for state in forward(params, batch):
      state = np.asarray(state, np.float64)
      batch_sums.append(((mask * np.ones_like(state)).sum(axis=axes),
                         (state * mask).sum(axis=axes), (state ** 2 * mask).sum(axis=axes)))
    sums = batch_sums if sums is None else [tuple(a + b for a, b in zip(old, new))
                                            for old, new in zip(sums, batch_sums)]
  if sums is None:
    raise ValueError('state_statistics needs at least one batch')
  return [_mean_and_std(count, total, squares, per_position) for count, total, squares in sums]


def _mean_and_std(count, total, squares, per_position: bool) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(mean, std)`` from float64 sums over real tokens (see :func:`state_statistics`)."""
  if not np.any(count > 0):
    raise ValueError('state_statistics: the batches hold no real token')
  pooled_count = count.sum(axis=0) if per_position else count
  pooled_mean = (total.sum(axis=0) if per_position else total) / pooled_count
  pooled_var = (squares.sum(axis=0) if per_position else squares) / pooled_count - pooled_mean ** 2
  if not per_position:
    return pooled_mean.astype(np.float32), np.sqrt(np.maximum(pooled_var, 0)).astype(np.float32)
  filled = count > 0
  safe = np.maximum(count, 1)
  mean = np.where(filled, total / safe, pooled_mean)
  var = np.where(filled, squares / safe - mean ** 2, pooled_var)
  return mean.astype(np.float32), np.sqrt(np.maximum(var, 0)).astype(np.float32)


def per_example_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """``'adam'`` or ``'rmsprop'`` (centered, torch's conventions, as the original DiffMask code)."""
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'rmsprop':
    return torch_rmsprop(learning_rate, decay=0.99, eps=1e-8, centered=True)
  raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {name!r}")


def bottleneck_kl(gates: jax.Array, log_one_minus_gates: jax.Array, state: jax.Array,
                  noise_mean: jax.Array, noise_std: jax.Array) -> jax.Array:
  """Elementwise ``KL(N(g h + (1-g) mu, (1-g)^2 s^2) || N(mu, s^2))`` in nats.

  ``log_one_minus_gates`` is ``log(1 - gates)``, passed separately so gates
  near 1 keep their gradient (``log_sigmoid(-alpha)``).
  """
  normalised = (state - noise_mean) / noise_std
  one_minus = jnp.exp(log_one_minus_gates)
  return -log_one_minus_gates + 0.5 * (one_minus ** 2 + (gates * normalised) ** 2) - 0.5


def information_bottleneck(model: MaskableModel, params, batch: dict, key: jax.Array, *,
                           noise_mean: jax.Array, noise_std: jax.Array, layer_index: int = 0,
                           beta: float = 10.0, steps: int = 10, learning_rate: float = 1.0,
                           optimizer: str = 'adam', initial_alpha: float = 5.0,
                           per_feature: bool = False, attribution: str = 'capacity',
                           target: jax.Array | None = None,
                           min_std: float = 1e-5) -> BottleneckAttribution:
  """Per-example information-bottleneck attribution to state ``h_l``.

  Jittable (close over or mark static everything but ``params``, ``batch``,
  ``key`` and the statistics). Examples are optimised independently: the
  summed loss gives each example's ``alpha`` its own gradient, and the
  optimisers are elementwise.

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    key: PRNG key for the noise (one draw per step).
    noise_mean, noise_std: statistics of ``h_l``, broadcastable to
      ``(batch, seq, dim)`` (see :func:`state_statistics`).
    layer_index: the state to put the bottleneck on (0: word embeddings).
    beta: weight of the capacity term.
    steps: optimisation steps.
    learning_rate: of the optimiser.
    optimizer: ``'adam'`` (Schulz et al.) or ``'rmsprop'`` (centered, torch's
      conventions: the original DiffMask code's).
    initial_alpha: initial gate logit (5: the bottleneck starts almost open).
    per_feature: one gate per token and feature (Schulz et al.) instead of one
      per token (the original DiffMask code).
    attribution: ``'capacity'`` (bits per token) or ``'gate'`` (``sigmoid(alpha)``).
    target: ``(batch,)`` classes to keep; the clean prediction when ``None``.
    min_std: floor on ``noise_std`` (a constant feature would divide by zero).

  Returns:
    :class:`BottleneckAttribution`.
  """
  if attribution not in SCHULZ_ATTRIBUTIONS:
    raise ValueError(f'attribution must be one of {SCHULZ_ATTRIBUTIONS}, got {attribution!r}')
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  if beta < 0:
    raise ValueError(f'beta must be >= 0, got {beta}')
  check_layer_index(model, layer_index)
  outputs, states = model.forward(params, batch)
  check_classifier_outputs(outputs, 'information bottleneck')
  target = resolve_target(outputs, target)
  state = states[layer_index].astype(jnp.float32)
  noise_mean = jnp.broadcast_to(jnp.asarray(noise_mean, jnp.float32), state.shape)
  noise_std = jnp.maximum(jnp.broadcast_to(jnp.asarray(noise_std, jnp.float32), state.shape),
                          min_std)
  mask = batch['mask'].astype(jnp.float32)
  real_tokens = jnp.maximum(mask.sum(axis=-1), 1.0)
  alpha_shape = state.shape if per_feature else state.shape[:-1] + (1,)
  alpha = jnp.full(alpha_shape, initial_alpha, jnp.float32)

  def kl_per_feature(alpha):
    gates = jnp.broadcast_to(jax.nn.sigmoid(alpha), state.shape)
    log_one_minus = jnp.broadcast_to(jax.nn.log_sigmoid(-alpha), state.shape)
    return gates, bottleneck_kl(gates, log_one_minus, state, noise_mean, noise_std)

  def example_losses(alpha, step_key):
    gates, kl = kl_per_feature(alpha)
    noise = noise_mean + noise_std * jax.random.normal(step_key, state.shape)
    bottlenecked = gates * state + (1.0 - gates) * noise
    replaced = outputs_with_state(model, params, batch, states, layer_index, bottlenecked)
    cross_entropy = -target_log_probs(replaced, target)
    capacity = (kl.mean(axis=-1) * mask).sum(axis=-1) / real_tokens
    return cross_entropy + beta * capacity

  transform = per_example_optimizer(optimizer, learning_rate)

  def step(carry, step_key):
    alpha, opt_state = carry
    grads = jax.grad(lambda a: example_losses(a, step_key).sum())(alpha)
    updates, opt_state = transform.update(grads, opt_state, alpha)
    return (optax.apply_updates(alpha, updates), opt_state), None

  (alpha, _), _ = jax.lax.scan(step, (alpha, transform.init(alpha)),
                               jax.random.split(key, steps))
  final_loss = example_losses(alpha, jax.random.fold_in(key, steps))
  gates, kl = kl_per_feature(alpha)
  capacity = kl / math.log(2.0) * mask[..., None]
  if attribution == 'capacity':
    token_scores = capacity.sum(axis=-1)
  else:
    token_scores = gates.mean(axis=-1) * mask
  return BottleneckAttribution(token_scores=token_scores, capacity=capacity, gates=gates,
                               target=target, final_loss=final_loss)
