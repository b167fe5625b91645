"""Exact erasure search: the smallest set of positions to keep that keeps the prediction.

For each example, positions of state ``h_l`` are erased (replaced by a
baseline vector, zeros by default) and the model is resumed above ``h_l``
(``forward_from``, DiffMask's injection point). The search tries the subsets
of *kept* real positions by size, smallest first, and stops at the first size
with a subset whose prediction (argmax) equals the clean one. That is the
erasure of the paper (sec. 2, 4.1): erase as much as possible without changing
the decision. Several subsets of that size are often equally valid (on the
toy task, keeping any one ``n`` digit); ``num_optimal`` counts them, and one
is returned, chosen by ``tie_break``: ``'confidence'`` (default) the one with
the highest probability of the predicted class, i.e. the kept subset that
best supports the decision, or ``'closest'`` the one whose outputs are closest
to the clean ones (smallest ``KL(clean || erased)``); remaining ties go to the
first subset in lexicographic order. The attribution is 1 on kept positions, 0 on
erased ones: on the toy task, a delta on one digit.

Keeping nothing is not an explanation, so the search starts at ``min_size=1``
(an all-erased input predicts the majority class for many examples).

The cost is exponential in the length (``sum_k C(L, k)`` evaluations up to the
answer), so the search is bounded by ``max_evaluations`` and ``max_seconds``;
when a bound is hit it raises :class:`ErasureBudgetExceeded`, or, with
``on_budget='flag'``, returns with ``found`` false for the unresolved
examples. ``max_evaluations_per_example`` bounds each example on its own: an
example whose next size would take it past that bound is given up (``found``
false, ``complete`` false) while the others go on.

Options for comparing other searches with it (the paper's Table 2):
``return_optimal=True`` also returns *every* optimal subset of each example
(``optimal_keeps``) with its divergence, and ``max_divergence`` makes a
subset valid only if it also keeps ``KL(clean || erased)`` within that bound
(the constraint DiffMask puts on its masks). ``evaluator`` reuses one
:func:`make_subset_evaluator` across calls, so a search split into many calls
compiles once per shape. The batched evaluation of many (example, subset) pairs is one
jitted program; the search itself is a host loop, since it stops early.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmx.baselines.common import (baseline_like, check_classifier_outputs, check_layer_index,
                                  erased_state, outputs_with_state)
from dmx.models.base import MaskableModel

ON_BUDGET = ('raise', 'flag')
TIE_BREAKS = ('confidence', 'closest')


class ErasureBudgetExceeded(RuntimeError):
  """The exact search needed more evaluations or time than it was allowed."""


class ErasureResult(NamedTuple):
  """The result of :func:`erasure_search` (numpy arrays).

  Attributes:
    keep: ``(batch, seq)`` float32, 1 on the kept positions (the attribution).
    size: ``(batch,)`` int, number of kept positions; -1 where not found.
    found: ``(batch,)`` bool, false where the search stopped at a bound first.
    divergence: ``(batch,)`` ``KL(clean || erased)`` of the chosen subset (nats).
    num_optimal: ``(batch,)`` int, how many subsets of the smallest size keep
      the prediction (0 where not found).
    evaluations: model evaluations (one per example and subset) spent.
    complete: whether every example with enough real positions was resolved.
    optimal_keeps: with ``return_optimal``, per example a ``(num_optimal, seq)``
      float32 array of every optimal subset (1 on kept positions), in
      lexicographic order; ``(0, seq)`` where not found. ``None`` otherwise.
    optimal_divergences: with ``return_optimal``, per example the
      ``(num_optimal,)`` ``KL(clean || erased)`` of those subsets.
  """
  keep: np.ndarray
  size: np.ndarray
  found: np.ndarray
  divergence: np.ndarray
  num_optimal: np.ndarray
  evaluations: int
  complete: bool
  optimal_keeps: tuple[np.ndarray, ...] | None = None
  optimal_divergences: tuple[np.ndarray, ...] | None = None


@functools.lru_cache(maxsize=None)
def _combinations(length: int, size: int) -> np.ndarray:
  """``(C(length, size), size)`` int32 index tuples in lexicographic order."""
  combinations = list(itertools.combinations(range(length), size))
  return np.asarray(combinations, np.int32).reshape(len(combinations), size)


def make_subset_evaluator(model: MaskableModel, layer_index: int):
  """A jitted evaluator of (example, kept subset) pairs.

  ``evaluate(params, batch, states, clean_outputs, example_index, keep,
  baseline)``: ``example_index`` ``(pairs,)`` picks each pair's example in
  ``batch``, ``states`` and ``clean_outputs``; ``keep`` ``(pairs, seq)`` its
  kept positions; ``baseline`` broadcastable to one example's ``(seq, dim)``
  state. Returns, per pair, the predicted class, ``KL(clean || erased)`` and
  the log-probability of the clean prediction, each ``(pairs,)``.
  """
  @jax.jit
  def evaluate(params, batch, states, clean_outputs, example_index, keep, baseline):
    pick = lambda array: jnp.take(array, example_index, axis=0)
    pair_batch = jax.tree_util.tree_map(pick, batch)
    pair_states = tuple(pick(state) for state in states)
    state = pair_states[layer_index]
    erased = erased_state(state, keep, baseline_like(baseline, state))
    outputs = outputs_with_state(model, params, pair_batch, pair_states, layer_index, erased)
    log_erased = jax.nn.log_softmax(outputs.astype(jnp.float32), axis=-1)
    log_clean = jax.nn.log_softmax(pick(clean_outputs).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_clean) * (log_clean - log_erased), axis=-1)
    clean_class = jnp.argmax(log_clean, axis=-1)
    confidence = jnp.take_along_axis(log_erased, clean_class[:, None], axis=-1)[:, 0]
    return jnp.argmax(outputs, axis=-1), kl, confidence

  return evaluate


def erasure_search(model: MaskableModel, params, batch: dict, *, layer_index: int = 0,
                   baseline: jax.Array | None = None, min_size: int = 1,
                   max_evaluations: int = 1_000_000, max_seconds: float | None = None,
                   pairs_per_call: int = 4096, on_budget: str = 'raise',
                   tie_break: str = 'confidence',
                   max_evaluations_per_example: int | None = None,
                   max_divergence: float | None = None, return_optimal: bool = False,
                   evaluator=None) -> ErasureResult:
  """Smallest kept subsets of the positions of ``h_l`` that keep each prediction.

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``; every entry has
      the batch on its first axis.
    layer_index: the state whose positions are erased (0: word embeddings).
    baseline: what an erased position becomes, broadcastable to one example's
      ``(seq, dim)`` state; zeros when ``None``.
    min_size: smallest number of kept positions tried (>= 0).
    max_evaluations: bound on model evaluations (example-subset pairs).
    max_seconds: bound on wall time; ``None`` for none.
    pairs_per_call: pairs evaluated per jitted call (one compiled shape).
    on_budget: ``'raise'`` :class:`ErasureBudgetExceeded` or ``'flag'``
      (return with ``found`` false) when a bound is hit.
    tie_break: among equally small valid subsets, ``'confidence'`` (highest
      probability of the predicted class) or ``'closest'`` (smallest KL).
    max_evaluations_per_example: bound on one example's evaluations; an
      example that would pass it is given up (``found`` false), the others
      go on. ``None`` for none.
    max_divergence: when given, a subset is valid only if it keeps the
      prediction *and* ``KL(clean || erased) <= max_divergence``.
    return_optimal: also return every optimal subset (``optimal_keeps``,
      ``optimal_divergences``).
    evaluator: a ``make_subset_evaluator(model, layer_index)`` to reuse
      (compiled once across calls); a fresh one when ``None``.

  Returns:
    :class:`ErasureResult`.
  """
  if on_budget not in ON_BUDGET:
    raise ValueError(f'on_budget must be one of {ON_BUDGET}, got {on_budget!r}')
  if tie_break not in TIE_BREAKS:
    raise ValueError(f'tie_break must be one of {TIE_BREAKS}, got {tie_break!r}')
  if min_size < 0 or max_evaluations < 1 or pairs_per_call < 1:
    raise ValueError(f'need min_size >= 0, max_evaluations >= 1 and pairs_per_call >= 1, got '
                     f'{min_size}, {max_evaluations}, {pairs_per_call}')
  if max_evaluations_per_example is not None and max_evaluations_per_example < 1:
    raise ValueError(f'max_evaluations_per_example must be >= 1, got {max_evaluations_per_example}')
  if max_divergence is not None and not max_divergence >= 0:
    raise ValueError(f'max_divergence must be >= 0, got {max_divergence}')
  check_layer_index(model, layer_index)
  started = time.monotonic()
  clean_outputs, states = jax.jit(model.forward)(params, batch)
  check_classifier_outputs(clean_outputs, 'erasure search')
  target = np.asarray(jnp.argmax(clean_outputs, axis=-1))
  mask = np.asarray(batch['mask'], bool)
  num_examples, seq = mask.shape
  real_positions = [np.flatnonzero(row) for row in mask]
  lengths = np.array([len(positions) for positions in real_positions])
  baseline = jnp.zeros((), jnp.float32) if baseline is None else jnp.asarray(baseline, jnp.float32)
  evaluate = make_subset_evaluator(model, layer_index) if evaluator is None else evaluator

  keep = np.zeros((num_examples, seq), np.float32)
  size = np.full(num_examples, -1)
  divergence = np.full(num_examples, np.nan)
  num_optimal = np.zeros(num_examples, np.int64)
  optimal_keeps = ([np.zeros((0, seq), np.float32) for _ in range(num_examples)]
                   if return_optimal else None)
  optimal_divergences = ([np.zeros((0,), np.float64) for _ in range(num_examples)]
                         if return_optimal else None)
  extras = (optimal_keeps, optimal_divergences)
  evaluations = 0
  spent = np.zeros(num_examples, np.int64)  # evaluations per example
  gave_up = np.zeros(num_examples, bool)
  unresolved = lengths >= min_size
  for subset_size in range(min_size, seq + 1):
    candidates = np.flatnonzero(unresolved & (lengths >= subset_size))
    if max_evaluations_per_example is not None:
      over = [i for i in candidates if spent[i] + math.comb(int(lengths[i]), subset_size)
              > max_evaluations_per_example]
      gave_up[over] = True
      unresolved[over] = False
      candidates = np.setdiff1d(candidates, over)
    if len(candidates) == 0:
      break
    needed = int(sum(math.comb(int(lengths[i]), subset_size) for i in candidates))
    if evaluations + needed > max_evaluations:
      return _budget_hit(on_budget, f'erasure search: {len(candidates)} examples unresolved at '
                         f'{subset_size} kept positions after {evaluations} evaluations; that '
                         f'size needs {needed} more (max_evaluations={max_evaluations})',
                         keep, size, divergence, num_optimal, evaluations, extras)
    # every (example, subset) pair of this size, as example indices and keep masks
    example_index = np.concatenate([
        np.full(math.comb(int(lengths[i]), subset_size), i) for i in candidates])
    keep_masks = np.zeros((needed, seq), np.float32)
    row = 0
    for i in candidates:
      chosen = real_positions[i][_combinations(int(lengths[i]), subset_size)]
      keep_masks[np.arange(row, row + len(chosen))[:, None], chosen] = 1.0
      row += len(chosen)
    predicted = np.empty(needed, np.int64)
    kl = np.empty(needed, np.float64)
    confidence = np.empty(needed, np.float64)
    for start in range(0, needed, pairs_per_call):
      if max_seconds is not None and time.monotonic() - started > max_seconds:
        return _budget_hit(on_budget, f'erasure search: {int(unresolved.sum())} examples '
                           f'unresolved at {subset_size} kept positions after {evaluations} '
                           f'evaluations and {max_seconds:g} s (max_seconds)',
                           keep, size, divergence, num_optimal, evaluations, extras)
      stop = min(start + pairs_per_call, needed)
      # pad the last call to the same shape, so one program serves every call
      indices = np.resize(example_index[start:stop], pairs_per_call)
      masks = np.resize(keep_masks[start:stop], (pairs_per_call, seq))
      chunk_predicted, chunk_kl, chunk_confidence = evaluate(
          params, batch, states, clean_outputs, indices, masks, baseline)
      predicted[start:stop] = np.asarray(chunk_predicted)[:stop - start]
      kl[start:stop] = np.asarray(chunk_kl)[:stop - start]
      confidence[start:stop] = np.asarray(chunk_confidence)[:stop - start]
      evaluations += stop - start
    valid = predicted == target[example_index]
    if max_divergence is not None:
      valid &= kl <= max_divergence
    # an example's pairs are contiguous: offsets delimit them
    offsets = np.concatenate([[0], np.cumsum([math.comb(int(lengths[i]), subset_size)
                                              for i in candidates])])
    for i, begin, end in zip(candidates, offsets[:-1], offsets[1:]):
      spent[i] += end - begin
      rows = begin + np.flatnonzero(valid[begin:end])
      if len(rows):
        cost = -confidence[rows] if tie_break == 'confidence' else kl[rows]
        best = rows[np.argmin(cost)]
        keep[i], size[i], divergence[i] = keep_masks[best], subset_size, kl[best]
        num_optimal[i] = len(rows)
        unresolved[i] = False
        if return_optimal:
          optimal_keeps[i], optimal_divergences[i] = keep_masks[rows], kl[rows]
  return _result(keep, size, divergence, num_optimal, evaluations, not gave_up.any(), extras)


def _result(keep, size, divergence, num_optimal, evaluations: int, complete: bool,
            extras) -> ErasureResult:
  optimal_keeps, optimal_divergences = (None if extra is None else tuple(extra)
                                        for extra in extras)
  return ErasureResult(keep, size, size >= 0, divergence, num_optimal, evaluations, complete,
                       optimal_keeps, optimal_divergences)


def _budget_hit(on_budget: str, message: str, keep, size, divergence, num_optimal,
                evaluations: int, extras) -> ErasureResult:
  if on_budget == 'raise':
    raise ErasureBudgetExceeded(message)
  return _result(keep, size, divergence, num_optimal, evaluations, False, extras)
