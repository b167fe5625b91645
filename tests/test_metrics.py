"""Tests for dmx.metrics against scipy, hand-computed scores and float64 numpy references."""

import fractions
import math

import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------
# ERASER faithfulness: comprehensiveness, sufficiency, AOPC


class BagOfVectorsModel:
  """Logits ``= sum_t mask_t h0_t @ W + bias`` with ``h0 = inputs``: one state, no hidden layer.

  Batches hold ``inputs`` ``(batch, seq, dim)`` and ``mask``.
  """
  state_dims = (3,)

  def forward(self, params, batch):
    return self._head(params, batch, batch['inputs']), (batch['inputs'],)

  def forward_from(self, params, batch, states, layer_index, intervention):
    return self._head(params, batch, intervention(layer_index, states[0]))

  def _head(self, params, batch, h0):
    return jnp.einsum('bt,btd,dc->bc', batch['mask'].astype(jnp.float32), h0,
                      params['W']) + params['bias']


def exact_count(fraction: float, num_units: int) -> int:
  """``clip(ceil(f * n), 1, n)`` in exact decimal arithmetic (0 when ``n = 0``)."""
  if num_units == 0:
    return 0
  return min(num_units, max(1, math.ceil(fractions.Fraction(str(fraction)) * num_units)))


def reference_keep_masks(scores, unit_ids, fraction):
  """Per example, numpy ``(without_top, only_top)`` keep masks over positions, by plain Python."""
  masks = []
  for row_scores, row_units in zip(np.asarray(scores, np.float64), np.asarray(unit_ids)):
    units = sorted(set(int(u) for u in row_units if u >= 0))
    ranked = sorted(units, key=lambda unit: (-row_scores[unit], unit))
    top = set(ranked[:exact_count(fraction, len(units))])
    in_top = np.array([u in top for u in row_units])
    erasable = row_units >= 0
    masks.append((~in_top, in_top | ~erasable))
  return masks


def reference_curves(params, batch, scores, unit_ids, fractions_, baseline):
  """``(comprehensiveness, sufficiency)`` ``(fractions, batch)`` of the bag-of-vectors model,
  in float64 numpy."""
  W = np.asarray(params['W'], np.float64)
  bias = np.asarray(params['bias'], np.float64)
  inputs = np.asarray(batch['inputs'], np.float64)
  mask = np.asarray(batch['mask'], np.float64)
  baseline = np.asarray(baseline, np.float64)

  def probabilities(h0, row):
    logits = (mask[row][:, None] * h0).sum(axis=0) @ W + bias
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()

  unit_ids = np.where(np.asarray(batch['mask'], bool), unit_ids, -1)
  comprehensiveness = np.zeros((len(fractions_), len(inputs)))
  sufficiency = np.zeros_like(comprehensiveness)
  for f, fraction in enumerate(fractions_):
    for row, (without_top, only_top) in enumerate(reference_keep_masks(scores, unit_ids,
                                                                       fraction)):
      clean = probabilities(inputs[row], row)
      target = clean.argmax()
      erase = lambda keep: np.where(keep[:, None], inputs[row], baseline)
      comprehensiveness[f, row] = clean[target] - probabilities(erase(without_top), row)[target]
      sufficiency[f, row] = clean[target] - probabilities(erase(only_top), row)[target]
  return comprehensiveness, sufficiency


@pytest.fixture(scope='module')
def bag_of_vectors():
  model = BagOfVectorsModel()
  params = {'W': jax.random.normal(jax.random.key(0), (3, 4)),
            'bias': jax.random.normal(jax.random.key(1), (4,))}
  inputs = jax.random.normal(jax.random.key(2), (4, 7, 3))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 3 + [0] * 4, [1] * 6 + [0]], bool)
  return model, params, {'inputs': inputs, 'mask': mask}


def test_units_to_select_is_an_exact_ceiling_with_at_least_one_unit():
  fractions_ = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
  num_units = np.arange(0, 120)
  counts = np.asarray(metrics.units_to_select(fractions_, num_units))
  expected = np.array([[exact_count(f, n) for n in num_units] for f in fractions_])
  np.testing.assert_array_equal(counts, expected)
  assert counts[2, 30] == 3  # 0.1 * 30 is 3.0000000000000004 in float64: still 3 units
  assert counts[0, 5] == 1  # 0.01 of 5 units rounds to 0 units: at least one


