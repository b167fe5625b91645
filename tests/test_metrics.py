"""Tests for dmx.metrics against scipy and hand-computed scores."""

import numpy as np
import pytest
from scipy import spatial, stats

from dmx import metrics


def random_attributions(seed, batch=5, seq=8):
  rng = np.random.default_rng(seed)
  reference = rng.uniform(0.0, 1.0, (batch, seq))
  attribution = rng.uniform(0.01, 1.0, (batch, seq))
  lengths = rng.integers(2, seq + 1, batch)
  mask = np.arange(seq)[None, :] < lengths[:, None]
  return reference, attribution, mask


def test_normalize_attribution_is_a_distribution_over_real_positions():
  reference, _, mask = random_attributions(0)
  reference[:, -1] = 100.0  # padding mass must be dropped
  normalized = metrics.normalize_attribution(reference, mask)
  assert normalized.dtype == np.float64
  np.testing.assert_allclose(normalized.sum(axis=-1), 1.0)
  np.testing.assert_array_equal(normalized[~mask], 0.0)
  for row in range(len(mask)):
    real = reference[row][mask[row]]
    np.testing.assert_allclose(normalized[row][mask[row]], real / real.sum())


def test_normalize_attribution_keeps_zero_rows():
  scores = np.asarray([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
  mask = np.asarray([[True, True, False], [True, True, True]])
  np.testing.assert_array_equal(metrics.normalize_attribution(scores, mask),
                                [[0.0, 0.0, 0.0], [0.25, 0.75, 0.0]])


def test_normalize_attribution_rejects_negative_scores():
  with pytest.raises(ValueError, match='non-negative'):
    metrics.normalize_attribution(np.asarray([[0.5, -0.1, 0.2]]), np.ones((1, 3), bool))


def test_attribution_kl_matches_scipy_entropy():
  reference, attribution, mask = random_attributions(1)
  result = metrics.attribution_kl(reference, attribution, mask)
  assert result.shape == (len(mask),)
  for row in range(len(mask)):
    expected = stats.entropy(reference[row][mask[row]], attribution[row][mask[row]])
    np.testing.assert_allclose(result[row], expected, rtol=1e-10, atol=1e-12)


def test_attribution_js_matches_scipy_jensenshannon():
  reference, attribution, mask = random_attributions(2)
  reference[0, 0] = 0.0  # a zero in one distribution only
  result = metrics.attribution_js(reference, attribution, mask)
  for row in range(len(mask)):
    # scipy returns the JS *distance*: the square root of the divergence (natural log)
    distance = spatial.distance.jensenshannon(reference[row][mask[row]],
                                              attribution[row][mask[row]])
    np.testing.assert_allclose(result[row], distance ** 2, rtol=1e-9, atol=1e-12)


def test_attribution_kl_is_infinite_where_attribution_misses_reference_mass():
  reference = np.asarray([[0.2, 0.5, 0.3, 0.0], [0.2, 0.5, 0.3, 0.0]])
  attribution = np.asarray([[0.4, 0.6, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0]])
  mask = np.asarray([[True, True, True, False]] * 2)
  result = metrics.attribution_kl(reference, attribution, mask)
  assert result[0] == np.inf
  assert np.isfinite(result[1])
  np.testing.assert_allclose(result[1], stats.entropy(reference[1, :3], attribution[1, :3]))
  # the reverse direction only needs the attribution's support inside the reference's
  reverse = metrics.attribution_kl(attribution, reference, mask)
  assert np.isfinite(reverse[0])


def test_attribution_js_is_bounded_by_log_two():
  reference, attribution, mask = random_attributions(3, batch=20)
  js = metrics.attribution_js(reference, attribution, mask)
  assert np.all((js >= 0.0) & (js <= np.log(2) + 1e-12))
  disjoint = metrics.attribution_js(np.asarray([[1.0, 0.0, 0.0]]),
                                    np.asarray([[0.0, 2.0, 1.0]]), np.ones((1, 3), bool))
  np.testing.assert_allclose(disjoint, [np.log(2)], rtol=1e-12)
  same = metrics.attribution_js(reference, 3.0 * reference, mask)
  np.testing.assert_allclose(same, 0.0, atol=1e-15)


def test_attribution_divergences_skips_rows_without_reference_mass():
  reference, attribution, mask = random_attributions(4, batch=6)
  reference[1] = 0.0                 # no mass at all
  mask[4, -2:] = False
  reference[4] = 0.0
  reference[4, -2:] = 1.0            # mass only on padding
  result = metrics.attribution_divergences(reference, attribution, mask)
  kept = [0, 2, 3, 5]
  assert result['num_examples'] == len(kept)
  kl = [stats.entropy(reference[r][mask[r]], attribution[r][mask[r]]) for r in kept]
  js = [spatial.distance.jensenshannon(reference[r][mask[r]], attribution[r][mask[r]]) ** 2
        for r in kept]
  np.testing.assert_allclose(result['kl'], np.mean(kl), rtol=1e-10)
  np.testing.assert_allclose(result['js'], np.mean(js), rtol=1e-9)
  assert isinstance(result['kl'], float) and isinstance(result['js'], float)


def test_attribution_divergences_kl_is_inf_if_any_row_is():
  reference = np.asarray([[0.5, 0.5], [0.3, 0.7]])
  attribution = np.asarray([[0.5, 0.5], [1.0, 0.0]])
  result = metrics.attribution_divergences(reference, attribution, np.ones((2, 2), bool))
  assert result['kl'] == np.inf
  assert np.isfinite(result['js'])


def test_attribution_divergences_raises_without_any_reference_mass():
  reference = np.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  mask = np.asarray([[True, True, False], [True, True, True]])
  with pytest.raises(ValueError, match='no example'):
    metrics.attribution_divergences(reference, np.ones((2, 3)), mask)


def test_macro_f1_by_hand():
  labels = [0, 0, 1, 1, 2, 2, 2]
  predictions = [0, 1, 1, 1, 2, 0, 0]
  # class 0: P = 1/3, R = 1/2 -> 0.4; class 1: P = 2/3, R = 1 -> 0.8;
  # class 2: P = 1, R = 1/3 -> 0.5; class 3: never seen nor predicted -> 0
  assert metrics.macro_f1(labels, predictions, 3) == pytest.approx((0.4 + 0.8 + 0.5) / 3)
  assert metrics.macro_f1(labels, predictions, 4) == pytest.approx((0.4 + 0.8 + 0.5) / 4)
  assert metrics.macro_f1(labels, labels, 3) == pytest.approx(1.0)
  assert metrics.macro_f1([0, 0, 1], [1, 1, 0], 2) == 0.0


def test_macro_f1_matches_confusion_matrix_computation():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, 200)
  predictions = np.where(rng.uniform(size=200) < 0.6, labels, rng.integers(0, 4, 200))
  confusion = np.zeros((4, 4))
  np.add.at(confusion, (labels, predictions), 1)
  true_positive = np.diag(confusion)
  precision = true_positive / confusion.sum(axis=0)
  recall = true_positive / confusion.sum(axis=1)
  expected = np.mean(2 * precision * recall / (precision + recall))
  assert metrics.macro_f1(labels, predictions, 4) == pytest.approx(expected, rel=1e-12)
  assert isinstance(metrics.macro_f1(labels, predictions, 4), float)
