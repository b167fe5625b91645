"""Tests for dmx.objective against numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import objective


def numpy_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - np.max(logits, axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def numpy_kl(reference_logits, other_logits):
  """``sum_i p_i (log p_i - log q_i)`` over the last axis, skipping ``p_i = 0``."""
  log_p = numpy_log_softmax(reference_logits)
  log_q = numpy_log_softmax(other_logits)
  p = np.exp(log_p)
  with np.errstate(invalid='ignore'):
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
  return terms.sum(axis=-1)


def numpy_masked_mean(values, mask):
  values, mask = np.asarray(values, np.float64), np.asarray(mask, bool)
  result = np.zeros(values.shape[0])
  for row in range(values.shape[0]):
    if mask[row].any():
      result[row] = values[row][mask[row]].mean()
  return result


# ----------------------------------------------------------------------------
# kl_divergence
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(7,), (4, 5), (2, 3, 6), (3, 1, 2)])
def test_kl_divergence_matches_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  reference = rng.normal(0.0, 2.0, shape).astype(np.float32)
  other = rng.normal(0.0, 2.0, shape).astype(np.float32)
  result = objective.kl_divergence(jnp.asarray(reference), jnp.asarray(other))
  assert result.shape == shape[:-1]
  assert result.dtype == jnp.float32
  np.testing.assert_allclose(result, numpy_kl(reference, other), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(result) >= -1e-6)


def test_kl_divergence_of_identical_inputs_is_zero():
  logits = jnp.asarray(np.random.default_rng(0).normal(0.0, 3.0, (5, 9)), jnp.float32)
  np.testing.assert_allclose(objective.kl_divergence(logits, logits), 0.0, atol=1e-6)
  # softmax is shift invariant, so a shifted copy is the same distribution
  np.testing.assert_allclose(objective.kl_divergence(logits, logits + 4.0), 0.0, atol=1e-5)


def test_kl_divergence_accepts_bfloat16_and_returns_float32():
  rng = np.random.default_rng(1)
  reference = jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)
  other = jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)
  result = objective.kl_divergence(reference, other)
  assert result.dtype == jnp.float32
  np.testing.assert_allclose(
      result, numpy_kl(np.asarray(reference, np.float64), np.asarray(other, np.float64)),
      rtol=1e-5, atol=1e-6)


def _masked_logits():
  rng = np.random.default_rng(3)
  reference = rng.normal(0.0, 2.0, (3, 6)).astype(np.float32)
  other = rng.normal(0.0, 2.0, (3, 6)).astype(np.float32)
  padding = np.zeros((3, 6), bool)
  padding[0, 4:] = True
  padding[1, [0, 2]] = True  # row 2 has no padding
  reference[padding] = -np.inf
  other[padding] = -np.inf
  return reference, other, padding


def test_kl_divergence_with_shared_minus_inf_is_kl_on_the_support():
  reference, other, padding = _masked_logits()
  result = np.asarray(objective.kl_divergence(jnp.asarray(reference), jnp.asarray(other)))
  assert np.all(np.isfinite(result))
  for row in range(3):
    support = ~padding[row]
    expected = numpy_kl(reference[row][support], other[row][support])
    np.testing.assert_allclose(result[row], expected, rtol=1e-5, atol=1e-6)


def test_kl_divergence_gradients_with_shared_minus_inf_are_finite_and_correct():
  reference, other, padding = _masked_logits()
  grad_reference, grad_other = jax.grad(
      lambda r, o: objective.kl_divergence(r, o).sum(), argnums=(0, 1))(
          jnp.asarray(reference), jnp.asarray(other))
  assert np.all(np.isfinite(grad_reference)) and np.all(np.isfinite(grad_other))
  np.testing.assert_array_equal(np.asarray(grad_other)[padding], 0.0)
  np.testing.assert_array_equal(np.asarray(grad_reference)[padding], 0.0)
  # d KL(p || softmax(o)) / d o = softmax(o) - p on the support
  p = np.exp(numpy_log_softmax(reference))
  q = np.exp(numpy_log_softmax(other))
  np.testing.assert_allclose(np.asarray(grad_other)[~padding], (q - p)[~padding], atol=1e-6)
  # d KL / d r_j = p_j (log p_j - log q_j - KL)
  kl = numpy_kl(reference, other)[:, None]
  with np.errstate(invalid='ignore'):
    expected = p * (numpy_log_softmax(reference) - numpy_log_softmax(other) - kl)
  np.testing.assert_allclose(np.asarray(grad_reference)[~padding], expected[~padding],
                             atol=1e-5)


def test_kl_divergence_with_minus_inf_only_in_reference():
  """Classes the reference rules out contribute nothing, even if the other has mass."""
  reference = np.asarray([[1.0, -np.inf, 0.5, -np.inf]], np.float32)
  other = np.asarray([[0.2, 1.0, -0.3, 2.0]], np.float32)
  result = objective.kl_divergence(jnp.asarray(reference), jnp.asarray(other))
  np.testing.assert_allclose(result, numpy_kl(reference, other), rtol=1e-5)
  gradient = jax.grad(lambda o: objective.kl_divergence(jnp.asarray(reference), o).sum())(
      jnp.asarray(other))
  assert np.all(np.isfinite(gradient))


def test_kl_divergence_is_inf_where_other_rules_out_reference_mass():
  reference = jnp.asarray([1.0, 2.0, 0.0])
  other = jnp.asarray([0.0, -jnp.inf, 0.0])
  assert float(objective.kl_divergence(reference, other)) == np.inf


# ----------------------------------------------------------------------------
# squared_error and output_divergence
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(6,), (4, 3), (2, 3, 5)])
def test_squared_error_matches_numpy(shape):
  rng = np.random.default_rng(len(shape))
  reference = rng.normal(size=shape).astype(np.float32)
  other = rng.normal(size=shape).astype(np.float32)
  result = objective.squared_error(jnp.asarray(reference), jnp.asarray(other))
  assert result.shape == shape[:-1]
  expected = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2, axis=-1)
  np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_output_divergence_kl_sums_heads():
  rng = np.random.default_rng(4)
  reference = rng.normal(size=(3, 2, 7)).astype(np.float32)
  other = rng.normal(size=(3, 2, 7)).astype(np.float32)
  result = objective.output_divergence('kl', jnp.asarray(reference), jnp.asarray(other))
  assert result.shape == (3,)
  expected = numpy_kl(reference[:, 0], other[:, 0]) + numpy_kl(reference[:, 1], other[:, 1])
  np.testing.assert_allclose(result, expected, rtol=1e-5)


def test_output_divergence_kl_for_classification():
  rng = np.random.default_rng(5)
  reference = rng.normal(size=(4, 3)).astype(np.float32)
  other = rng.normal(size=(4, 3)).astype(np.float32)
  result = objective.output_divergence('kl', jnp.asarray(reference), jnp.asarray(other))
  assert result.shape == (4,)
  np.testing.assert_allclose(result, numpy_kl(reference, other), rtol=1e-5)


def test_output_divergence_squared_error_sums_heads():
  rng = np.random.default_rng(6)
  reference = rng.normal(size=(2, 3, 4)).astype(np.float32)
  other = rng.normal(size=(2, 3, 4)).astype(np.float32)
  result = objective.output_divergence('squared_error', jnp.asarray(reference),
                                       jnp.asarray(other))
  expected = np.mean((reference.astype(np.float64) - other) ** 2, axis=-1).sum(axis=-1)
  assert result.shape == (2,)
  np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_output_divergence_rejects_unknown_kind():
  with pytest.raises(ValueError, match='unknown divergence'):
    objective.output_divergence('js', jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# ----------------------------------------------------------------------------
# sparsity_loss
# ----------------------------------------------------------------------------

def _sparsity_inputs():
  rng = np.random.default_rng(7)
  log_keep = np.log(rng.uniform(0.01, 1.0, (4, 6))).astype(np.float32)
  mask = np.ones((4, 6), bool)
  mask[0, 3:] = False
  mask[2, :] = False  # an all-padding row
  mask[3, [1, 4]] = False
  return log_keep, mask


@pytest.mark.parametrize('kind, transform', [('log_l0', lambda x: x), ('l0', np.exp)])
def test_sparsity_loss_matches_numpy(kind, transform):
  log_keep, mask = _sparsity_inputs()
  result = objective.sparsity_loss(kind, jnp.asarray(log_keep), jnp.asarray(mask))
  assert result.shape == (4,)
  assert np.all(np.isfinite(result))
  expected = numpy_masked_mean(transform(log_keep.astype(np.float64)), mask)
  np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
  assert float(result[2]) == 0.0


@pytest.mark.parametrize('kind', ['log_l0', 'l0'])
def test_sparsity_loss_gradient_ignores_padding(kind):
  log_keep, mask = _sparsity_inputs()
  gradient = jax.grad(lambda x: objective.sparsity_loss(kind, x, jnp.asarray(mask)).sum())(
      jnp.asarray(log_keep))
  assert np.all(np.isfinite(gradient))
  np.testing.assert_array_equal(np.asarray(gradient)[~mask], 0.0)
  counts = mask.sum(axis=-1, keepdims=True)
  scale = np.exp(log_keep) if kind == 'l0' else np.ones_like(log_keep)
  expected = np.where(mask, scale / np.maximum(counts, 1), 0.0)
  np.testing.assert_allclose(gradient, expected, rtol=1e-6)


def test_sparsity_losses_differ_and_are_ordered():
  """log_l0 is the mean of log P <= log of the mean of P (Jensen), l0 lies in [0, 1]."""
  log_keep, mask = _sparsity_inputs()
  log_l0 = np.asarray(objective.sparsity_loss('log_l0', jnp.asarray(log_keep), mask))
  l0 = np.asarray(objective.sparsity_loss('l0', jnp.asarray(log_keep), mask))
  defined = mask.any(axis=-1)
  assert np.all(log_l0[defined] < 0.0)
  assert np.all((l0 >= 0.0) & (l0 <= 1.0))
  assert np.all(log_l0[defined] <= np.log(l0[defined]) + 1e-6)


def test_sparsity_loss_rejects_unknown_kind():
  with pytest.raises(ValueError, match='unknown sparsity loss'):
    objective.sparsity_loss('l1', jnp.zeros((2, 3)), jnp.ones((2, 3), bool))


def test_masked_mean_of_all_false_row_is_zero():
  result = objective.masked_mean(jnp.asarray([[1.0, 2.0], [3.0, 4.0]]),
                                 jnp.asarray([[True, True], [False, False]]))
  np.testing.assert_array_equal(result, [1.5, 0.0])


# ----------------------------------------------------------------------------
# lagrangian
# ----------------------------------------------------------------------------

def test_lagrangian_matches_formula():
  rng = np.random.default_rng(8)
  divergence = rng.uniform(0.0, 2.0, 5).astype(np.float32)
  sparsity = rng.uniform(-3.0, 0.0, 5).astype(np.float32)
  multiplier, margin = 1.7, 0.3
  result = objective.lagrangian(jnp.asarray(multiplier), jnp.asarray(divergence), margin,
                                jnp.asarray(sparsity))
  expected = np.mean(multiplier * (divergence.astype(np.float64) - margin) + sparsity)
  assert result.shape == ()
  np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_lagrangian_gradients():
  """d/d lambda is the mean constraint violation; d/d D is lambda / batch."""
  divergence = jnp.asarray([0.5, 1.5, 0.1, 0.2])
  sparsity = jnp.asarray([-1.0, -2.0, -0.5, 0.0])
  margin = 0.4
  grad_multiplier, grad_divergence, grad_sparsity = jax.grad(
      lambda m, d, s: objective.lagrangian(m, d, margin, s), argnums=(0, 1, 2))(
          jnp.asarray(2.5), divergence, sparsity)
  np.testing.assert_allclose(grad_multiplier, np.mean(np.asarray(divergence) - margin),
                             rtol=1e-6)
  np.testing.assert_allclose(grad_divergence, np.full(4, 2.5 / 4), rtol=1e-6)
  np.testing.assert_allclose(grad_sparsity, np.full(4, 1 / 4), rtol=1e-6)


# ----------------------------------------------------------------------------
# the tail (conditional value at risk) of the divergence
# ----------------------------------------------------------------------------

def _reference_tail_mean(divergence: np.ndarray, tail_fraction: float) -> float:
  """Mean of the worst ``tail_fraction * batch`` examples, a fractional one counted in part."""
  worst_first = np.sort(np.asarray(divergence, np.float64))[::-1]
  weight_left, total = tail_fraction * len(worst_first), 0.0
  for value in worst_first:
    weight = min(1.0, weight_left)
    total, weight_left = total + weight * value, weight_left - weight
    if weight_left <= 1e-12:
      break
  return total / (tail_fraction * len(worst_first))


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
@pytest.mark.parametrize('batch,tail_fraction', [(10, 0.25), (10, 0.3), (32, 0.25), (7, 1 / 7),
                                                 (5, 1.0), (6, 0.5), (1, 0.3)])
def test_tail_divergence_mean_is_the_worst_fraction_mean(use_jit, batch, tail_fraction):
  divergence = np.random.default_rng(batch).exponential(0.05, batch).astype(np.float32)
  divergence[:2] = divergence[0]  # a tie must not change the value

  def tail_mean(values):
    threshold = objective.tail_threshold(values, tail_fraction)
    return objective.tail_divergence(values, threshold, tail_fraction).mean()

  tail_mean = jax.jit(tail_mean) if use_jit else tail_mean
  np.testing.assert_allclose(tail_mean(jnp.asarray(divergence)),
                             _reference_tail_mean(divergence, tail_fraction), rtol=1e-5)


def test_tail_divergence_gradient_reaches_only_the_tail():
  divergence = jnp.asarray([0.01, 0.5, 0.02, 0.3, 0.0, 0.04, 0.2, 0.03])
  tail_fraction = 0.25  # the worst 2 of 8
  threshold = objective.tail_threshold(divergence, tail_fraction)
  np.testing.assert_allclose(threshold, 0.3)
  gradient = jax.grad(lambda d: objective.tail_divergence(
      d, jax.lax.stop_gradient(objective.tail_threshold(d, tail_fraction)), tail_fraction).mean())(
          divergence)
  # the threshold example itself sits at the kink: relu's gradient there is 0
  np.testing.assert_allclose(gradient, [0, 1 / 2, 0, 0, 0, 0, 0, 0], atol=1e-7)


def test_whole_batch_tail_is_the_mean():
  divergence = jnp.asarray([0.3, 0.1, 0.7, 0.0])
  threshold = objective.tail_threshold(divergence, 1.0)
  np.testing.assert_allclose(objective.tail_divergence(divergence, threshold, 1.0), divergence)


@pytest.mark.parametrize('tail_fraction', [0.0, -0.1, 1.5])
def test_tail_threshold_rejects_fractions_outside_zero_one(tail_fraction):
  with pytest.raises(ValueError, match='tail_fraction'):
    objective.tail_threshold(jnp.ones(4), tail_fraction)


# ----------------------------------------------------------------------------
# argmax_flip
# ----------------------------------------------------------------------------

def numpy_argmax_flip(reference_logits, other_logits):
  """Per head: the masked pass's best finite rival minus its logit for the clean argmax (>= 0)."""
  reference = np.asarray(reference_logits, np.float64)
  other = np.asarray(other_logits, np.float64)
  heads_reference = reference.reshape(-1, reference.shape[-1])
  heads_other = other.reshape(-1, other.shape[-1])
  flips = np.zeros(len(heads_reference))
  for head, (clean, masked) in enumerate(zip(heads_reference, heads_other)):
    if not np.isfinite(clean).any():
      continue  # an empty head has no prediction to keep
    kept = int(np.argmax(clean))
    rivals = [masked[j] for j in range(len(masked))
              if j != kept and np.isfinite(masked[j]) and np.isfinite(clean[j])]
    if rivals:
      flips[head] = max(0.0, max(rivals) - masked[kept])
  return flips.reshape(reference.shape[0], -1).sum(axis=-1)


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
@pytest.mark.parametrize('shape', [(16, 5), (6, 2, 9), (8, 1)])
def test_argmax_flip_matches_numpy(use_jit, shape):
  rng = np.random.default_rng(shape[-1])
  reference = rng.normal(0.0, 1.0, shape).astype(np.float32)
  other = reference + rng.normal(0.0, 1.0, shape).astype(np.float32)
  flip = jax.jit(objective.argmax_flip) if use_jit else objective.argmax_flip
  result = flip(jnp.asarray(reference), jnp.asarray(other))
  assert result.shape == (shape[0],) and result.dtype == jnp.float32
  expected = numpy_argmax_flip(reference, other)
  np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
  if shape[-1] > 1:  # the sample has flipped and kept rows, or the test proves nothing
    assert (expected > 0).any() and (expected == 0).any()


