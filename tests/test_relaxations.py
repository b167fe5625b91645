"""Tests for dmx.relaxations: every relaxation against its analytic distribution.

The references are written here in numpy float64 from each distribution's
definition, independently of the library (``a`` is the logit, ``L`` standard
logistic noise, ``u = sigmoid(L)`` uniform)::

    hard_concrete     P(z <= t) = sigmoid(T logit((t - low) / (high - low)) - a),  t in [0, 1)
    binary_concrete   P(z <= t) = sigmoid(T logit(t) - a),                          t in (0, 1)
    hard_kuma         P(z <= t) = 1 - (1 - x^A)^b,  x = (t - low) / (high - low),
                      A = b softplus(a / b) / -log(-low / (high - low)),            t in [0, 1)
    Bernoulli         P(z = 1) = sigmoid(a)

Gradient checks: a reparameterised relaxation's per-sample gradient of
``f(z)`` averages to ``d E[f(z)] / da``, computed by finite differences of
``E[f(z)] = f(0) + int_0^1 f'(t) (1 - P(z <= t)) dt``; the score-function
estimator ``f(z) d log p(z) / da`` averages to the analytic
``sigmoid'(a) (f(1) - f(0))``.
"""

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from dmx import checkpoint, probes, relaxations, train
from dmx.data.toy import generate_toy_data
from dmx.models.toy import ToyModel, ToyModelConfig
from tests.conftest import tiny_toy

NUM_SAMPLES = 100_000
SAMPLE_LOGITS = (-2.0, 0.0, 1.5)
EXTREME_LOGITS = (-1e4, -1e3, -50.0, 0.0, 50.0, 1e3, 1e4)

# (name, factory options): every relaxation, Hard Concrete twice (DiffMask's and Louizos')
CASES = [
    pytest.param('hard_concrete', {}, id='hard_concrete'),
    pytest.param('hard_concrete', dict(temperature=2 / 3, stretch=(-0.1, 1.1)),
                 id='hard_concrete_louizos'),
    pytest.param('binary_concrete', {}, id='binary_concrete'),
    pytest.param('hard_kuma', {}, id='hard_kuma'),
    pytest.param('hard_kuma', dict(b=1.5, stretch=(-0.2, 1.0)), id='hard_kuma_b1.5'),
    pytest.param('straight_through', {}, id='straight_through'),
    pytest.param('reinforce', {}, id='reinforce'),
]
CONTINUOUS = [case for case in CASES if case.values[0] in ('hard_concrete', 'binary_concrete',
                                                            'hard_kuma')]
BINARY = [case for case in CASES if case.values[0] in ('straight_through', 'reinforce')]


# ----------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------

def _options(name, options):
  defaults = {'hard_concrete': dict(temperature=0.2, stretch=(-0.2, 1.0)),
              'binary_concrete': dict(temperature=0.5),
              'hard_kuma': dict(b=0.5, stretch=(-0.1, 1.1))}.get(name, {})
  return {**defaults, **options}


def kuma_shape(logit, b, stretch):
  """HardKuma's ``A`` for a logit (see the module docstring)."""
  low, high = stretch
  return b * np.logaddexp(0.0, logit / b) / -np.log(-low / (high - low))


