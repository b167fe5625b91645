"""What the attribution baselines share: targets, resumed passes, erasure by a baseline.

Every baseline reads and replaces a state ``h_l`` through the model's
``forward_from``, the injection point DiffMask uses, so an attribution "to
layer ``l``" means the same thing for every method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmx.models.base import MaskableModel


def check_classifier_outputs(outputs: jax.Array, method: str) -> None:
  """One-line ``ValueError`` unless ``outputs`` are ``(batch, classes)`` logits."""
  if outputs.ndim != 2:
    raise ValueError(f'{method} needs (batch, classes) outputs, got shape {outputs.shape}')


def check_layer_index(model: MaskableModel, layer_index: int) -> None:
  """One-line ``ValueError`` unless ``layer_index`` names one of the model's states."""
  num_states = len(model.state_dims)
  if not 0 <= layer_index < num_states:
    raise ValueError(f'layer_index must be in [0, {num_states}), got {layer_index}')


def resolve_target(outputs: jax.Array, target: jax.Array | None) -> jax.Array:
  """``(batch,)`` int32 classes to explain: ``target``, or the clean prediction when ``None``."""
  if target is None:
    return jnp.argmax(outputs, axis=-1).astype(jnp.int32)
  return jnp.asarray(target).astype(jnp.int32)


def baseline_like(baseline: jax.Array | None, state: jax.Array) -> jax.Array:
  """``baseline`` broadcast to ``state``'s ``(batch, seq, dim)`` in float32 (zeros if ``None``)."""
  if baseline is None:
    return jnp.zeros(state.shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), state.shape)


def outputs_with_state(model: MaskableModel, params, batch: dict, states, layer_index: int,
                       new_state: jax.Array) -> jax.Array:
  """The model's outputs with ``h_l`` replaced by ``new_state`` ``(batch, seq, dim)``.

  Only what lies above ``h_l`` is recomputed (``forward_from``).
  """
  return model.forward_from(params, batch, states, layer_index,
                            lambda index, old: new_state.astype(old.dtype))


def erased_state(state: jax.Array, keep: jax.Array, baseline: jax.Array) -> jax.Array:
  """``keep * state + (1 - keep) * baseline``: ``keep`` ``(batch, seq)`` in [0, 1]."""
  keep = keep[..., None].astype(jnp.float32)
  return keep * state.astype(jnp.float32) + (1.0 - keep) * baseline


def target_log_probs(outputs: jax.Array, target: jax.Array) -> jax.Array:
  """``(batch,)`` log-probability of ``target`` under softmax ``outputs``."""
  log_probs = jax.nn.log_softmax(outputs.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, target[:, None], axis=-1)[:, 0]


def target_scores(outputs: jax.Array, target: jax.Array, output: str) -> jax.Array:
  """``(batch,)`` the explained quantity: the target ``'logit'`` or ``'probability'``."""
  outputs = outputs.astype(jnp.float32)
  if output == 'logit':
    return jnp.take_along_axis(outputs, target[:, None], axis=-1)[:, 0]
  if output == 'probability':
    return jnp.exp(target_log_probs(outputs, target))
  raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