def test_argmax_flip_is_zero_when_the_prediction_is_kept_and_ignores_the_clean_gap():
  reference = jnp.array([[2.0, 1.99, 0.0], [0.0, 5.0, -3.0]])
  # the clean argmax survives, however much its lead shrinks or grows
  other = jnp.array([[0.5, 0.49, 0.4], [-9.0, 20.0, -9.0]])
  np.testing.assert_array_equal(objective.argmax_flip(reference, other), [0.0, 0.0])
  # a swap of a near-tie: KL is tiny, the flip is the masked logit ratio
  swapped = jnp.array([[1.99, 2.0, 0.0], [0.0, 5.0, -3.0]])
  np.testing.assert_allclose(objective.argmax_flip(reference, swapped), [0.01, 0.0], atol=1e-6)
  assert float(objective.kl_divergence(reference, swapped)[0]) < 1e-4


def test_argmax_flip_with_minus_inf_padding_empty_and_single_class_heads_has_finite_gradients():
  reference, other, padding = _masked_logits()
  result = objective.argmax_flip(jnp.asarray(reference), jnp.asarray(other))
  np.testing.assert_allclose(result, numpy_argmax_flip(reference, other), rtol=1e-6, atol=1e-6)
  grad = np.asarray(jax.grad(lambda o: objective.argmax_flip(jnp.asarray(reference), o).sum())(
      jnp.asarray(other)))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[padding], 0.0)
  # a flipped row's gradient is +1 on its best rival and -1 on the clean class
  for row in np.flatnonzero(np.asarray(result) > 0):
    support = ~padding[row]
    kept = int(np.argmax(reference[row]))
    masked = np.where(support, other[row], -np.inf)
    masked[kept] = -np.inf
    expected = np.zeros(6)
    expected[kept], expected[int(np.argmax(masked))] = -1.0, 1.0
    np.testing.assert_array_equal(grad[row], expected)
  # an all-padding head (an empty input) and a one-class head (a length-1 input)
  empty = jnp.full((2, 4), -jnp.inf).at[1, 0].set(3.0)
  flips, grad = jax.value_and_grad(lambda o: objective.argmax_flip(empty, o).sum())(
      empty.at[1, 0].set(-50.0))
  np.testing.assert_array_equal(flips, 0.0)
  assert np.all(np.asarray(grad) == 0.0)


def test_argmax_flip_accepts_bfloat16_and_extreme_logits():
  reference = jnp.array([[1e30, 0.0, -1e30], [0.0, 1.0, 2.0]], jnp.float32)
  other = jnp.array([[-1e30, 1e30, 0.0], [0.0, 1.0, 2.0]], jnp.float32)
  result = np.asarray(objective.argmax_flip(reference, other))
  assert np.all(np.isfinite(result)) and result[0] == pytest.approx(2e30) and result[1] == 0.0
  rng = np.random.default_rng(5)
  reference = rng.normal(0.0, 2.0, (12, 5)).astype(np.float32)
  other = rng.normal(0.0, 2.0, (12, 5)).astype(np.float32)
  as_bf16 = objective.argmax_flip(jnp.asarray(reference, jnp.bfloat16),
                                  jnp.asarray(other, jnp.bfloat16))
  assert as_bf16.dtype == jnp.float32
  rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(as_bf16, numpy_argmax_flip(rounded(reference), rounded(other)),
                             rtol=1e-6, atol=1e-6)