def reference_cdf(name, options, value, logit, shape=kuma_shape):
  """``P(z <= value)`` in float64 from the definitions in the module docstring."""
  options = _options(name, options)
  value = np.asarray(value, np.float64)
  logit = np.asarray(logit, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    if name == 'hard_concrete':
      low, high = options['stretch']
      unit = np.clip((value - low) / (high - low), 1e-300, 1.0)
      inside = special.expit(options['temperature'] * (np.log(unit) - np.log1p(-unit)) - logit)
    elif name == 'binary_concrete':
      unit = np.clip(value, 1e-300, 1.0)
      inside = special.expit(options['temperature'] * (np.log(unit) - np.log1p(-unit)) - logit)
      inside = np.where(value <= 0.0, 0.0, inside)
    elif name == 'hard_kuma':
      low, high = options['stretch']
      b = options['b']
      x = np.clip((value - low) / (high - low), 0.0, 1.0)
      inside = 1.0 - (1.0 - x ** shape(logit, b, options['stretch'])) ** b
    else:  # Bernoulli
      inside = special.expit(-logit) * np.ones_like(value)
  return np.where(value < 0.0, 0.0, np.where(value >= 1.0, 1.0, inside))


def reference_prob_zero(name, options, logit):
  if name == 'binary_concrete':
    return 0.0
  return float(reference_cdf(name, options, 0.0, logit))


def reference_prob_one(name, options, logit):
  """``P(z = 1) = 1 - lim_{t -> 1-} P(z <= t)``; the limit from the definition's formula."""
  if name in ('straight_through', 'reinforce'):
    return float(special.expit(logit))
  if name == 'binary_concrete':
    return 0.0
  options = _options(name, options)
  low, high = options['stretch']
  if high <= 1.0:
    return 0.0
  return 1.0 - float(reference_cdf(name, options, np.nextafter(1.0, 0.0), logit))


def reference_expectation(name, options, function_derivative, function_at_zero, logit):
  """``E[f(z)] = f(0) + int_0^1 f'(t) (1 - P(z <= t)) dt`` by adaptive quadrature."""
  integrand = lambda t: function_derivative(t) * (1.0 - float(reference_cdf(name, options, t,
                                                                             logit)))
  value, _ = integrate.quad(integrand, 0.0, 1.0, limit=500, epsabs=1e-12, epsrel=1e-10,
                            points=[0.5])
  return function_at_zero + value


def binomial_tolerance(probability, num_samples, sigmas=5.0):
  return sigmas * np.sqrt(max(probability * (1 - probability), 1e-6) / num_samples)


@functools.lru_cache(maxsize=None)
def drawn_samples(name, options_items):
  """``(len(SAMPLE_LOGITS), NUM_SAMPLES)`` float64 samples with a fixed seed."""
  relaxation = relaxations.by_name(name, **dict(options_items))
  logits = jnp.broadcast_to(jnp.asarray(SAMPLE_LOGITS, jnp.float32)[:, None],
                            (len(SAMPLE_LOGITS), NUM_SAMPLES))
  values = relaxations.draw(relaxation, jax.random.key(1234), logits)
  assert values.dtype == jnp.float32
  return np.asarray(values, np.float64)


def samples(name, options):
  return drawn_samples(name, tuple(sorted(options.items())))


def ks_distance(name, options, values, logit, **reference_options):
  """``sup_t |empirical CDF - reference CDF|`` on a grid of [0, 1) (DKW: P(> 0.01) < 1e-8)."""
  points = np.concatenate([np.linspace(0.0, 1.0, 201)[:-1], [0.999, 0.9999]])
  ordered = np.sort(values)
  empirical = np.searchsorted(ordered, points, side='right') / values.size
  return np.max(np.abs(empirical - reference_cdf(name, options, points, logit,
                                                 **reference_options)))


# ----------------------------------------------------------------------------
# (a) sample statistics
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name, options', CASES)
def test_samples_follow_the_analytic_distribution(name, options):
  values = samples(name, options)
  assert np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() <= 1.0
  for row, logit in enumerate(SAMPLE_LOGITS):
    assert ks_distance(name, options, values[row], logit) < 0.01, logit


def test_distribution_check_rejects_a_wrong_formula():
  """The KS tolerance is tight enough to catch a plausible slip in each family."""
  wrong = [
      # Hard Concrete with a temperature of 0.25 instead of 0.2
      ('hard_concrete', {}, dict(temperature=0.25), {}),
      # HardKuma's A without the softplus (its negative-logit asymptote)
      ('hard_kuma', {}, {},
       dict(shape=lambda logit, b, stretch: kuma_shape(-50.0, b, stretch) * np.exp(
           (logit + 50.0) / b))),
      # HardKuma with b = 0.6 instead of 0.5
      ('hard_kuma', {}, dict(b=0.6), {}),
      # Binary Concrete at temperature 0.6 instead of 0.5
      ('binary_concrete', {}, dict(temperature=0.6), {}),
  ]
  for name, options, reference_options, formula in wrong:
    values = samples(name, options)
    distances = [ks_distance(name, reference_options, values[row], logit, **formula)
                 for row, logit in enumerate(SAMPLE_LOGITS)]
    assert max(distances) > 0.02, (name, reference_options, distances)
  # a Bernoulli with P(z = 1) = sigmoid(2a) instead of sigmoid(a)
  values = samples('reinforce', {})
  wrong_one = special.expit(2 * SAMPLE_LOGITS[2])
  assert abs(np.mean(values[2] == 1.0) - wrong_one) > binomial_tolerance(wrong_one, NUM_SAMPLES)


@pytest.mark.parametrize('name, options', CASES)
def test_atoms_at_zero_and_one_match_closed_forms(name, options):
  relaxation = relaxations.by_name(name, **options)
  values = samples(name, options)
  for row, logit in enumerate(SAMPLE_LOGITS):
    for atom, library, reference in ((0.0, relaxation.prob_zero, reference_prob_zero),
                                     (1.0, relaxation.prob_one, reference_prob_one)):
      expected = reference(name, options, logit)
      np.testing.assert_allclose(float(library(logit)), expected, rtol=1e-5, atol=1e-7)
      empirical = np.mean(values[row] == atom)
      if expected == 0.0 and name in ('hard_concrete', 'binary_concrete'):
        # no atom, but float32 rounds the mass within its resolution of 0 or 1 onto it
        # (at temperature 0.2 that is a lot near 1, see test_hard_concrete)
        near = (1.0 - float(reference_cdf(name, options, 1.0 - 6e-8, logit)) if atom == 1.0
                else float(reference_cdf(name, options, 1.2e-38, logit)))
        assert empirical <= near + binomial_tolerance(near, NUM_SAMPLES), (logit, atom, empirical)
        continue
      assert abs(empirical - expected) < binomial_tolerance(expected, NUM_SAMPLES), (
          logit, atom, empirical, expected)


@pytest.mark.parametrize('name, options', CASES)
def test_keep_probability_matches_monte_carlo(name, options):
  """``exp(log_keep_prob)`` is P(z != 0), or P(z > 1/2) for Binary Concrete (no atom at 0)."""
  relaxation = relaxations.by_name(name, **options)
  values = samples(name, options)
  for row, logit in enumerate(SAMPLE_LOGITS):
    keep = float(jnp.exp(relaxation.log_keep_prob(logit)))
    is_open = values[row] > 0.5 if name == 'binary_concrete' else values[row] != 0.0
    assert abs(np.mean(is_open) - keep) < binomial_tolerance(keep, NUM_SAMPLES), logit
    if name != 'binary_concrete':
      np.testing.assert_allclose(keep, 1.0 - reference_prob_zero(name, options, logit),
                                 rtol=1e-5)


@pytest.mark.parametrize('name, options', CONTINUOUS)
def test_log_prob_is_the_derivative_of_the_cdf_and_integrates_to_one(name, options):
  relaxation = relaxations.by_name(name, **options)
  for logit in SAMPLE_LOGITS:
    grid = np.linspace(0.01, 0.99, 50)
    step = 1e-6
    derivative = (reference_cdf(name, options, grid + step, logit)
                  - reference_cdf(name, options, grid - step, logit)) / (2 * step)
    density = np.exp(np.asarray(relaxation.log_prob(jnp.asarray(grid, jnp.float32), logit),
                                np.float64))
    np.testing.assert_allclose(density, derivative, rtol=2e-3, atol=1e-6)
    # the density between gap and 1 - gap integrates to the reference's mass there;
    # z = exp(-v) and z = 1 - exp(-v) tame the integrable singularities at 0 and 1
    # (float32 cannot tell z within 6e-8 of 1 from 1, hence the gap)
    gap = 1e-6
    v = np.linspace(np.log(2.0), -np.log(gap), 20_001)
    density_at = lambda z: np.exp(np.asarray(relaxation.log_prob(jnp.asarray(z, jnp.float32),
                                                                  logit), np.float64))
    lower = integrate.simpson(density_at(np.exp(-v)) * np.exp(-v), x=v)
    upper = integrate.simpson(density_at(1.0 - np.exp(-v)) * np.exp(-v), x=v)
    expected = (reference_cdf(name, options, 1.0 - gap, logit)
                - reference_cdf(name, options, gap, logit))
    np.testing.assert_allclose(lower + upper, expected, atol=2e-3)
    if name != 'binary_concrete':
      np.testing.assert_allclose(float(jnp.exp(relaxation.log_prob(0.0, logit))),
                                 float(relaxation.prob_zero(logit)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name, options', BINARY)
def test_binary_log_prob_is_the_bernoulli_mass(name, options):
  relaxation = relaxations.by_name(name, **options)
  logits = jnp.linspace(-6.0, 6.0, 13)
  np.testing.assert_allclose(relaxation.log_prob(jnp.ones_like(logits), logits),
                             np.log(special.expit(np.asarray(logits, np.float64))), rtol=1e-5)
  np.testing.assert_allclose(relaxation.log_prob(jnp.zeros_like(logits), logits),
                             np.log(special.expit(-np.asarray(logits, np.float64))), rtol=1e-5)
  assert np.all(np.asarray(relaxation.log_prob(jnp.full_like(logits, 0.5), logits)) == -np.inf)


@pytest.mark.parametrize('name, options', CASES)
def test_deterministic_gate_is_closed_exactly_when_closed_is_likelier(name, options):
  relaxation = relaxations.by_name(name, **options)
  logits = jnp.linspace(-8.0, 8.0, 161)
  gates = np.asarray(relaxation.deterministic_gate(logits))
  assert np.all((gates >= 0.0) & (gates <= 1.0))
  keep = np.asarray(jnp.exp(relaxation.log_keep_prob(logits)))
  decided = np.abs(keep - 0.5) > 1e-4
  np.testing.assert_array_equal((gates == 0.0)[decided], (keep <= 0.5)[decided])
  if name in ('hard_concrete', 'hard_kuma'):  # the median: half the mass at or below it
    interior = (gates > 1e-3) & (gates < 1 - 1e-3)
    assert interior.sum() > 5
    np.testing.assert_allclose(
        reference_cdf(name, options, gates[interior].astype(np.float64),
                      np.asarray(logits, np.float64)[interior]), 0.5, atol=1e-4)
  else:
    assert set(np.unique(gates)) == {0.0, 1.0}


# ----------------------------------------------------------------------------
# (b) gradients
# ----------------------------------------------------------------------------

def _test_function(z):
  """A smooth, non-linear f(z) for the gradient checks (not just the mean)."""
  return (z - 0.3) ** 2


_TEST_DERIVATIVE = lambda t: 2.0 * (t - 0.3)
_TEST_AT_ZERO = 0.09


@pytest.mark.parametrize('name, options', CONTINUOUS)
@pytest.mark.parametrize('logit', [-1.0, 0.5])
def test_reparameterised_gradient_is_unbiased(name, options, logit, jit_or_not):
  relaxation = relaxations.by_name(name, **options)
  assert relaxation.gradient == relaxations.REPARAMETERISED
  noise = relaxation.noise(jax.random.key(2024), (NUM_SAMPLES,))
  objective = lambda logits: _test_function(relaxation.sample(noise, logits)).sum()
  per_sample = np.asarray(jit_or_not(jax.grad(objective))(jnp.full((NUM_SAMPLES,), logit)),
                          np.float64)
  assert np.all(np.isfinite(per_sample))
  step = 1e-3
  expected = (reference_expectation(name, options, _TEST_DERIVATIVE, _TEST_AT_ZERO, logit + step)
              - reference_expectation(name, options, _TEST_DERIVATIVE, _TEST_AT_ZERO,
                                      logit - step)) / (2 * step)
  standard_error = per_sample.std() / np.sqrt(NUM_SAMPLES)
  assert abs(per_sample.mean() - expected) < 5 * standard_error + 1e-4, (
      per_sample.mean(), expected, standard_error)


@pytest.mark.parametrize('logit', [-1.5, 0.0, 2.0])
@pytest.mark.parametrize('baseline', [0.0, 0.3])
def test_score_function_estimator_is_unbiased(logit, baseline, jit_or_not):
  """``(f(z) - b) d log p(z) / da`` averages to ``d E[f(z)] / da`` for any constant b."""
  relaxation = relaxations.reinforce()
  assert relaxation.gradient == relaxations.SCORE_FUNCTION and relaxation.binary
  logits = jnp.full((NUM_SAMPLES,), logit)
  gates = relaxations.draw(relaxation, jax.random.key(7), logits)
  assert jnp.all(jax.grad(lambda x: relaxation.sample(
      relaxation.noise(jax.random.key(7), x.shape), x).sum())(logits) == 0.0)
  rewards = _test_function(gates) - baseline
  per_sample = np.asarray(jit_or_not(jax.grad(
      lambda x: (jax.lax.stop_gradient(rewards) * relaxation.log_prob(gates, x)).sum()))(logits),
      np.float64)
  probability = special.expit(logit)
  expected = probability * (1 - probability) * (_test_function(1.0) - _test_function(0.0))
  standard_error = per_sample.std() / np.sqrt(NUM_SAMPLES)
  assert abs(per_sample.mean() - expected) < 5 * standard_error, (per_sample.mean(), expected)


@pytest.mark.parametrize('logits', [(0.5, 1.0, -0.5), (2.0, -1.0, 3.0)])
def test_score_function_of_an_input_gate_product_is_unbiased(logits):
  """The input gate multiplies Bernoulli votes; ``sample_log_prob`` scores the product."""
  relaxation = relaxations.reinforce()
  vote_logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32)[:, None, None],
                                 (3, NUM_SAMPLES, 1))
  layer = 2
  gates, _ = probes.sample_gates('input', jax.random.key(3), vote_logits, layer,
                                 relaxation=relaxation)
  rewards = jax.lax.stop_gradient(_test_function(gates))

  def surrogate(votes):
    return (rewards * probes.sample_log_prob('input', votes, gates, layer,
                                             relaxation=relaxation)).sum() / NUM_SAMPLES

  estimate = np.asarray(jax.grad(surrogate)(vote_logits).sum(axis=(1, 2)))
  probabilities = special.expit(np.asarray(logits, np.float64))
  product = probabilities.prod()
  # d P(open) / d a_k = P(open) (1 - p_k); E[f] = f(0) + P(open) (f(1) - f(0))
  expected = product * (1 - probabilities) * (_test_function(1.0) - _test_function(0.0))
  np.testing.assert_allclose(np.mean(np.asarray(gates)), product, atol=5 * np.sqrt(
      product * (1 - product) / NUM_SAMPLES))
  np.testing.assert_allclose(estimate, expected, atol=0.01)
  with pytest.raises(ValueError, match='binary'):
    probes.sample_log_prob('input', vote_logits, gates, layer,
                           relaxation=relaxations.hard_concrete())


def test_straight_through_is_hard_forward_and_sigmoid_backward(jit_or_not):
  relaxation = relaxations.straight_through()
  logits = jnp.linspace(-3.0, 3.0, 1000)
  noise = relaxation.noise(jax.random.key(0), logits.shape)
  gates = jit_or_not(relaxation.sample)(noise, logits)
  assert set(np.unique(np.asarray(gates))) == {0.0, 1.0}
  np.testing.assert_array_equal(gates, np.asarray(relaxations.reinforce().sample(noise, logits)))
  gradient = jit_or_not(jax.grad(lambda x: (relaxation.sample(noise, x) * 2.0).sum()))(logits)
  sigmoid = special.expit(np.asarray(logits, np.float64))
  np.testing.assert_allclose(gradient, 2.0 * sigmoid * (1 - sigmoid), rtol=1e-5)
  # with a temperature the forward draw is the same and the backward pass is sigmoid(x / T)'s
  warm = relaxations.straight_through(temperature=3.0)
  np.testing.assert_array_equal(warm.sample(noise, logits), gates)
  gradient = jax.grad(lambda x: warm.sample(noise, x).sum())(logits)
  sigmoid = special.expit(np.asarray(logits, np.float64) / 3.0)
  np.testing.assert_allclose(gradient, sigmoid * (1 - sigmoid) / 3.0, rtol=1e-5)


@pytest.mark.parametrize('name, options', CASES)
def test_closed_form_gradients_match_finite_differences(name, options):
  relaxation = relaxations.by_name(name, **options)
  logits = np.linspace(-4.0, 4.0, 17)
  step = 1e-3
  for function in ('log_keep_prob', 'prob_zero', 'prob_one'):
    closed = lambda x, f=getattr(relaxation, function): np.asarray(f(jnp.asarray(x, jnp.float32)),
                                                                   np.float64)
    gradient = jax.vmap(jax.grad(getattr(relaxation, function)))(jnp.asarray(logits, jnp.float32))
    finite = (closed(logits + step) - closed(logits - step)) / (2 * step)
    np.testing.assert_allclose(gradient, finite, rtol=2e-2, atol=2e-4, err_msg=function)


# ----------------------------------------------------------------------------
# (c) extreme logits, dtypes, transformations
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name, options', CASES)
def test_extreme_logits_give_no_nan(name, options, jit_or_not):
  relaxation = relaxations.by_name(name, **options)
  logits = jnp.asarray(EXTREME_LOGITS, jnp.float32)
  noise = relaxation.noise(jax.random.key(5), (64, len(EXTREME_LOGITS)))
  batch = jnp.broadcast_to(logits, noise.shape)
  gates = jit_or_not(relaxation.sample)(noise, batch)
  assert np.all(np.isfinite(gates))
  # gates are closed at -1e4 and open at 1e4 (exactly, where the distribution has atoms)
  if name != 'binary_concrete':
    np.testing.assert_array_equal(gates[:, 0], 0.0)
  assert np.all(np.asarray(gates[:, 0]) < 1e-30) and np.all(np.asarray(gates[:, -1]) > 0.99)
  if float(relaxation.prob_one(1e4)) == 1.0:
    np.testing.assert_array_equal(gates[:, -1], 1.0)
  sample_grad = jit_or_not(jax.grad(lambda x: relaxation.sample(noise, x).sum()))(batch)
  assert np.all(np.isfinite(sample_grad))
  for function in ('log_keep_prob', 'prob_zero', 'prob_one', 'deterministic_gate'):
    values = jit_or_not(getattr(relaxation, function))(logits)
    assert np.all(np.isfinite(values)), function
    gradient = jit_or_not(jax.grad(lambda x, f=getattr(relaxation, function): f(x).sum()))(logits)
    assert np.all(np.isfinite(gradient)), function
  keep = np.exp(np.asarray(relaxation.log_keep_prob(logits), np.float64))
  np.testing.assert_allclose(keep[[0, -1]], [0.0, 1.0], atol=1e-12)
  for gate_value in (0.0, 0.5, 1.0):
    log_prob = relaxation.log_prob(jnp.full_like(logits, gate_value), logits)
    assert not np.any(np.isnan(log_prob)), gate_value
    gradient = jax.grad(lambda x, v=gate_value: jnp.where(
        jnp.isfinite(relaxation.log_prob(jnp.full_like(x, v), x)),
        relaxation.log_prob(jnp.full_like(x, v), x), 0.0).sum())(logits)
    assert np.all(np.isfinite(gradient)), gate_value


@pytest.mark.parametrize('name, options', CASES)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16], ids=['bfloat16', 'float16'])
def test_low_precision_logits_give_float32(name, options, dtype):
  relaxation = relaxations.by_name(name, **options)
  logits = jnp.asarray([[-2.0, 0.0], [0.5, 3.0]], dtype)
  as_float32 = logits.astype(jnp.float32)
  noise = relaxation.noise(jax.random.key(0), logits.shape)
  assert noise.dtype == jnp.float32
  cases = {
      'sample': lambda x: relaxation.sample(noise, x),
      'log_keep_prob': relaxation.log_keep_prob,
      'prob_zero': relaxation.prob_zero,
      'prob_one': relaxation.prob_one,
      'deterministic_gate': relaxation.deterministic_gate,
      'log_prob': lambda x: relaxation.log_prob(jnp.asarray([[0.0, 0.25], [0.5, 1.0]], dtype), x),
  }
  for function_name, function in cases.items():
    result = function(logits)
    assert result.dtype == jnp.float32, function_name
    assert result.shape == logits.shape, function_name
    np.testing.assert_array_equal(result, function(as_float32), err_msg=function_name)


