"""Integrated gradients (Sundararajan et al., 2017) on any state of a maskable model.

For a state ``x`` (e.g. ``h0``, the word embeddings), a baseline ``x'`` and
the target-class logit ``f``, integrated gradients attribute

    IG_i(x) = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da

to every coordinate, here approximated by a quadrature over ``steps`` points
of the straight path: a right or midpoint Riemann sum, or Gauss-Legendre
(exact for integrands polynomial in ``a`` of degree < ``2 * steps``, so the
cheapest for smooth models). Completeness: ``sum_i IG_i = f(x) - f(x')`` up to
the quadrature error, which :attr:`IntegratedGradients.convergence_delta`
reports.

The state is replaced through ``forward_from``, the injection point DiffMask
uses, so ``layer_index=0`` attributes to the raw word embeddings (position and
token-type embeddings and LayerNorm are recomputed on the path, as for an
input gate) and ``layer_index=l`` to the hidden state ``h_l``.

``variant='paper'`` (default) takes the gradient at the path point with
respect to the path point, as Sundararajan et al. and the DiffMask paper
define it. ``variant='original'`` reproduces the released DiffMask code, which
differentiated ``f(x' + a (x - x'))`` with respect to ``x`` rather than to the
path point, so every gradient carries an extra factor ``a``: the integral
weights points near the input more, and completeness no longer holds (its
``convergence_delta`` is then the variant's deviation, not a quadrature error).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmx.models.base import MaskableModel

INTEGRATION_RULES = ('right', 'midpoint', 'gauss_legendre')
IG_VARIANTS = ('paper', 'original')


class IntegratedGradients(NamedTuple):
  """Integrated-gradients attributions for one batch.

  Attributes:
    attributions: ``(batch, seq, dim)`` float32, one per coordinate of the state.
    token_scores: ``(batch, seq)`` attributions summed over ``dim``.
    target: ``(batch,)`` int32 class whose logit was attributed.
    convergence_delta: ``(batch,)`` ``sum(attributions) - (f(x) - f(x'))``;
      zero for an exact integral.
  """
  attributions: jax.Array
  token_scores: jax.Array
  target: jax.Array
  convergence_delta: jax.Array


def path_quadrature(steps: int, rule: str = 'right') -> tuple[np.ndarray, np.ndarray]:
  """``(alphas, weights)``, each ``(steps,)``: ``integral_0^1 g ~ sum_k weights_k g(alphas_k)``.

  ``'right'`` is the paper's ``alphas = k / steps`` for ``k = 1..steps``;
  ``'midpoint'`` uses ``(k - 1/2) / steps``, exact for integrands linear in
  ``a``; both weigh every point ``1 / steps``. ``'gauss_legendre'`` takes the
  Gauss-Legendre nodes and weights mapped to ``(0, 1)``. The weights sum to 1.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  uniform = np.full(steps, 1.0 / steps, np.float32)
  if rule == 'right':
    return np.arange(1, steps + 1, dtype=np.float32) / steps, uniform
  if rule == 'midpoint':
    return (np.arange(steps, dtype=np.float32) + 0.5) / steps, uniform
  if rule == 'gauss_legendre':
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1], weights sum to 2
    return ((nodes + 1.0) / 2.0).astype(np.float32), (weights / 2.0).astype(np.float32)
  raise ValueError(f'rule must be one of {INTEGRATION_RULES}, got {rule!r}')


def path_gradient_integral(gradient: Callable[[jax.Array], jax.Array], start: jax.Array,
                           difference: jax.Array, steps: int, rule: str = 'right',
                           path_batch_size: int | None = None,
                           alpha_power: int = 0) -> jax.Array:
  """``sum_k weights_k alphas_k^alpha_power gradient(start + alphas_k difference)``.

  The quadrature of :func:`path_quadrature` over the straight path from
  ``start`` to ``start + difference`` (any shape; ``gradient`` maps a path
  point to an array of its shape). ``alpha_power=1`` adds the original DiffMask
  code's extra factor ``a``. Path points are vmapped in chunks of
  ``path_batch_size`` (``None``: all at once) and the chunks scanned, so
  memory holds one chunk's activations.
  """
  alphas, weights = path_quadrature(steps, rule)
  weights = weights * alphas ** alpha_power
  chunk = steps if path_batch_size is None else path_batch_size
  if chunk < 1:
    raise ValueError(f'path_batch_size must be >= 1, got {path_batch_size}')
  chunk = min(chunk, steps)
  # padding points (alpha 0) carry weight 0, so any chunk size gives the same sum
  num_chunks = math.ceil(steps / chunk)
  padding = num_chunks * chunk - steps
  chunk_alphas = np.concatenate([alphas, np.zeros(padding, np.float32)]).reshape(num_chunks, chunk)
  chunk_weights = np.concatenate([weights, np.zeros(padding, np.float32)]).reshape(num_chunks,
                                                                                    chunk)

  def accumulate(total, inputs):
    alpha_values, point_weights = inputs
    gradients = jax.vmap(lambda alpha: gradient(start + alpha * difference))(alpha_values)
    return total + jnp.tensordot(point_weights, gradients, axes=1), None

  total = jnp.zeros(difference.shape, jnp.float32)
  if num_chunks == 1:  # no loop around a single chunk: a smaller program, compiled faster
    return accumulate(total, (jnp.asarray(chunk_alphas[0]), jnp.asarray(chunk_weights[0])))[0]
  return jax.lax.scan(accumulate, total,
                      (jnp.asarray(chunk_alphas), jnp.asarray(chunk_weights)))[0]


def integrated_gradients(model: MaskableModel, params, batch: dict, *, layer_index: int = 0,
                         steps: int = 50, baseline: jax.Array | None = None,
                         target: jax.Array | None = None, rule: str = 'right',
                         variant: str = 'paper',
                         path_batch_size: int | None = None) -> IntegratedGradients:
  """Integrated gradients of the target-class logit with respect to state ``h_l``.

  Jittable (close over or mark static ``layer_index``, ``steps``, ``rule``,
  ``variant`` and ``path_batch_size``).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    layer_index: the state ``h_l`` to attribute to (0: word embeddings).
    steps: points on the path (the cost is ``steps`` forward and backward passes).
    baseline: ``x'``, broadcastable to ``(batch, seq, dim)``; zeros when ``None``.
    target: ``(batch,)`` classes to explain; the clean prediction when ``None``.
    rule: ``'right'`` or ``'midpoint'`` Riemann sum or ``'gauss_legendre'``
      (see :func:`path_quadrature`).
    variant: ``'paper'`` (the path point's gradient) or ``'original'`` (the
      released DiffMask code's gradient with respect to the input, ``a`` times
      larger; see the module docstring).
    path_batch_size: path points evaluated together (vectorised); ``None``
      evaluates all ``steps`` at once. Smaller values trade speed for memory.

  Returns:
    :class:`IntegratedGradients`.
  """
  if variant not in IG_VARIANTS:
    raise ValueError(f'variant must be one of {IG_VARIANTS}, got {variant!r}')
  outputs, states = model.forward(params, batch)
  if outputs.ndim != 2:
    raise ValueError(f'integrated gradients needs (batch, classes) outputs, got {outputs.shape}')
  target = (jnp.argmax(outputs, axis=-1) if target is None else jnp.asarray(target)).astype(
      jnp.int32)
  state = states[layer_index].astype(jnp.float32)
  baseline = (jnp.zeros_like(state) if baseline is None
              else jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), state.shape))
  difference = state - baseline

  def target_logits(path_state: jax.Array) -> jax.Array:
    """``(batch,)`` target logits with ``h_l`` replaced by ``path_state``."""
    replaced = model.forward_from(params, batch, states, layer_index,
                                  lambda index, old: path_state.astype(old.dtype))
    return jnp.take_along_axis(replaced, target[:, None], axis=-1)[:, 0]

  # examples are independent, so the gradient of the batch sum is every example's own gradient
  gradient = jax.grad(lambda path_state: target_logits(path_state).sum())

  # d f(x' + a (x - x')) / dx = a * (the path point's gradient): the original's extra a
  gradient_sum = path_gradient_integral(gradient, baseline, difference, steps, rule,
                                        path_batch_size,
                                        alpha_power=1 if variant == 'original' else 0)
  attributions = difference * gradient_sum
  clean = jnp.take_along_axis(outputs.astype(jnp.float32), target[:, None], axis=-1)[:, 0]
  gap = clean - target_logits(baseline).astype(jnp.float32)
  token_scores = attributions.sum(axis=-1)
  return IntegratedGradients(attributions=attributions, token_scores=token_scores, target=target,
                             convergence_delta=token_scores.sum(axis=-1) - gap)
