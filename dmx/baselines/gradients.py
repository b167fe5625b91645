"""Plain gradients (saliency, Simonyan et al. 2013) and gradient x input, on any state.

For a state ``h_l`` (``layer_index=0``: the word embeddings) and the target
class's logit ``f``:

* gradient: ``df/dh_{t,d}``; a token's score is the L2 norm over ``d`` (the
  usual saliency map, non-negative);
* gradient x input: ``h_{t,d} * df/dh_{t,d}``; a token's score is the sum over
  ``d`` (signed; it is the first-order Taylor term of removing ``h_t``, and
  integrated gradients with one step and a zero baseline).

The state is replaced through ``forward_from``, DiffMask's injection point.
Both are jittable and cost one forward and one backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmx.baselines.common import (check_classifier_outputs, check_layer_index, outputs_with_state,
                                  resolve_target, target_scores)
from dmx.models.base import MaskableModel


class GradientAttribution(NamedTuple):
  """Gradient attributions for one batch.

  Attributes:
    gradients: ``(batch, seq, dim)`` d(target output)/d(state).
    gradient_norm: ``(batch, seq)`` L2 norm of ``gradients`` over ``dim``.
    gradient_times_input: ``(batch, seq)`` ``sum_d state * gradients``.
    target: ``(batch,)`` int32 class whose output was differentiated.
  """
  gradients: jax.Array
  gradient_norm: jax.Array
  gradient_times_input: jax.Array
  target: jax.Array


def gradient_attribution(model: MaskableModel, params, batch: dict, *, layer_index: int = 0,
                         target: jax.Array | None = None,
                         output: str = 'logit') -> GradientAttribution:
  """Gradients of the target class's output with respect to the state ``h_l``.

  Jittable (``layer_index`` and ``output`` static).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``, true on real tokens.
    layer_index: the state ``h_l`` to attribute to (0: word embeddings).
    target: ``(batch,)`` classes to explain; the clean prediction when ``None``.
    output: differentiate the target ``'logit'`` (default) or its ``'probability'``.

  Returns:
    :class:`GradientAttribution`; every token score is 0 on padding.
  """
  check_layer_index(model, layer_index)
  outputs, states = model.forward(params, batch)
  check_classifier_outputs(outputs, 'gradient attribution')
  target = resolve_target(outputs, target)
  state = states[layer_index].astype(jnp.float32)

  def summed_target(new_state):
    # examples are independent: the gradient of the batch sum is each example's own gradient
    replaced = outputs_with_state(model, params, batch, states, layer_index, new_state)
    return target_scores(replaced, target, output).sum()

  gradients = jax.grad(summed_target)(state)
  mask = batch['mask'].astype(jnp.float32)
  return GradientAttribution(
      gradients=gradients,
      gradient_norm=jnp.sqrt(jnp.sum(gradients ** 2, axis=-1)) * mask,
      gradient_times_input=jnp.sum(gradients * state, axis=-1) * mask,
      target=target)