@pytest.mark.parametrize('name, options', CASES)
def test_sample_under_vmap_and_jit_matches_loop(name, options, jit_or_not):
  relaxation = relaxations.by_name(name, **options)
  keys = jax.random.split(jax.random.key(11), 4)
  logits = jax.random.normal(jax.random.key(12), (4, 3)) * 2.0
  batched = jit_or_not(jax.vmap(lambda k, x: relaxations.draw(relaxation, k, x)))(keys, logits)
  looped = jnp.stack([relaxations.draw(relaxation, k, x) for k, x in zip(keys, logits)])
  np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)


def test_noise_shape_must_match_logits():
  for name in relaxations.NAMES:
    relaxation = relaxations.by_name(name)
    with pytest.raises(ValueError, match='noise has shape'):
      relaxation.sample(jnp.zeros((3,)), jnp.zeros((4,)))


def test_hard_concrete_relaxation_is_the_hard_concrete_module():
  from dmx import hard_concrete  # pylint: disable=import-outside-toplevel
  relaxation = relaxations.hard_concrete()
  key = jax.random.key(8)
  logits = jax.random.normal(jax.random.key(9), (5, 7)) * 3.0
  np.testing.assert_array_equal(relaxations.draw(relaxation, key, logits),
                                hard_concrete.sample(key, logits))
  np.testing.assert_array_equal(relaxation.log_keep_prob(logits),
                                hard_concrete.log_prob_nonzero(logits))
  np.testing.assert_array_equal(relaxation.deterministic_gate(logits),
                                hard_concrete.deterministic_gate(logits))


