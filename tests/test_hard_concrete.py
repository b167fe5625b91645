"""Tests for dmx.hard_concrete against the analytic Hard Concrete distribution.

The references are derived here from the Binary Concrete definition, in numpy
float64, independently of the library::

    s = sigmoid((L + a) / T),  L ~ Logistic(0, 1)
    P(s <= u) = P(L <= T * logit(u) - a) = sigmoid(T * logit(u) - a)
    z = clip(s * (high - low) + low, 0, 1)
    P(z <= t) = sigmoid(T * logit((t - low) / (high - low)) - a)   for t in [0, 1)
    P(z = 0) = sigmoid(T * log(-low / high) - a)
    P(z = 1) = 1 - sigmoid(T * logit((1 - low) / (high - low)) - a)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from dmx import hard_concrete

NUM_SAMPLES = 200_000
SAMPLE_LOGITS = (-2.0, 0.0, 1.5)
PARAMETERS = [
    pytest.param(0.2, (-0.2, 1.0), id='default'),
    pytest.param(2.0 / 3.0, (-0.1, 1.1), id='louizos'),
]


# ----------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------

def reference_cdf(value, logit, temperature, stretch):
  """``P(z <= value)`` in float64, from the definition (see module docstring)."""
  low, high = stretch
  value = np.asarray(value, np.float64)
  logit = np.asarray(logit, np.float64)
  unit = np.clip((value - low) / (high - low), 1e-300, 1.0)
  with np.errstate(divide='ignore'):
    inside = special.expit(temperature * (np.log(unit) - np.log1p(-unit)) - logit)
  return np.where(value < 0.0, 0.0, np.where(value >= 1.0, 1.0, inside))


def reference_prob_zero(logit, temperature, stretch):
  """``P(z = 0)``: the Binary Concrete variable is below ``-low / (high - low)``."""
  low, high = stretch
  unit = -low / (high - low)
  return special.expit(temperature * special.logit(unit) - np.asarray(logit, np.float64))


def reference_prob_one(logit, temperature, stretch):
  """``P(z = 1)``: the Binary Concrete variable is above ``(1 - low) / (high - low)``."""
  low, high = stretch
  unit = (1.0 - low) / (high - low)
  if unit >= 1.0:  # high == 1: s < 1 almost surely
    return np.zeros_like(np.asarray(logit, np.float64))
  return 1.0 - special.expit(temperature * special.logit(unit) - np.asarray(logit, np.float64))


def reference_prob_nonzero(logit, temperature, stretch):
  return 1.0 - reference_prob_zero(logit, temperature, stretch)


def reference_log_prob_nonzero(logit, temperature, stretch):
  """``log(1 - P(z = 0))`` computed stably as ``-log(1 + exp(-x))``."""
  low, high = stretch
  x = np.asarray(logit, np.float64) - temperature * np.log(-low / high)
  return -np.logaddexp(0.0, -x)


def reference_mean(logit, temperature, stretch):
  """``E[z] = int_0^1 (1 - P(z <= t)) dt`` by adaptive quadrature in float64."""
  integrand = lambda t: 1.0 - float(reference_cdf(t, logit, temperature, stretch))
  value, _ = integrate.quad(integrand, 0.0, 1.0, limit=500, epsabs=1e-13, epsrel=1e-12)
  return value


def binomial_tolerance(probability, num_samples, sigmas=5.0):
  """``sigmas`` binomial standard errors, floored so p = 0 still tolerates rounding."""
  return sigmas * np.sqrt(max(probability * (1 - probability), 1e-6) / num_samples)


@functools.lru_cache(maxsize=None)
def drawn_samples(temperature, stretch):
  """``(len(SAMPLE_LOGITS), NUM_SAMPLES)`` float64 samples with a fixed seed."""
  logits = jnp.broadcast_to(jnp.asarray(SAMPLE_LOGITS, jnp.float32)[:, None],
                            (len(SAMPLE_LOGITS), NUM_SAMPLES))
  values = hard_concrete.sample(jax.random.key(1234), logits, temperature=temperature,
                                stretch=stretch)
  assert values.dtype == jnp.float32
  return np.asarray(values, np.float64)


# ----------------------------------------------------------------------------
# (a) sample statistics
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_samples_lie_in_unit_interval(temperature, stretch):
  values = drawn_samples(temperature, stretch)
  assert np.all(np.isfinite(values))
  assert values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_sample_mass_at_zero_matches_closed_form(temperature, stretch):
  values = drawn_samples(temperature, stretch)
  for row, logit in enumerate(SAMPLE_LOGITS):
    expected = reference_prob_zero(logit, temperature, stretch)
    empirical = np.mean(values[row] == 0.0)
    assert abs(empirical - expected) < binomial_tolerance(expected, NUM_SAMPLES), (
        logit, empirical, expected)


def test_sample_mass_at_one_matches_closed_form_for_louizos():
  temperature, stretch = hard_concrete.LOUIZOS_TEMPERATURE, hard_concrete.LOUIZOS_STRETCH
  values = drawn_samples(temperature, stretch)
  for row, logit in enumerate(SAMPLE_LOGITS):
    expected = reference_prob_one(logit, temperature, stretch)
    assert expected > 0.01
    empirical = np.mean(values[row] == 1.0)
    assert abs(empirical - expected) < binomial_tolerance(expected, NUM_SAMPLES), (
        logit, empirical, expected)


def test_sample_mass_at_one_for_high_one_is_only_float32_rounding():
  """With ``high = 1`` the value 1 has probability 0; float32 samples hit 1.0
  exactly only when the true value is within float32 resolution of 1.

  At temperature 0.2 the distribution piles up next to 1 (the density behaves
  like ``(1 - t)^(T - 1)``), e.g. ``P(z > 1 - 1e-6) ~ 0.21`` at logit 1.5, so the
  exact-1 mass is bounded by the analytic mass of ``(1 - 1e-6, 1]``, not by 0.
  """
  temperature, stretch = hard_concrete.DEFAULT_TEMPERATURE, hard_concrete.DEFAULT_STRETCH
  values = drawn_samples(temperature, stretch)
  for row, logit in enumerate(SAMPLE_LOGITS):
    assert reference_prob_one(logit, temperature, stretch) == 0.0
    near_one = 1.0 - reference_cdf(1.0 - 1e-6, logit, temperature, stretch)
    empirical_one = np.mean(values[row] == 1.0)
    assert empirical_one <= near_one + binomial_tolerance(near_one, NUM_SAMPLES), (
        logit, empirical_one, near_one)
    # the mass close to (but representably below) one still follows the law
    for gap in (1e-2, 1e-4):
      expected = 1.0 - reference_cdf(1.0 - gap, logit, temperature, stretch)
      empirical = np.mean(values[row] > 1.0 - gap)
      assert abs(empirical - expected) < binomial_tolerance(expected, NUM_SAMPLES), (
          logit, gap, empirical, expected)


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_empirical_cdf_matches_cdf(temperature, stretch):
  """A Kolmogorov-Smirnov style check on a grid of [0, 1) (DKW: P(sup > 0.01) < 1e-17)."""
  values = drawn_samples(temperature, stretch)
  points = np.concatenate([np.linspace(0.0, 1.0, 201)[:-1], [0.999, 0.9999]])
  for row, logit in enumerate(SAMPLE_LOGITS):
    ordered = np.sort(values[row])
    empirical = np.searchsorted(ordered, points, side='right') / NUM_SAMPLES
    library = np.asarray(hard_concrete.cdf(jnp.asarray(points, jnp.float32), logit,
                                           temperature=temperature, stretch=stretch))
    reference = reference_cdf(points.astype(np.float32), logit, temperature, stretch)
    assert np.max(np.abs(empirical - library)) < 0.01, logit
    assert np.max(np.abs(empirical - reference)) < 0.01, logit
    np.testing.assert_allclose(library, reference, atol=2e-5)


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_sample_mean_matches_analytic_mean(temperature, stretch):
  values = drawn_samples(temperature, stretch)
  for row, logit in enumerate(SAMPLE_LOGITS):
    expected = reference_mean(logit, temperature, stretch)
    standard_error = values[row].std() / np.sqrt(NUM_SAMPLES)
    assert abs(values[row].mean() - expected) < 5 * standard_error + 1e-6, logit


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_prob_nonzero_matches_closed_form(temperature, stretch):
  logits = np.linspace(-12.0, 12.0, 49)
  prob = hard_concrete.prob_nonzero(jnp.asarray(logits, jnp.float32),
                                    temperature=temperature, stretch=stretch)
  log_prob = hard_concrete.log_prob_nonzero(jnp.asarray(logits, jnp.float32),
                                            temperature=temperature, stretch=stretch)
  np.testing.assert_allclose(np.asarray(prob),
                             reference_prob_nonzero(logits, temperature, stretch),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(log_prob),
                             reference_log_prob_nonzero(logits, temperature, stretch),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# (b) gradients of the closed forms
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
@pytest.mark.parametrize('name', ['prob_nonzero', 'log_prob_nonzero'])
def test_closed_form_gradients_match_finite_differences(temperature, stretch, name):
  reference = {'prob_nonzero': reference_prob_nonzero,
               'log_prob_nonzero': reference_log_prob_nonzero}[name]
  function = functools.partial(getattr(hard_concrete, name), temperature=temperature,
                               stretch=stretch)
  logits = np.linspace(-8.0, 8.0, 33)
  step = 1e-5
  finite_difference = (reference(logits + step, temperature, stretch)
                       - reference(logits - step, temperature, stretch)) / (2 * step)
  gradient = jax.vmap(jax.grad(function))(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(np.asarray(gradient), finite_difference, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------
# (c) extreme logits
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_extreme_logits_give_finite_values_and_gradients(temperature, stretch):
  logits = jnp.asarray([-1e4, -1e3, -50.0, 0.0, 50.0, 1e3, 1e4], jnp.float32)
  kwargs = dict(temperature=temperature, stretch=stretch)
  key = jax.random.key(7)

  values = hard_concrete.sample(key, logits, **kwargs)
  assert np.all(np.isfinite(values))
  assert values[0] == 0.0 and values[-1] == 1.0
  sample_grad = jax.grad(lambda x: hard_concrete.sample(key, x, **kwargs).sum())(logits)
  assert np.all(np.isfinite(sample_grad))

  prob = hard_concrete.prob_nonzero(logits, **kwargs)
  log_prob = hard_concrete.log_prob_nonzero(logits, **kwargs)
  assert np.all(np.isfinite(prob)) and np.all(np.isfinite(log_prob))
  assert prob[0] == 0.0 and prob[-1] == 1.0
  np.testing.assert_allclose(log_prob[0], reference_log_prob_nonzero(-1e4, **kwargs), rtol=1e-6)
  for function in (hard_concrete.prob_nonzero, hard_concrete.log_prob_nonzero):
    gradient = jax.grad(lambda x, f=function: f(x, **kwargs).sum())(logits)
    assert np.all(np.isfinite(gradient)), function.__name__
  # d log P / d logit -> 1 as logit -> -inf, -> 0 as logit -> +inf
  log_grad = jax.grad(lambda x: hard_concrete.log_prob_nonzero(x, **kwargs).sum())(logits)
  np.testing.assert_allclose(log_grad[0], 1.0)
  np.testing.assert_allclose(log_grad[-1], 0.0)


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_infinite_logits_give_no_nan_values(temperature, stretch):
  logits = jnp.asarray([-jnp.inf, jnp.inf], jnp.float32)
  kwargs = dict(temperature=temperature, stretch=stretch)
  np.testing.assert_array_equal(hard_concrete.sample(jax.random.key(3), logits, **kwargs),
                                [0.0, 1.0])
  np.testing.assert_array_equal(hard_concrete.prob_nonzero(logits, **kwargs), [0.0, 1.0])
  np.testing.assert_array_equal(hard_concrete.log_prob_nonzero(logits, **kwargs),
                                [-np.inf, 0.0])
  np.testing.assert_array_equal(hard_concrete.cdf(0.5, logits, **kwargs), [1.0, 0.0])
  np.testing.assert_array_equal(hard_concrete.cdf(0.0, logits, **kwargs), [1.0, 0.0])
  np.testing.assert_array_equal(hard_concrete.deterministic_gate(logits, **kwargs), [0.0, 1.0])


# ----------------------------------------------------------------------------
# (d) dtypes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16], ids=['bfloat16', 'float16'])
def test_low_precision_logits_give_float32(dtype):
  logits = jnp.asarray([[-2.0, 0.0], [0.5, 3.0]], dtype)
  as_float32 = logits.astype(jnp.float32)
  key = jax.random.key(0)
  cases = {
      'sample': lambda x: hard_concrete.sample(key, x),
      'prob_nonzero': hard_concrete.prob_nonzero,
      'log_prob_nonzero': hard_concrete.log_prob_nonzero,
      'cdf': lambda x: hard_concrete.cdf(jnp.asarray(0.3, dtype), x),
      'deterministic_gate': hard_concrete.deterministic_gate,
  }
  for name, function in cases.items():
    result = function(logits)
    assert result.dtype == jnp.float32, name
    assert result.shape == logits.shape, name
    np.testing.assert_array_equal(result, function(as_float32), err_msg=name)


# ----------------------------------------------------------------------------
# (e) transformations
# ----------------------------------------------------------------------------

def test_sample_under_vmap_matches_loop(jit_or_not):
  keys = jax.random.split(jax.random.key(11), 4)
  logits = jax.random.normal(jax.random.key(12), (4, 3)) * 2.0
  batched = jit_or_not(jax.vmap(hard_concrete.sample))(keys, logits)
  looped = jnp.stack([hard_concrete.sample(k, l) for k, l in zip(keys, logits)])
  np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_closed_forms_under_vmap_and_jit(jit_or_not, temperature, stretch):
  kwargs = dict(temperature=temperature, stretch=stretch)
  logits = np.linspace(-3.0, 3.0, 12).reshape(4, 3)
  values = np.linspace(-0.1, 1.1, 4)
  cdf = jit_or_not(jax.vmap(lambda v, x: hard_concrete.cdf(v, x, **kwargs)))(
      jnp.asarray(values, jnp.float32), jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(cdf, reference_cdf(values[:, None].astype(np.float32), logits,
                                                temperature, stretch), atol=2e-6)
  prob = jit_or_not(jax.vmap(lambda x: hard_concrete.prob_nonzero(x, **kwargs)))(
      jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(prob, reference_prob_nonzero(logits, temperature, stretch),
                             rtol=1e-5)
  gate = jit_or_not(jax.vmap(lambda x: hard_concrete.deterministic_gate(x, **kwargs)))(
      jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(gate, hard_concrete.deterministic_gate(logits, **kwargs),
                             atol=1e-7)


def test_sample_gradient_under_jit_matches_nojit(jit_or_not):
  key = jax.random.key(5)
  logits = jnp.linspace(-1.0, 1.0, 8)
  gradient = jit_or_not(jax.grad(lambda x: hard_concrete.sample(key, x).sum()))(logits)
  expected = jax.grad(lambda x: hard_concrete.sample(key, x).sum())(logits)
  np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-7)
  assert np.any(gradient > 0)


# ----------------------------------------------------------------------------
# (f) cdf
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
@pytest.mark.parametrize('logit', [-4.0, -0.3, 0.0, 2.0])
def test_cdf_is_a_distribution_function(temperature, stretch, logit):
  kwargs = dict(temperature=temperature, stretch=stretch)
  values = jnp.linspace(-0.5, 1.5, 401)
  cdf = np.asarray(hard_concrete.cdf(values, logit, **kwargs))
  assert np.all(np.diff(cdf) >= 0.0)
  assert np.all(cdf[np.asarray(values) < 0] == 0.0)
  assert np.all(cdf[np.asarray(values) >= 1] == 1.0)
  at_zero = float(hard_concrete.cdf(0.0, logit, **kwargs))
  np.testing.assert_allclose(at_zero, reference_prob_zero(logit, temperature, stretch),
                             rtol=1e-5)
  # P(z = 0) = 1 - P(z != 0)
  np.testing.assert_allclose(at_zero, 1.0 - float(hard_concrete.prob_nonzero(logit, **kwargs)),
                             atol=1e-6)
  assert float(hard_concrete.cdf(-1e-6, logit, **kwargs)) == 0.0
  assert float(hard_concrete.cdf(1.0, logit, **kwargs)) == 1.0


def test_cdf_broadcasts_values_against_logits():
  values = jnp.asarray([[0.0], [0.25], [0.75]])
  logits = jnp.asarray([-1.0, 0.0, 1.0, 2.0])
  cdf = hard_concrete.cdf(values, logits)
  assert cdf.shape == (3, 4)
  np.testing.assert_allclose(cdf, reference_cdf(np.asarray(values), np.asarray(logits),
                                                0.2, (-0.2, 1.0)), atol=2e-6)


# ----------------------------------------------------------------------------
# (g) deterministic gate
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
def test_deterministic_gate_is_zero_exactly_when_zero_is_more_likely(temperature, stretch):
  kwargs = dict(temperature=temperature, stretch=stretch)
  low, high = stretch
  threshold = temperature * np.log(-low / high)  # P(z = 0) = 1/2 here
  offsets = np.asarray([-1e-1, -1e-2, -1e-3, -1e-4, 1e-4, 1e-3, 1e-2, 1e-1])
  rng = np.random.default_rng(0)
  logits = np.concatenate([threshold + offsets, rng.normal(0.0, 3.0, 500)])
  logits = logits[np.abs(logits - threshold) > 5e-5].astype(np.float32)
  gate = np.asarray(hard_concrete.deterministic_gate(jnp.asarray(logits), **kwargs))
  prob_zero = reference_prob_zero(logits.astype(np.float64), temperature, stretch)
  assert np.all((gate >= 0.0) & (gate <= 1.0))
  np.testing.assert_array_equal(gate == 0.0, prob_zero >= 0.5)
  near = np.abs(logits - threshold) < 2e-4
  assert near.sum() == 2 and set(gate[near] == 0.0) == {True, False}
  # it is the median: half the mass lies at or below an interior gate value
  interior = (gate > 1e-3) & (gate < 1.0 - 1e-3)
  assert interior.sum() > 50
  np.testing.assert_allclose(
      reference_cdf(gate[interior].astype(np.float64), logits[interior], temperature, stretch),
      0.5, atol=1e-4)


# ----------------------------------------------------------------------------
# (h) parameter checks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', [
    (0.0, (-0.2, 1.0)),
    (-0.5, (-0.2, 1.0)),
    (float('nan'), (-0.2, 1.0)),
    (0.2, (0.0, 1.0)),
    (0.2, (0.1, 1.0)),
    (0.2, (-0.1, 0.9)),
    (0.2, (-0.1, 0.0)),
])
def test_check_parameters_rejects_invalid(temperature, stretch):
  with pytest.raises(ValueError):
    hard_concrete.check_parameters(temperature, stretch)


@pytest.mark.parametrize('temperature, stretch', [
    (hard_concrete.DEFAULT_TEMPERATURE, hard_concrete.DEFAULT_STRETCH),
    (hard_concrete.LOUIZOS_TEMPERATURE, hard_concrete.LOUIZOS_STRETCH),
    (1.0, (-1.0, 2.0)),
])
def test_check_parameters_accepts_valid(temperature, stretch):
  assert hard_concrete.check_parameters(temperature, stretch) is None


def test_module_constants_are_the_documented_ones():
  assert hard_concrete.DEFAULT_TEMPERATURE == 0.2
  assert tuple(hard_concrete.DEFAULT_STRETCH) == (-0.2, 1.0)
  np.testing.assert_allclose(hard_concrete.LOUIZOS_TEMPERATURE, 2.0 / 3.0)
  assert tuple(hard_concrete.LOUIZOS_STRETCH) == (-0.1, 1.1)


# ----------------------------------------------------------------------------
# (i) the reparameterisation gradient
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('temperature, stretch', PARAMETERS)
@pytest.mark.parametrize('logit', [-1.0, 0.5])
def test_pathwise_gradient_estimates_derivative_of_mean(temperature, stretch, logit):
  """Mean over samples of dz/dlogit is unbiased for dE[z]/dlogit (z is Lipschitz in logit)."""
  kwargs = dict(temperature=temperature, stretch=stretch)
  logits = jnp.full((NUM_SAMPLES,), logit, jnp.float32)
  key = jax.random.key(2024)
  per_sample = np.asarray(
      jax.grad(lambda x: hard_concrete.sample(key, x, **kwargs).sum())(logits), np.float64)
  assert np.all(np.isfinite(per_sample)) and np.all(per_sample >= 0.0)
  step = 1e-3
  expected = (reference_mean(logit + step, temperature, stretch)
              - reference_mean(logit - step, temperature, stretch)) / (2 * step)
  standard_error = per_sample.std() / np.sqrt(NUM_SAMPLES)
  assert abs(per_sample.mean() - expected) < 5 * standard_error + 1e-5, (
      per_sample.mean(), expected, standard_error)
