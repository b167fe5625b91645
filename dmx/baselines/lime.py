"""LIME (Ribeiro et al., 2016): a weighted linear surrogate fit on random token masks.

For each example, ``num_samples`` binary masks over its real positions are
drawn as LIME's text explainer draws them (the number of erased positions
uniform in ``1..L``, which ones uniform; the first sample is the unmasked
example). Erased positions of state ``h_l`` are replaced by a baseline
vector (zeros by default) and the model resumed above ``h_l``. A ridge
regression of the target class's probability (or logit) on the masks, each
sample weighted by LIME's kernel ``sqrt(exp(-d^2 / width^2))`` on the cosine
distance ``d`` (x 100) between its mask and the all-kept mask, gives one
coefficient per position: the attribution (signed). The intercept is not
penalised. Jittable; the samples are evaluated in chunks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmx.baselines.common import (baseline_like, check_classifier_outputs, check_layer_index,
                                  erased_state, outputs_with_state, resolve_target, target_scores)
from dmx.models.base import MaskableModel


class LimeAttribution(NamedTuple):
  """LIME attributions for one batch.

  Attributes:
    token_scores: ``(batch, seq)`` surrogate coefficients; 0 on padding.
    intercept: ``(batch,)`` the surrogate's intercept.
    target: ``(batch,)`` int32 class explained.
  """
  token_scores: jax.Array
  intercept: jax.Array
  target: jax.Array


def lime_masks(key: jax.Array, mask: jax.Array, num_samples: int) -> jax.Array:
  """``(num_samples, batch, seq)`` float32 keep masks drawn as LIME's text explainer does.

  Sample 0 keeps everything; the others erase ``k ~ U{1..L}`` of the ``L``
  real positions, chosen uniformly. Padding is never kept.
  """
  real = mask.astype(bool)
  lengths = real.sum(axis=-1)
  count_key, order_key = jax.random.split(key)
  num_erased = jax.random.randint(count_key, (num_samples,) + lengths.shape, 1,
                                  jnp.maximum(lengths, 1) + 1)
  # a random rank for every real position; the num_erased lowest ranks are erased
  scores = jnp.where(real, jax.random.uniform(order_key, (num_samples,) + real.shape), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  keep = (ranks >= num_erased[..., None]) & real
  return keep.at[0].set(real).astype(jnp.float32)


def lime(model: MaskableModel, params, batch: dict, key: jax.Array, *, layer_index: int = 0,
         num_samples: int = 1000, baseline: jax.Array | None = None,
         target: jax.Array | None = None, output: str = 'probability',
         kernel_width: float = 25.0, ridge: float = 1.0,
         samples_per_call: int = 100) -> LimeAttribution:
  """LIME attribution to the positions of state ``h_l``.

  Jittable (everything but ``params``, ``batch`` and ``key`` static).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    key: PRNG key for the masks.
    layer_index: the state whose positions are erased (0: word embeddings).
    num_samples: masks per example (LIME's default is 5000).
    baseline: what an erased position becomes, broadcastable to
      ``(batch, seq, dim)``; zeros when ``None``.
    target: ``(batch,)`` classes to explain; the clean prediction when ``None``.
    output: regress the target ``'probability'`` (LIME's choice) or ``'logit'``.
    kernel_width: LIME's kernel width (25 for text).
    ridge: L2 penalty of the regression (LIME's ``Ridge(alpha=1)``).
    samples_per_call: masks evaluated together (vectorised); memory grows with it.

  Returns:
    :class:`LimeAttribution`.
  """
  if num_samples < 2:
    raise ValueError(f'num_samples must be >= 2, got {num_samples}')
  if not kernel_width > 0 or ridge < 0 or samples_per_call < 1:
    raise ValueError(f'need kernel_width > 0, ridge >= 0, samples_per_call >= 1, got '
                     f'{kernel_width}, {ridge}, {samples_per_call}')
  check_layer_index(model, layer_index)
  outputs, states = model.forward(params, batch)
  check_classifier_outputs(outputs, 'LIME')
  target = resolve_target(outputs, target)
  state = states[layer_index]
  baseline = baseline_like(baseline, state)
  mask = batch['mask'].astype(jnp.float32)
  masks = lime_masks(key, mask, num_samples)  # (samples, batch, seq)

  def scores_with(keep):
    erased = erased_state(state, keep, baseline)
    return target_scores(outputs_with_state(model, params, batch, states, layer_index, erased),
                         target, output)

  # pad to whole chunks of samples; the padding's responses are dropped below
  chunk = min(samples_per_call, num_samples)
  num_chunks = math.ceil(num_samples / chunk)
  padded = jnp.concatenate([masks, jnp.ones((num_chunks * chunk - num_samples,) + mask.shape)])
  responses = jax.lax.map(jax.vmap(scores_with), padded.reshape((num_chunks, chunk) + mask.shape))
  responses = responses.reshape((-1,) + mask.shape[:1])[:num_samples]  # (samples, batch)

  # LIME's kernel on the cosine distance to the unmasked example (x 100, as its text explainer)
  lengths = jnp.maximum(mask.sum(axis=-1), 1.0)
  cosine = masks.sum(axis=-1) / jnp.sqrt(jnp.maximum(masks.sum(axis=-1), 1e-12) * lengths)
  distance = (1.0 - cosine) * 100.0
  weights = jnp.sqrt(jnp.exp(-distance ** 2 / kernel_width ** 2))  # (samples, batch)

  # weighted ridge per example, intercept unpenalised: centre by the weighted means
  total = weights.sum(axis=0)
  mean_x = jnp.einsum('sb,sbt->bt', weights, masks) / total[:, None]
  mean_y = jnp.einsum('sb,sb->b', weights, responses) / total
  centred_x = masks - mean_x[None]
  centred_y = responses - mean_y[None]
  gram = jnp.einsum('sb,sbt,sbu->btu', weights, centred_x, centred_x)
  # padding columns are all zero: a unit diagonal there keeps the system invertible
  regulariser = ridge * jnp.eye(mask.shape[1]) + jax.vmap(jnp.diag)(1.0 - mask)
  moment = jnp.einsum('sb,sbt,sb->bt', weights, centred_x, centred_y)
  coefficients = jnp.linalg.solve(gram + regulariser, moment[..., None])[..., 0] * mask
  intercept = mean_y - jnp.sum(coefficients * mean_x, axis=-1)
  return LimeAttribution(token_scores=coefficients, intercept=intercept, target=target)