# ----------------------------------------------------------------------------
# (d) gates over depths: composition and data-parallel noise
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', relaxations.NAMES)
def test_input_gate_keep_probability_composes_over_votes(name):
  """P(prod_k v_k != 0) = prod_k P(v_k != 0) (Binary Concrete: the Bernoulli limit's product)."""
  relaxation = relaxations.by_name(name)
  vote_logits = jnp.broadcast_to(jnp.asarray([1.0, 2.0, -0.5], jnp.float32)[:, None, None],
                                 (3, 20_000, 1))
  for layer in range(3):
    gates, log_keep = probes.sample_gates('input', jax.random.key(layer), vote_logits, layer,
                                          relaxation=relaxation)
    keep = float(jnp.exp(log_keep[0, 0]))
    expected = float(np.prod(np.exp(relaxation.log_keep_prob(vote_logits[:layer + 1, 0, 0]))))
    np.testing.assert_allclose(keep, expected, rtol=1e-5)
    if name != 'binary_concrete':
      assert abs(np.mean(np.asarray(gates) != 0.0) - keep) < binomial_tolerance(keep, 20_000)


@pytest.mark.parametrize('name', relaxations.NAMES)
@pytest.mark.parametrize('gate', probes.GATES)
def test_data_parallel_rows_match_the_global_draw(name, gate):
  relaxation = relaxations.by_name(name)
  vote_logits = jax.random.normal(jax.random.key(1), (3, 8, 5)) * 2.0
  key = jax.random.key(2)
  whole, whole_keep = probes.sample_gates(gate, key, vote_logits, 2, relaxation=relaxation)
  for offset in (0, 4):
    rows, rows_keep = probes.sample_gates(gate, key, vote_logits[:, offset:offset + 4], 2,
                                          relaxation=relaxation, example_offset=offset,
                                          global_batch=8)
    np.testing.assert_array_equal(rows, whole[offset:offset + 4])
    np.testing.assert_array_equal(rows_keep, whole_keep[offset:offset + 4])


