"""Scores for attributions and predictions (numpy, float64, outside jit).

Attributions are compared as distributions over a sentence's positions, as in
the paper's Table 1: ``D_KL(ground truth || method)`` and ``D_JS`` in nats,
each attribution renormalised to sum to 1 over the real positions.
"""

from __future__ import annotations

import numpy as np


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
