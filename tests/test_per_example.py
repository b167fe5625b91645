"""Tests of per-example DiffMask and REINFORCE (dmx.baselines.per_example).

The right answers are known independently: a model that reads one position
only (keep that one, erase the rest), and an additive threshold model whose
optimum under the KL constraint is enumerated exhaustively by
``erasure_search(..., max_divergence=margin)``. The score-function pieces are
checked against their closed forms in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import relaxations
from dmx.baselines.erasure import erasure_search
from dmx.baselines.per_example import (per_example_diffmask, per_example_masks,
                                       per_example_reinforce, reinforce_reward)
from known_models import OneTokenModel, ThresholdModel

METHODS = [pytest.param(per_example_diffmask, id='diffmask'),
           pytest.param(per_example_reinforce, id='reinforce')]


def one_token_batch():
  """Three examples of lengths 4, 1 and 3 (padding after), position 0 decisive in each."""
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(3, 4, 2)).astype(np.float32)
  inputs[:, 0] = [[1.0, 0.5], [-1.0, -0.5], [0.8, 0.9]]
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], bool)
  return {'inputs': jnp.asarray(inputs), 'mask': jnp.asarray(mask)}, {'u': jnp.array([1.0, 1.0])}


FAST = dict(steps=300, margin=0.05, learning_rate=0.1, samples=2)


@pytest.mark.parametrize('method', METHODS)
def test_keeps_exactly_the_position_that_matters(method):
  batch, params = one_token_batch()
  result = method(OneTokenModel(), params, batch, key=jax.random.key(1), **FAST)
  # position 0 kept, every other real position erased, padding reported as 0
  np.testing.assert_array_equal(result.mask, [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
  assert bool(result.keeps_prediction.all())
  np.testing.assert_allclose(result.divergence, 0.0, atol=1e-6)
  assert float(result.keep_prob[0, 0]) > 0.5 and float(result.keep_prob[0, 1:].max()) < 0.5
  assert float(jnp.abs(result.keep_prob * ~batch['mask']).max()) == 0.0
  assert result.steps == FAST['steps']


def additive_batch():
  # at margin 0.04. A single gate whose erasure costs KL d has the fractional
  # optimum P(open) = 1 - margin / d under the expected constraint, so a
  # deterministic answer needs d > 2 * margin for the positions that must stay
  inputs = np.array([[0.9, 0.05, 0.8, 0.1, 0.0],   # clean 1.85: keep {0, 2} (KL 0.032)
                     [2.0, 1.0, 0.0, 0.0, 0.0],    # clean 3.0: keep {0, 1}; {0} costs 0.115
                     [0.7, 0.7, 0.6, 0.0, 0.0]],   # clean 2.0: keep all three (any pair flips)
                    np.float32)[..., None]
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  return {'inputs': jnp.asarray(inputs), 'mask': jnp.asarray(mask)}


@pytest.mark.parametrize('method', METHODS)
def test_matches_the_exhaustive_optimum_of_the_constrained_problem(method):
  batch, margin = additive_batch(), 0.04
  exact = erasure_search(ThresholdModel(), {}, batch, max_divergence=margin, return_optimal=True)
  # the reference is exhaustive enumeration; each optimum here is unique
  np.testing.assert_array_equal(exact.num_optimal, [1, 1, 1])
  np.testing.assert_array_equal(exact.keep, [[1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
  result = method(ThresholdModel(), {}, batch, key=jax.random.key(0), steps=800, margin=margin,
                  learning_rate=0.1, samples=4)
  np.testing.assert_array_equal(result.mask, exact.keep)
  assert bool(result.keeps_prediction.all())
  assert float(result.divergence.max()) <= margin


@pytest.mark.parametrize('method', METHODS)
def test_flip_penalty_keeps_a_near_tie_that_the_kl_bound_lets_flip(method):
  """Clean sum 1.55 (P(class 1) = 0.55); erasing the 0.1 flips it at KL 0.020 < margin 0.04."""
  inputs = np.array([[0.9, 0.55, 0.1, 0.0]], np.float32)[..., None]
  batch = {'inputs': jnp.asarray(inputs), 'mask': jnp.asarray([[True, True, True, False]])}
  margin = 0.04
  exact = erasure_search(ThresholdModel(), {}, batch, max_divergence=margin, return_optimal=True)
  np.testing.assert_array_equal(exact.keep, [[1, 1, 1, 0]])  # the argmax needs all three
  options = dict(key=jax.random.key(0), steps=800, margin=margin, learning_rate=0.1, samples=4)
  free_flip = method(ThresholdModel(), {}, batch, **options)
  np.testing.assert_array_equal(free_flip.mask, [[1, 1, 0, 0]])
  assert not bool(free_flip.keeps_prediction[0]) and float(free_flip.divergence[0]) < margin
  penalised = method(ThresholdModel(), {}, batch, flip_penalty=1.0, **options)
  np.testing.assert_array_equal(penalised.mask, exact.keep)
  assert bool(penalised.keeps_prediction[0])


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('initial_logit', [-1e4, 1e4])
def test_finite_at_extreme_logits_and_confident_models(method, initial_logit):
  batch, params = one_token_batch()
  # a saturated model (logits of +-1e4): the erased pass's KL is huge
  result = method(OneTokenModel(scale=1e4), params, batch, steps=5, initial_logit=initial_logit,
                  learning_rate=1e3, margin=0.0)
  for value in result[:-1]:
    assert np.all(np.isfinite(np.asarray(value, np.float64)))
  assert float(jnp.abs(result.mask * ~batch['mask']).max()) == 0.0


@pytest.mark.parametrize('method', METHODS)
def test_logit_bound_clips_every_logit(method):
  # the original's per-example code: logits start at 5, are clipped to [-10, 10], and the
  # sparsity term is the mean log P(z != 0), which keeps pushing a closed gate down
  batch, params = one_token_batch()
  options = dict(key=jax.random.key(1), initial_logit=5.0, sparsity='log_l0', **FAST)
  bounded = method(OneTokenModel(), params, batch, logit_bound=10.0, **options)
  assert float(jnp.abs(bounded.logits).max()) <= 10.0
  # without the bound the erased gates' logits run past it
  unbounded = method(OneTokenModel(), params, batch, **options)
  assert float(jnp.abs(unbounded.logits).max()) > 10.0
  # the bound is a clip: a bound the search never reaches changes nothing
  loose = method(OneTokenModel(), params, batch, logit_bound=1e6, **options)
  np.testing.assert_array_equal(loose.logits, unbounded.logits)


@pytest.mark.parametrize('method', METHODS)
def test_gates_that_start_wide_open_still_find_the_position_that_matters(method):
  batch, params = one_token_batch()
  result = method(OneTokenModel(), params, batch, key=jax.random.key(1), initial_logit=5.0,
                  **FAST)
  np.testing.assert_array_equal(result.mask, [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize('method', METHODS)
def test_length_one_input(method):
  params = {'u': jnp.array([1.0, 1.0])}
  batch = {'inputs': jnp.array([[[0.7, 0.2]]]), 'mask': jnp.array([[True]])}
  result = method(OneTokenModel(), params, batch, **FAST)
  np.testing.assert_array_equal(result.mask, [[1.0]])
  assert result.keep_prob.shape == (1, 1) and bool(result.keeps_prediction[0])


@pytest.mark.parametrize('method', METHODS)
def test_jit_progress_and_plain_agree(method, jit_or_not):
  batch, params = one_token_batch()
  options = dict(steps=10, margin=0.05, learning_rate=0.2, samples=2)
  run = jit_or_not(functools.partial(method, OneTokenModel(), **options))
  result = run(params, batch, key=jax.random.key(3))
  chunked = method(OneTokenModel(), params, batch, key=jax.random.key(3), progress=True,
                   chunk_steps=5, **options)
  np.testing.assert_allclose(result.logits, chunked.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.multiplier, chunked.multiplier, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(result.mask, chunked.mask)


def test_reinforce_gradient_is_the_score_function_estimate():
  """One step's logit gradient, by hand: lambda * (D - b) * (z - sigmoid(a)) / samples + L0's."""
  logits = jnp.array([[0.3, -0.7, 1.1]])
  mask = jnp.array([[True, True, False]])
  gates = jnp.array([[1.0, 0.0, 1.0]])
  relaxation = relaxations.reinforce()
  reward = jnp.array([0.8])

  def surrogate(a):
    return relaxations.score_function_surrogate(reward, relaxation.log_prob(gates, a), mask).sum()

  assert float(surrogate(logits)) == 0.0
  grad = np.asarray(jax.grad(surrogate)(logits))
  a = np.asarray(logits, np.float64)
  expected = 0.8 * (np.asarray(gates) - 1.0 / (1.0 + np.exp(-a))) * np.asarray(mask)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_original_reinforce_trades_divergence_against_l0_at_a_fixed_weight():
  # Erasing position 0 costs KL(p || uniform) = 0.687 nats in every example; it saves
  # 1 / length of expected L0. The original's reward ignores the multiplier, so it keeps the
  # position where 0.687 > 1 / length (lengths 4 and 3) and erases it in the length-1
  # example (saving 1) even though that breaks the constraint, which the Lagrangian
  # estimator keeps (test_keeps_exactly_the_position_that_matters).
  batch, params = one_token_batch()
  result = per_example_reinforce(OneTokenModel(), params, batch, key=jax.random.key(1),
                                 reward='original', baseline_decay=0.99, **FAST)
  np.testing.assert_array_equal(result.mask, [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_allclose(result.divergence[1], np.log(2) - 0.0058, atol=2e-3)


@pytest.mark.parametrize('reward, multiplier_reaches_logits', [('lagrangian', True),
                                                              ('original', False)])
def test_only_the_lagrangian_reward_lets_the_multiplier_reach_the_logits(
    reward, multiplier_reaches_logits):
  # the original's loss is alpha * loss_c.detach() + loss_g + reward * log_p: alpha multiplies a
  # detached term, so the logits follow the same path whatever the multiplier is
  batch, params = one_token_batch()
  options = dict(key=jax.random.key(2), steps=20, margin=0.05, learning_rate=0.1, samples=2,
                 reward=reward)
  small = per_example_reinforce(OneTokenModel(), params, batch, multiplier_init=0.5, **options)
  large = per_example_reinforce(OneTokenModel(), params, batch, multiplier_init=50.0, **options)
  assert not np.allclose(small.multiplier, large.multiplier)
  assert np.allclose(small.logits, large.logits, atol=1e-6) != multiplier_reaches_logits


@pytest.mark.parametrize('count', [0, 3])
def test_reinforce_rewards_by_hand(count):
  divergence = np.array([[0.3, 0.02], [0.1, 0.5], [0.7, 0.0]])  # (samples, batch)
  multipliers, average = np.array([2.0, 0.5]), np.array([0.2, -0.1])
  margin, decay = 0.05, 0.9
  options = dict(margin=margin, decay=decay)
  original = reinforce_reward(jnp.asarray(divergence), jnp.asarray(multipliers),
                              jnp.asarray(average), count, reward='original', **options)
  # the original: loss_c = D - eps; b <- 0.99 b + 0.01 mean(loss_c); reward = loss_c - b
  constraint = divergence - margin
  updated = decay * average + (1 - decay) * constraint.mean(axis=0)
  np.testing.assert_allclose(original, constraint - updated, atol=1e-6)
  lagrangian = reinforce_reward(jnp.asarray(divergence), jnp.asarray(multipliers),
                                jnp.asarray(average), count, reward='lagrangian', **options)
  corrected = average / (1 - decay ** count) if count else np.zeros(2)
  np.testing.assert_allclose(lagrangian, multipliers * (divergence - corrected), atol=1e-6)


def test_bias_corrected_moving_average():
  decay, values = 0.9, [0.5, 2.0, 1.0]
  average = jnp.zeros(())
  for count, value in enumerate(values, start=1):
    average = relaxations.moving_average(average, value, decay)
    weights = np.array([(1 - decay) * decay ** (count - 1 - k) for k in range(count)])
    np.testing.assert_allclose(relaxations.bias_corrected_average(average, count, decay),
                               np.dot(weights, values[:count]) / weights.sum(), rtol=1e-6)
  assert float(relaxations.bias_corrected_average(jnp.ones(()), 0, decay)) == 0.0


@pytest.mark.parametrize('options, match', [
    (dict(steps=0), 'steps'), (dict(samples=0), 'samples'), (dict(margin=-1.0), 'margin'),
    (dict(learning_rate=0.0), 'learning_rate'), (dict(sparsity='l1'), 'sparsity'),
    (dict(baseline_decay=1.0), 'baseline_decay'), (dict(layer_index=1), 'layer_index'),
    (dict(multiplier_init=1e6), 'multiplier_init'), (dict(optimizer='sgd'), 'optimizer'),
    (dict(reward='baseline'), 'reward'), (dict(logit_bound=0.0), 'logit_bound'),
    (dict(flip_penalty=-1.0), 'flip_penalty'), (dict(flip_penalty=float('inf')), 'flip_penalty'),
])
def test_bad_arguments_are_one_line_errors(options, match):
  batch, params = one_token_batch()
  with pytest.raises(ValueError, match=match):
    per_example_masks(OneTokenModel(), params, batch, relaxation=relaxations.hard_concrete(),
                      **options)