def test_relaxation_and_hard_concrete_parameters_are_exclusive():
  with pytest.raises(ValueError, match='not both'):
    probes.sample_gates('hidden', jax.random.key(0), jnp.zeros((2, 1, 3)), 0, temperature=0.3,
                        relaxation=relaxations.hard_kuma())


# ----------------------------------------------------------------------------
# (e) factories and config
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name, options, message', [
    ('gumbel', {}, 'unknown relaxation'),
    ('hard_concrete', dict(temperature=0.0), 'temperature'),
    ('hard_concrete', dict(stretch=(0.1, 1.0)), 'stretch'),
    ('binary_concrete', dict(temperature=-1.0), 'temperature'),
    ('hard_kuma', dict(b=0.0), 'b must be'),
    ('hard_kuma', dict(stretch=(-0.1, 0.9)), 'stretch'),
    ('straight_through', dict(b=0.5), 'does not take'),
    ('straight_through', dict(temperature=0.0), 'temperature'),
    ('reinforce', dict(b=1.0), 'does not take'),
])
def test_by_name_rejects_nonsense_in_one_line(name, options, message):
  with pytest.raises(ValueError, match=message) as error:
    relaxations.by_name(name, **options)
  assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize('overrides', [
    dict(relaxation='gumbel'), dict(relaxation='binary_concrete', binary_concrete_temperature=0.0),
    dict(hard_kuma_b=-1.0), dict(hard_kuma_stretch=(0.0, 1.1)),
    dict(reinforce_baseline_decay=1.0), dict(relaxation='reinforce', reinforce_baseline_decay=-0.1),
    dict(straight_through_temperature=0.0),
])
def test_config_rejects_bad_relaxation_settings(overrides):
  with pytest.raises(ValueError) as error:
    train.DiffMaskConfig(**overrides)
  assert len(str(error.value).splitlines()) == 1


