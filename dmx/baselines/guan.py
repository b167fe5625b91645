"""Guan et al. (2019): per-token noise scales that maximise entropy under a prediction constraint.

"Towards a deep and unified understanding of deep neural models in NLP"
perturbs every token's state ``h_t`` (``dim`` features) with isotropic noise
of its own scale ``sigma_t``,

    h~_t = h_t + sigma_t * eps_t,     eps_t ~ N(0, I_dim),

and, per example, finds the largest scales that keep the model's outputs ``s``
(here the logits) where they were:

    loss = ||f(h~) - s||^2 / output_variance - entropy_weight * sum_{real t} H(h~_t),

with ``H(h~_t) = dim * (log sigma_t + log(2 pi e) / 2)`` the entropy of token
``t``'s perturbation. A token the prediction needs tolerates only a small
``sigma_t``; the attribution is ``1 / sigma_t`` (as the original DiffMask
code's toy notebook scored it). ``sigma_t = softplus(rho_t)``, ``rho``
initialised to -5 (almost no noise).

The original DiffMask code summed the squared error over the batch but
averaged the entropy over it (and counted one feature's entropy per token),
so its ``la`` on a batch of ``B`` examples of ``dim`` features is
``entropy_weight = la / (B * dim)`` here, where examples are independent.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dmx.baselines.common import check_classifier_outputs, check_layer_index, outputs_with_state
from dmx.baselines.schulz import per_example_optimizer
from dmx.models.base import MaskableModel


class NoiseScaleAttribution(NamedTuple):
  """Guan et al.'s attributions for one batch.

  Attributes:
    token_scores: ``(batch, seq)`` ``1 / sigma``; 0 on padding.
    noise_scales: ``(batch, seq)`` the learned ``sigma`` (large: unimportant).
    final_loss: ``(batch,)`` each example's loss at the last step.
  """
  token_scores: jax.Array
  noise_scales: jax.Array
  final_loss: jax.Array


def guan_noise_scales(model: MaskableModel, params, batch: dict, key: jax.Array, *,
                      layer_index: int = 0, entropy_weight: float = 5e-4, steps: int = 500,
                      learning_rate: float = 0.1, optimizer: str = 'rmsprop',
                      initial_scale_logit: float = -5.0,
                      output_variance: float = 1.0) -> NoiseScaleAttribution:
  """Per-example maximum-entropy noise scales on state ``h_l`` (Guan et al., 2019).

  Jittable (everything but ``params``, ``batch`` and ``key`` static).
  Examples are optimised independently. Defaults are the original DiffMask
  code's toy settings (500 steps of centered RMSprop at 0.1), with its
  effective entropy weight per example: ``la = 1`` on 1 000 validation
  examples of a 2-d state is ``5e-4`` (see the module docstring).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    key: PRNG key for the noise (one draw per step).
    layer_index: the state to perturb (0: word embeddings).
    entropy_weight: ``lambda``, weight of the summed entropy.
    steps, learning_rate, optimizer: the optimisation (``'rmsprop'`` or ``'adam'``).
    initial_scale_logit: initial ``rho`` (``sigma = softplus(rho)``).
    output_variance: ``sigma_s^2``, the scale the squared error is divided by.

  Returns:
    :class:`NoiseScaleAttribution`.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  if entropy_weight < 0 or not output_variance > 0:
    raise ValueError(f'need entropy_weight >= 0 and output_variance > 0, '
                     f'got {entropy_weight}, {output_variance}')
  check_layer_index(model, layer_index)
  outputs, states = model.forward(params, batch)
  check_classifier_outputs(outputs, 'Guan et al.')
  clean = outputs.astype(jnp.float32)
  state = states[layer_index].astype(jnp.float32)
  dim = state.shape[-1]
  mask = batch['mask'].astype(jnp.float32)
  transform = per_example_optimizer(optimizer, learning_rate)

  def example_losses(scale_logits, step_key):
    scales = jax.nn.softplus(scale_logits)
    noisy = state + scales[..., None] * jax.random.normal(step_key, state.shape)
    replaced = outputs_with_state(model, params, batch, states, layer_index, noisy)
    squared_error = jnp.sum((replaced.astype(jnp.float32) - clean) ** 2, axis=-1)
    entropy = dim * (jnp.log(scales) + 0.5 * math.log(2 * math.pi * math.e))
    return squared_error / output_variance - entropy_weight * jnp.sum(entropy * mask, axis=-1)

  def step(carry, step_key):
    scale_logits, opt_state = carry
    grads = jax.grad(lambda r: example_losses(r, step_key).sum())(scale_logits)
    updates, opt_state = transform.update(grads, opt_state, scale_logits)
    return (optax.apply_updates(scale_logits, updates), opt_state), None

  scale_logits = jnp.full(state.shape[:-1], initial_scale_logit, jnp.float32)
  (scale_logits, _), _ = jax.lax.scan(step, (scale_logits, transform.init(scale_logits)),
                                      jax.random.split(key, steps))
  final_loss = example_losses(scale_logits, jax.random.fold_in(key, steps))
  scales = jax.nn.softplus(scale_logits)
  return NoiseScaleAttribution(token_scores=mask / scales, noise_scales=scales * mask,
                               final_loss=final_loss)