@pytest.mark.parametrize('unit', ['wordpiece', 'word'])
def test_erasure_curves_match_a_float64_reference(bag_of_vectors, jit_or_not, unit):
  model, params, batch = bag_of_vectors
  mask = batch['mask']
  erasable = mask.copy()
  erasable[:, 0] = False  # the first position plays [CLS]: never erased
  if unit == 'wordpiece':
    unit_ids = metrics.wordpiece_units(erasable)
    num_units = mask.shape[1]
  else:  # words of two pieces, then one: unit ids 0, 0, 1, 1, 2, ...
    unit_ids = np.where(erasable, (np.arange(mask.shape[1]) - 1) // 2, -1).astype(np.int32)
    num_units = 4
  scores = np.asarray(jax.random.normal(jax.random.key(3), (len(mask), num_units)))
  baseline = np.array([0.3, -0.2, 0.5], np.float32)
  fractions_ = (0.01, 0.2, 0.5, 1.0)
  curves = jit_or_not(lambda p, b, s, u: metrics.erasure_curves(
      model, p, b, s, u, fractions=fractions_, baseline=baseline))(params, batch, scores, unit_ids)
  comprehensiveness, sufficiency = reference_curves(params, batch, scores, unit_ids, fractions_,
                                                    baseline)
  np.testing.assert_allclose(curves.comprehensiveness, comprehensiveness, atol=2e-6)
  np.testing.assert_allclose(curves.sufficiency, sufficiency, atol=2e-6)
  units_per_example = [len(set(row[row >= 0])) for row in np.where(mask, unit_ids, -1)]
  np.testing.assert_array_equal(curves.num_units, units_per_example)
  np.testing.assert_array_equal(curves.num_selected, [[exact_count(f, n) for n in
                                                       units_per_example] for f in fractions_])
  # keeping every unit is the clean input: sufficiency exactly 0 at f = 1
  np.testing.assert_array_equal(np.asarray(curves.sufficiency)[-1], 0.0)


def test_erasure_curves_on_a_tiny_bert_match_one_pass_per_example():
  from dmx.models.bert import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  model = BertModel(BertConfig.tiny(head='classification', num_labels=3))
  params = model.init(jax.random.key(0), 8)
  lengths = np.array([8, 5, 3])  # [CLS] words [SEP]; the last holds a single word
  mask = np.arange(8)[None] < lengths[:, None]
  input_ids = np.asarray(jax.random.randint(jax.random.key(1), (3, 8), 5, 128)) * mask
  batch = {'input_ids': input_ids, 'mask': mask}
  erasable = mask & (np.arange(8)[None] > 0) & (np.arange(8)[None] < lengths[:, None] - 1)
  unit_ids = metrics.wordpiece_units(erasable)
  scores = np.asarray(jax.random.uniform(jax.random.key(2), (3, 8)))
  baseline = np.asarray(params['embeddings']['word_embeddings']['embedding'][3])
  fractions_ = metrics.ERASER_FRACTIONS
  curves = jax.jit(lambda p, b, s: metrics.erasure_curves(
      model, p, b, s, unit_ids, fractions=fractions_, baseline=baseline))(params, batch, scores)

  @jax.jit
  def probabilities_of_one(single, keep):
    """Softmax of one example ``(1, seq)`` with ``h0`` erased where ``keep`` is false."""
    _, states = model.forward(params, single)
    replaced = jnp.where(keep[None, :, None], states[0], baseline)
    return jax.nn.softmax(model.forward_from(params, single, states, 0, lambda i, old: replaced))

  for f, fraction in enumerate(fractions_):
    for row, (without_top, only_top) in enumerate(reference_keep_masks(scores, unit_ids,
                                                                       fraction)):
      single = {'input_ids': input_ids[row:row + 1], 'mask': mask[row:row + 1]}
      clean = np.asarray(probabilities_of_one(single, np.ones(8, bool))[0], np.float64)
      target = clean.argmax()
      erased = lambda keep: float(probabilities_of_one(single, keep)[0, target])
      assert curves.comprehensiveness[f, row] == pytest.approx(
          clean[target] - erased(without_top), abs=1e-5)
      assert curves.sufficiency[f, row] == pytest.approx(clean[target] - erased(only_top),
                                                         abs=1e-5)
  # the single-word sentence: every fraction selects its word, so it is always sufficient
  np.testing.assert_array_equal(np.asarray(curves.num_selected)[:, 2], 1)
  np.testing.assert_array_equal(np.asarray(curves.sufficiency)[:, 2], 0.0)
  assert len(set(np.asarray(curves.comprehensiveness)[:, 2].tolist())) == 1


def test_ties_rank_the_leftmost_unit_first():
  unit_ids = np.array([[-1, 0, 1, 2, 3, -1], [-1, 0, 1, 2, 3, -1]], np.int32)
  scores = np.array([[1.0, 1.0, 1.0, 1.0, 0, 0], [0.0, 2.0, 2.0, -1.0, 0, 0]], np.float32)
  selected, counts = metrics.top_unit_selection(scores, unit_ids, (0.25, 0.5, 0.75))
  np.testing.assert_array_equal(counts, [[1, 1], [2, 2], [3, 3]])
  selected = np.asarray(selected)
  np.testing.assert_array_equal(selected[:, 0, :4], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
  # signed: the negative unit ranks last, below the zero one
  np.testing.assert_array_equal(selected[:, 1, :4], [[0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]])
  # units owning no position (4, 5) are never selected, whatever their score
  assert not selected[..., 4:].any()


def test_an_example_without_erasable_units_selects_nothing(bag_of_vectors):
  model, params, batch = bag_of_vectors
  unit_ids = metrics.wordpiece_units(np.zeros_like(batch['mask']))
  curves = metrics.erasure_curves(model, params, batch, np.ones(batch['mask'].shape), unit_ids)
  np.testing.assert_array_equal(curves.num_selected, 0)
  np.testing.assert_array_equal(curves.comprehensiveness, 0.0)
  np.testing.assert_array_equal(curves.sufficiency, 0.0)


def test_extreme_scores_and_logits_stay_finite(bag_of_vectors):
  model, params, batch = bag_of_vectors
  params = {'W': params['W'] * 1e4, 'bias': params['bias']}
  unit_ids = metrics.wordpiece_units(batch['mask'])
  scores = np.full(batch['mask'].shape, 3e38, np.float32)
  curves = metrics.erasure_curves(model, params, batch, scores, unit_ids)
  for value in (curves.comprehensiveness, curves.sufficiency, curves.full_probability):
    assert np.all(np.isfinite(value))


def test_faithfulness_summary_and_aopc():
  comprehensiveness = np.array([[0.1, 0.3], [0.2, 0.4], [0.6, 0.8]])
  sufficiency = -comprehensiveness
  summary = metrics.faithfulness_summary(comprehensiveness, sufficiency, (0.1, 0.2, 0.5))
  assert summary['comprehensiveness'] == pytest.approx({'0.1': 0.2, '0.2': 0.3, '0.5': 0.7})
  # AOPC: the mean over fractions, then over examples
  per_example = np.array([0.9 / 3, 1.5 / 3])
  assert summary['aopc_comprehensiveness'] == pytest.approx(per_example.mean())
  assert summary['aopc_sufficiency'] == pytest.approx(-per_example.mean())
  assert summary['aopc_comprehensiveness_se'] == pytest.approx(per_example.std(ddof=1) /
                                                               np.sqrt(2))
  assert summary['num_examples'] == 2
  np.testing.assert_allclose(metrics.aopc(comprehensiveness), per_example)


@pytest.mark.parametrize('call, message', [
    (lambda: metrics.units_to_select((0.0, 0.5), [3]), r'fractions must be in \(0, 1\]'),
    (lambda: metrics.units_to_select((), [3]), 'at least one fraction'),
    (lambda: metrics.units_to_select((1.5,), [3]), r'fractions must be in \(0, 1\]'),
    (lambda: metrics.check_unit_scores([[0.0, np.nan]], [[0, 1]], 'lime'),
     'lime: non-finite score on a real unit of example 0'),
    (lambda: metrics.check_unit_scores([[0.0]], [[0, 1]]), 'unit id 1 but only 1 unit scores'),
    (lambda: metrics.faithfulness_summary(np.zeros((2, 3)), np.zeros((2, 3)), (0.5,)),
     'need two'),
])
def test_bad_faithfulness_input_is_a_one_line_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
  # a NaN on a unit that owns no position is ignored
  metrics.check_unit_scores([[0.0, np.nan]], [[0, -1]])