def test_config_builds_the_named_relaxation():
  assert train.DiffMaskConfig().gate_relaxation().name == 'hard_concrete'
  for name in relaxations.NAMES:
    assert train.DiffMaskConfig(relaxation=name).gate_relaxation().name == name
  kuma = train.DiffMaskConfig(relaxation='hard_kuma', hard_kuma_b=1.5,
                              hard_kuma_stretch=(-0.2, 1.0)).gate_relaxation()
  np.testing.assert_allclose(kuma.prob_zero(0.3),
                             relaxations.hard_kuma(1.5, (-0.2, 1.0)).prob_zero(0.3))


def test_checkpoint_from_before_relaxations_still_resumes(tmp_path):
  """A checkpoint whose config lacks the relaxation fields resumes as Hard Concrete, else is refused."""
  model, frozen, batch = tiny_toy(16)
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batch)

  def fit(config, steps, folder):
    state = train.init_state(config, params, len(model.state_dims))
    return train.fit(model, frozen, probe, config, state, itertools.repeat(batch), steps,
                     jax.random.key(2), progress=False, checkpoint_dir=folder, checkpoint_every=2)

  config = train.DiffMaskConfig(warmup_steps=2)
  reference, _ = fit(config, 4, tmp_path / 'reference')
  folder = tmp_path / 'old'
  with pytest.raises(ValueError, match='ran out'):  # dies after the checkpoint of step 2
    state = train.init_state(config, params, len(model.state_dims))
    train.fit(model, frozen, probe, config, state, iter([batch] * 3), 4, jax.random.key(2),
              progress=False, checkpoint_dir=folder, checkpoint_every=2)
  metadata_file = folder / 'metadata.json'
  metadata = json.loads(metadata_file.read_text())
  added = {'relaxation', 'binary_concrete_temperature', 'hard_kuma_b', 'hard_kuma_stretch',
           'straight_through_temperature', 'reinforce_baseline_decay'}
  assert added <= set(metadata['diffmask_config'])
  metadata['diffmask_config'] = {name: value for name, value in metadata['diffmask_config'].items()
                                 if name not in added}  # as written before relaxations existed
  metadata_file.write_text(json.dumps(metadata))

  resumed, _ = fit(config, 4, folder)
  for ours, theirs in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  with pytest.raises(checkpoint.CheckpointError, match='relaxation'):
    fit(train.DiffMaskConfig(warmup_steps=2, relaxation='reinforce'), 4, folder)


