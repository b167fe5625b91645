"""Occlusion / leave-one-out (Zeiler and Fergus 2014; Li et al. 2016) on any state.

Each real position ``t`` of state ``h_l`` is erased in turn (replaced by a
baseline vector, zeros by default) and the model resumed above ``h_l``; the
attribution of ``t`` is how much the target class's probability (or logit)
drops: ``score(clean) - score(h with h_t erased)``. Signed: a position whose
removal raises the score gets a negative attribution. One resumed pass per
position (``seq`` resumed passes); jittable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmx.baselines.common import (baseline_like, check_classifier_outputs, check_layer_index,
                                  erased_state, outputs_with_state, resolve_target, target_scores)
from dmx.models.base import MaskableModel


class OcclusionAttribution(NamedTuple):
  """Leave-one-out attributions for one batch.

  Attributes:
    token_scores: ``(batch, seq)`` drop of the target score when the position
      is erased; 0 on padding.
    target: ``(batch,)`` int32 class explained.
  """
  token_scores: jax.Array
  target: jax.Array


def occlusion(model: MaskableModel, params, batch: dict, *, layer_index: int = 0,
              baseline: jax.Array | None = None, target: jax.Array | None = None,
              output: str = 'probability') -> OcclusionAttribution:
  """Leave-one-out attribution to the positions of state ``h_l``.

  Jittable (``layer_index`` and ``output`` static).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    layer_index: the state whose positions are erased (0: word embeddings).
    baseline: what an erased position becomes, broadcastable to
      ``(batch, seq, dim)``; zeros when ``None``.
    target: ``(batch,)`` classes to explain; the clean prediction when ``None``.
    output: the target ``'probability'`` (default) or ``'logit'``.

  Returns:
    :class:`OcclusionAttribution`.
  """
  check_layer_index(model, layer_index)
  outputs, states = model.forward(params, batch)
  check_classifier_outputs(outputs, 'occlusion')
  target = resolve_target(outputs, target)
  clean_scores = target_scores(outputs, target, output)
  state = states[layer_index]
  baseline = baseline_like(baseline, state)
  mask = batch['mask'].astype(jnp.float32)
  seq = state.shape[1]

  def score_without(position):
    keep = 1.0 - jax.nn.one_hot(position, seq, dtype=jnp.float32)
    keep = jnp.broadcast_to(keep, mask.shape)
    erased = erased_state(state, keep, baseline)
    return target_scores(outputs_with_state(model, params, batch, states, layer_index, erased),
                         target, output)

  # lax.map: one position at a time keeps memory at one batch's activations
  erased_scores = jax.lax.map(score_without, jnp.arange(seq))  # (seq, batch)
  return OcclusionAttribution(token_scores=(clean_scores[None] - erased_scores).T * mask,
                              target=target)
