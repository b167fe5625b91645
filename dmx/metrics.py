"""Scores for attributions and predictions.

Attributions are compared as distributions over a sentence's positions, as in
the paper's Table 1: ``D_KL(ground truth || method)`` and ``D_JS`` in nats,
each attribution renormalised to sum to 1 over the real positions (numpy,
float64, outside jit).

Faithfulness without a ground truth (DeYoung et al. 2020, ERASER): for a
fraction ``f`` of a sentence's erasable units (words or word pieces) ranked by
an attribution, with ``y`` the clean predicted class,

* comprehensiveness ``= p(y | x) - p(y | x without its top-k units)``: high
  when the units the method ranks first are the ones the prediction needs;
* sufficiency ``= p(y | x) - p(y | only the top-k units of x)``: low when they
  are enough on their own;
* AOPC: the mean of either over the fractions, as ERASER's code averages them
  (no ``k = 0`` term). :func:`erasure_curves` computes both, jitted and
  batched over fractions and examples.

``k = ceil(f * n)`` units for ``n`` erasable units (so at least one unit for
any ``f > 0``; at most ``n``). Erasing replaces the word embeddings ``h0`` of
an erased unit's positions by one baseline vector (the caller chooses it and
gives the same to every method); positions outside every unit (``[CLS]``,
``[SEP]``, padding) are never erased, and the attention mask is unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmx.baselines.common import baseline_like, erased_state, resolve_target
from dmx.models.base import MaskableModel


def normalize_attribution(scores, mask) -> np.ndarray:
  """Non-negative scores to a distribution over the real positions of each row.

  ``(batch, seq), (batch, seq) -> (batch, seq)`` float64; a row of zeros stays zeros.
  Negative scores are an error: take magnitudes first (gradients are signed).
  """
  scores = np.asarray(scores, np.float64) * np.asarray(mask, np.float64)
  if np.any(scores < 0):
    raise ValueError('attributions must be non-negative to be compared as distributions')
  total = scores.sum(axis=-1, keepdims=True)
  return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(axis=-1)


def attribution_kl(reference, attribution, mask) -> np.ndarray:
  """``(batch,)`` ``KL(reference || attribution)``; ``inf`` where the method puts
  zero mass on a position the reference needs (erasure's deltas)."""
  return _kl(normalize_attribution(reference, mask), normalize_attribution(attribution, mask))


def attribution_js(reference, attribution, mask) -> np.ndarray:
  """``(batch,)`` Jensen-Shannon divergence in nats, at most ``log 2``."""
  p = normalize_attribution(reference, mask)
  q = normalize_attribution(attribution, mask)
  middle = 0.5 * (p + q)
  return 0.5 * _kl(p, middle) + 0.5 * _kl(q, middle)


def attribution_divergences(reference, attribution, mask) -> dict:
  """Mean ``kl`` and ``js`` over the rows whose reference has any mass.

  Returns ``{'kl', 'js', 'num_examples'}``; ``kl`` is ``inf`` if any row's is.
  """
  reference = np.asarray(reference, np.float64)
  defined = (reference * np.asarray(mask)).sum(axis=-1) > 0
  if not defined.any():
    raise ValueError('no example has a defined reference attribution')
  kl = attribution_kl(reference, attribution, mask)[defined]
  js = attribution_js(reference, attribution, mask)[defined]
  return {'kl': float(kl.mean()), 'js': float(js.mean()), 'num_examples': int(defined.sum())}


def macro_f1(labels, predictions, num_classes: int) -> float:
  """Macro-averaged F1 over ``num_classes`` classes (a class never seen nor predicted scores 0)."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  scores = []
  for c in range(num_classes):
    true_positive = np.sum((predictions == c) & (labels == c))
    predicted, actual = np.sum(predictions == c), np.sum(labels == c)
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  return float(np.mean(scores))


# ---------------------------------------------------------------------------
# Faithfulness by erasure (ERASER's comprehensiveness, sufficiency and AOPC)

ERASER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)
# ceil(f * n) is taken with this slack, so that products that are integers in exact arithmetic
# (0.1 * 30 = 3.0000000000000004 in float64) are not rounded up to the next unit
_COUNT_SLACK = 1e-4


class ErasureCurves(NamedTuple):
  """Faithfulness of one attribution on one batch, at every fraction.

  Attributes:
    target: ``(batch,)`` int32 class whose probability is tracked (the clean prediction).
    full_probability: ``(batch,)`` ``p(y | x)``.
    num_units: ``(batch,)`` int32 erasable units of each example.
    num_selected: ``(fractions, batch)`` int32 top-ranked units ``k`` at each fraction.
    without_top_probability: ``(fractions, batch)`` ``p(y | x without the top-k units)``.
    only_top_probability: ``(fractions, batch)`` ``p(y | only the top-k units kept)``.
    comprehensiveness: ``(fractions, batch)`` ``full - without_top``.
    sufficiency: ``(fractions, batch)`` ``full - only_top``.
  """
  target: jax.Array
  full_probability: jax.Array
  num_units: jax.Array
  num_selected: jax.Array
  without_top_probability: jax.Array
  only_top_probability: jax.Array
  comprehensiveness: jax.Array
  sufficiency: jax.Array


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  """``fractions`` as a tuple; a one-line ``ValueError`` unless each is in ``(0, 1]``."""
  fractions = tuple(float(f) for f in fractions)
  if not fractions:
    raise ValueError('need at least one fraction')
  bad = [f for f in fractions if not 0.0 < f <= 1.0]
  if bad:
    raise ValueError(f'fractions must be in (0, 1], got {bad}')
  return fractions


def units_to_select(fractions: Sequence[float], num_units) -> jax.Array:
  """``(fractions, batch)`` int32 ``k = clip(ceil(f * n), 1, n)``; 0 where ``n = 0``.

  ``num_units`` ``(batch,)``: the erasable units ``n`` of each example. Jittable.
  """
  fractions = jnp.asarray(check_fractions(fractions), jnp.float32)
  num_units = jnp.asarray(num_units, jnp.int32)
  counts = jnp.ceil(fractions[:, None] * num_units[None, :].astype(jnp.float32) - _COUNT_SLACK)
  return jnp.clip(counts.astype(jnp.int32), jnp.minimum(num_units, 1)[None], num_units[None])


def present_units(unit_ids: jax.Array, num_units: int) -> jax.Array:
  """``(batch, num_units)`` bool: which units own at least one position of ``unit_ids``."""
  return jnp.any(jax.nn.one_hot(unit_ids, num_units, dtype=jnp.bool_), axis=1)


def top_unit_selection(scores: jax.Array, unit_ids: jax.Array,
                       fractions: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """Which units are among the top ``k`` at each fraction.

  Units are ranked by ``scores`` in decreasing order (signed: a negative
  score ranks below zero); equal scores rank the lower unit index (the
  leftmost) first. Jittable.

  Args:
    scores: ``(batch, num_units)`` one score per unit; ignored for units that own no position.
    unit_ids: ``(batch, seq)`` int, the unit of each position, ``-1`` for positions that are
      never erased (special tokens, padding).
    fractions: the fractions ``f`` of each example's units to select.

  Returns:
    ``(selected, num_selected)``: ``(fractions, batch, num_units)`` bool and
    ``(fractions, batch)`` int32.
  """
  num_units = scores.shape[-1]
  present = present_units(unit_ids, num_units)
  # absent units sort after every present one; a stable sort keeps ties in index order
  keys = jnp.where(present, -scores.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(keys, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)  # (batch, num_units): 0 for the top unit
  counts = units_to_select(fractions, present.sum(axis=-1))
  selected = (ranks[None] < counts[..., None]) & present[None]
  return selected, counts


def erasure_curves(model: MaskableModel, params, batch: dict, scores: jax.Array,
                   unit_ids: jax.Array, *, fractions: Sequence[float] = ERASER_FRACTIONS,
                   baseline: jax.Array | None = None,
                   target: jax.Array | None = None) -> ErasureCurves:
  """ERASER comprehensiveness and sufficiency of ``scores`` at every fraction.

  One clean pass and ``2 * len(fractions)`` passes resumed at ``h0`` (a
  ``lax.map`` over the erasure patterns, each on the whole batch). Jittable
  with ``fractions`` static. ``scores`` must be finite on every unit that
  owns a position (see :func:`check_unit_scores`): a NaN would rank silently.

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    scores: ``(batch, num_units)`` the attribution of each unit (higher: more important).
    unit_ids: ``(batch, seq)`` int, the unit of each position, ``-1`` where never erased.
    fractions: fractions of each example's units kept or erased.
    baseline: the vector an erased position's ``h0`` becomes, broadcastable to
      ``(batch, seq, dim)``; zeros when ``None``.
    target: ``(batch,)`` class to track; the clean prediction when ``None``.

  Returns:
    :class:`ErasureCurves`.
  """
  fractions = check_fractions(fractions)
  if scores.ndim != 2 or unit_ids.shape != batch['mask'].shape:
    raise ValueError(f'need scores (batch, num_units) and unit_ids shaped like the mask '
                     f'{batch["mask"].shape}, got {scores.shape} and {unit_ids.shape}')
  outputs, states = model.forward(params, batch)
  if outputs.ndim != 2:
    raise ValueError(f'erasure curves need (batch, classes) outputs, got shape {outputs.shape}')
  target = resolve_target(outputs, target)
  unit_ids = jnp.where(batch['mask'].astype(bool), unit_ids, -1)
  selected, counts = top_unit_selection(scores, unit_ids, fractions)
  # a unit's selection spread to its positions: (fractions, batch, seq); -1 positions read False
  position_selected = jnp.take_along_axis(
      selected, jnp.maximum(unit_ids, 0)[None].repeat(len(fractions), axis=0), axis=-1)
  position_selected &= (unit_ids >= 0)[None]
  erasable = (unit_ids >= 0)[None]
  # keep masks: without the top units, then only the top units (never-erased positions stay)
  keep = jnp.concatenate([~position_selected, position_selected | ~erasable]).astype(jnp.float32)
  word_embeddings = states[0]
  baseline = baseline_like(baseline, word_embeddings)

  def target_probability(keep_mask):
    erased = erased_state(word_embeddings, keep_mask, baseline)
    logits = model.forward_from(params, batch, states, 0,
                                lambda index, old: erased.astype(old.dtype))
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probabilities, target[:, None], axis=-1)[:, 0]

  probabilities = jax.lax.map(target_probability, keep)  # (2 * fractions, batch)
  full = jnp.take_along_axis(jax.nn.softmax(outputs.astype(jnp.float32), axis=-1),
                             target[:, None], axis=-1)[:, 0]
  without_top, only_top = probabilities[:len(fractions)], probabilities[len(fractions):]
  num_units = present_units(unit_ids, scores.shape[-1]).sum(axis=-1).astype(jnp.int32)
  return ErasureCurves(target=target, full_probability=full, num_units=num_units,
                       num_selected=counts, without_top_probability=without_top,
                       only_top_probability=only_top, comprehensiveness=full[None] - without_top,
                       sufficiency=full[None] - only_top)


def check_unit_scores(scores, unit_ids, method: str = 'attribution') -> None:
  """One-line ``ValueError`` unless ``scores`` ``(batch, num_units)`` is finite on every unit
  that owns a position of ``unit_ids`` ``(batch, seq)`` (numpy, outside jit)."""
  scores, unit_ids = np.asarray(scores), np.asarray(unit_ids)
  if scores.ndim != 2 or unit_ids.ndim != 2 or scores.shape[0] != unit_ids.shape[0]:
    raise ValueError(f'{method}: need scores (batch, num_units) and unit_ids (batch, seq), got '
                     f'{scores.shape} and {unit_ids.shape}')
  if unit_ids.max(initial=-1) >= scores.shape[1]:
    raise ValueError(f'{method}: unit id {unit_ids.max()} but only {scores.shape[1]} unit scores')
  rows, cols = np.nonzero(unit_ids >= 0)
  bad = ~np.isfinite(scores[rows, unit_ids[rows, cols]])
  if bad.any():
    raise ValueError(f'{method}: non-finite score on a real unit of example {rows[bad][0]}')


def wordpiece_units(erasable) -> np.ndarray:
  """``(batch, seq)`` int32 unit ids ranking word pieces: a position's own index where
  ``erasable`` (real, non-special), else -1. Scores are then the ``(batch, seq)`` token scores."""
  erasable = np.asarray(erasable, bool)
  return np.where(erasable, np.arange(erasable.shape[1])[None], -1).astype(np.int32)


def aopc(curve, axis: int = 0) -> np.ndarray:
  """Area over the perturbation curve: the mean over the fractions ``axis`` (ERASER's AOPC)."""
  return np.asarray(curve, np.float64).mean(axis=axis)


def faithfulness_summary(comprehensiveness, sufficiency, fractions: Sequence[float]) -> dict:
  """JSON-ready means over examples of ``(fractions, examples)`` curves.

  Returns ``{'comprehensiveness': {str(f): mean}, 'sufficiency': {...},
  'aopc_comprehensiveness', 'aopc_sufficiency', 'aopc_comprehensiveness_se',
  'aopc_sufficiency_se', 'num_examples'}``; ``_se`` are standard errors over examples.
  """
  comprehensiveness = np.asarray(comprehensiveness, np.float64)
  sufficiency = np.asarray(sufficiency, np.float64)
  fractions = check_fractions(fractions)
  if comprehensiveness.shape != sufficiency.shape or comprehensiveness.shape[0] != len(fractions):
    raise ValueError(f'need two (fractions={len(fractions)}, examples) curves, got '
                     f'{comprehensiveness.shape} and {sufficiency.shape}')
  num = comprehensiveness.shape[1]
  if num == 0:
    raise ValueError('no example to summarise')

  def standard_error(values):
    return float(values.std(ddof=1) / math.sqrt(num)) if num > 1 else None

  per_example_comprehensiveness = aopc(comprehensiveness)
  per_example_sufficiency = aopc(sufficiency)
  return {
      'comprehensiveness': {str(f): float(v) for f, v in
                            zip(fractions, comprehensiveness.mean(axis=1))},
      'sufficiency': {str(f): float(v) for f, v in zip(fractions, sufficiency.mean(axis=1))},
      'aopc_comprehensiveness': float(per_example_comprehensiveness.mean()),
      'aopc_sufficiency': float(per_example_sufficiency.mean()),
      'aopc_comprehensiveness_se': standard_error(per_example_comprehensiveness),
      'aopc_sufficiency_se': standard_error(per_example_sufficiency),
      'num_examples': int(num),
  }