# ----------------------------------------------------------------------------
# (f) through the trainer
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy_setup():
  return tiny_toy(48)


def _train(toy_setup, relaxation, gate, steps, **overrides):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate=gate, relaxation=relaxation, warmup_steps=2, margin=0.05,
                                probe_learning_rate=1e-2, **overrides)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=8)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batch)
  state = train.init_state(config, params, len(model.state_dims))
  step = jax.jit(train.make_train_step(model, probe, config), donate_argnums=0)
  # the cached clean pass keeps the frozen model's forward out of each compilation
  outputs, clean_states = model.forward(frozen, batch)
  cached = dict(batch, clean_outputs=outputs, clean_states=tuple(clean_states))
  history = []
  for i in range(steps):
    state, metrics = step(state, frozen, cached, jax.random.fold_in(jax.random.key(4), i))
    history.append(jax.device_get(metrics))
  return config, probe, state, history


@pytest.mark.parametrize('relaxation', relaxations.NAMES)
def test_every_relaxation_trains_through_the_trainer(toy_setup, relaxation):
  gate = 'hidden'  # input gates through the trainer: the exact-gradient test above
  decay = 0.5
  config, probe, state, history = _train(toy_setup, relaxation, gate, steps=10,
                                         reinforce_baseline_decay=decay)
  for metrics in history:
    for name, value in metrics.items():
      assert np.all(np.isfinite(np.asarray(value))), (name, value)
  for leaf in jax.tree_util.tree_leaves(state):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      assert np.all(np.isfinite(np.asarray(leaf)))
  # the sparsity term moves the votes towards closing
  assert history[-1]['keep_fraction'] < history[0]['keep_fraction']
  assert (state.score_baseline is not None) == (relaxation == 'reinforce')
  if relaxation == 'reinforce':  # the baseline is the moving average of the divergence
    expected = np.zeros(3)
    for metrics in history:
      layer = int(metrics['layer_index'])
      expected[layer] = decay * expected[layer] + (1 - decay) * float(metrics['divergence'])
    np.testing.assert_allclose(state.score_baseline, expected, rtol=1e-5, atol=1e-7)
  model, frozen, batch = toy_setup
  from dmx import attribute  # pylint: disable=import-outside-toplevel
  keep, gates = attribute.keep_probs_and_gates(probe, state.probe_params, config,
                                               model.forward(frozen, batch)[1], batch['mask'])
  assert keep.shape == gates.shape == (3,) + batch['mask'].shape
  assert np.all((np.asarray(gates) >= 0.0) & (np.asarray(gates) <= 1.0))


def test_reinforce_step_gradient_is_unbiased_for_the_exact_expected_loss():
  """On sequences of 3 tokens every gate configuration can be enumerated, so the
  gradient of the exact expected divergence term is known; the trainer's one-sample
  REINFORCE gradients (surrogate, multiplier, baseline, padding mask) average to it.

  Input gates: the depth-1 gate is the product of two votes, so this covers the
  composed log-probability too (hidden gates score one vote with the same code).
  Leaving the multiplier out of the reward fails this test."""
  gate = 'input'
  from dmx import objective  # pylint: disable=import-outside-toplevel
  model = ToyModel(ToyModelConfig.tiny())
  frozen = model.init(jax.random.key(0), 3)
  batch = generate_toy_data(3, num_examples=4, max_length=3).as_batch()
  assert not batch['mask'].all()  # padding is part of the test
  multiplier = 3.0
  config = train.DiffMaskConfig(gate=gate, relaxation='reinforce', margin=0.0, warmup_steps=0,
                                multiplier_init=multiplier)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=4,
                               initial_logit=0.5)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batch)
  # baselines far from the probe's: masking changes the output a lot
  params = probes.set_baseline(params, jnp.full((model.state_dims[0 if gate == 'input' else 1],),
                                                 3.0), 0 if gate == 'input' else 1)
  layer = 1
  outputs, states = model.forward(frozen, batch)
  relaxation = config.gate_relaxation()

  def expected_divergence(probe_params):
    vote_logits = probe.apply(probe_params, states)
    baselines = probe.apply(probe_params, method='baseline_vectors')
    log_open = probes.gate_log_keep_probs(gate, vote_logits, relaxation=relaxation)[layer]
    total = 0.0
    for configuration in itertools.product((0.0, 1.0), repeat=3):
      gates = jnp.broadcast_to(jnp.asarray(configuration), batch['mask'].shape)
      log_p = jnp.where(gates > 0, log_open, relaxations.log1mexp(log_open)).sum(axis=-1)
      masked = train.masked_pass(model, frozen, batch, states, gate, gates, baselines, layer)
      total += jnp.exp(log_p) * objective.output_divergence('kl', outputs, masked)
    return total.mean()

  def sparsity_term(probe_params):
    log_open = probes.gate_log_keep_probs(gate, probe.apply(probe_params, states),
                                          relaxation=relaxation)[layer]
    return objective.sparsity_loss(config.sparsity, log_open, batch['mask']).mean()

  state = train.init_state(config, params, 3)
  # a baseline from many earlier steps near E[D]: the estimator subtracts it
  state = state._replace(score_baseline=jnp.full((3,), 0.9 * float(expected_divergence(params))),
                         running_steps=jnp.full((3,), 1000))
  vote = lambda tree: tree['params']['vote_1']
  exact = vote(jax.grad(lambda p: multiplier * expected_divergence(p))(params))
  sparsity_gradient = vote(jax.grad(sparsity_term)(params))
  gradients = train.make_gradient_fn(model, probe, config)
  draws = 20_000
  estimates = vote(jax.jit(jax.vmap(lambda key: gradients(state, frozen, batch, key, None,
                                                            layer)[2]))(
      jax.random.split(jax.random.key(5), draws)))
  signal = 0.0
  for (path, exact_leaf), estimate, sparsity_leaf in zip(
      jax.tree_util.tree_leaves_with_path(exact), jax.tree_util.tree_leaves(estimates),
      jax.tree_util.tree_leaves(sparsity_gradient)):
    samples = np.asarray(estimate, np.float64) - np.asarray(sparsity_leaf)  # the divergence part
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0) / np.sqrt(draws)
    assert np.all(np.abs(mean - np.asarray(exact_leaf)) < 5 * standard_error + 1e-7), (
        jax.tree_util.keystr(path), mean, np.asarray(exact_leaf), standard_error)
    signal = max(signal, float(np.max(np.abs(np.asarray(exact_leaf)) / standard_error)))
  # the gradient is many standard errors from 0: a wrong factor (say, the multiplier) would show
  assert signal > 20, signal


def test_reinforce_state_survives_a_checkpoint(toy_setup, tmp_path):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate='hidden', relaxation='reinforce', warmup_steps=2)
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batch)

  def fit(batches):
    state = train.init_state(config, params, len(model.state_dims))
    return train.fit(model, frozen, probe, config, state, batches, 4, jax.random.key(2),
                     progress=False, checkpoint_dir=tmp_path / 'checkpoint', checkpoint_every=2)

  trained, _ = fit(iter([batch] * 4))
  assert np.any(np.asarray(trained.score_baseline) != 0.0)
  restored, _ = fit(iter([]))  # finished: restored from the checkpoint, no batch drawn
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(trained)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  other = dataclasses.replace(config, relaxation='hard_concrete')
  with pytest.raises(Exception, match='relaxation'):
    train.fit(model, frozen, probe, other, train.init_state(other, params, 3), iter([]), 4,
              jax.random.key(2), progress=False, checkpoint_dir=tmp_path / 'checkpoint')
