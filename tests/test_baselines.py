"""Tests of the attribution baselines on models whose right answer is known.

* gradients, gradient x input, occlusion and LIME on linear models: the
  answer is the per-token contribution ``h_t . w_target``;
* erasure on a threshold model whose smallest kept subsets are known;
* Schulz et al. and Guan et al. on a model that reads one token only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import baselines
from dmx.baselines import schulz
from known_models import OneTokenModel, ThresholdModel


class LinearTokenModel:
  """``h0 = inputs``, ``h1 = h0 @ A``, logits ``= sum_t mask_t h1_t @ W + bias``.

  Batches hold ``inputs`` ``(batch, seq, dim)`` and ``mask``.
  """

  def __init__(self, dim: int = 3, hidden: int = 4, classes: int = 2):
    self.dims = (dim, hidden)
    self.classes = classes

  @property
  def state_dims(self):
    return self.dims

  def init(self, key):
    a, w, b = jax.random.split(key, 3)
    return {'A': jax.random.normal(a, self.dims), 'W': jax.random.normal(w, (self.dims[1],
                                                                            self.classes)),
            'bias': jax.random.normal(b, (self.classes,))}

  def _head(self, params, batch, h1):
    return jnp.einsum('bt,btd,dc->bc', batch['mask'].astype(jnp.float32), h1, params['W']) + \
        params['bias']

  def forward(self, params, batch):
    h0 = batch['inputs']
    h1 = h0 @ params['A']
    return self._head(params, batch, h1), (h0, h1)

  def forward_from(self, params, batch, states, layer_index, intervention):
    if layer_index == 0:
      h1 = intervention(0, states[0]) @ params['A']
    else:
      h1 = intervention(1, states[1])
    return self._head(params, batch, h1)


@pytest.fixture(scope='module')
def linear():
  model = LinearTokenModel()
  params = model.init(jax.random.key(0))
  inputs = jax.random.normal(jax.random.key(1), (4, 5, 3))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
  batch = {'inputs': inputs, 'mask': mask}
  return model, params, batch


def contributions(model, params, batch, layer_index):
  """``(batch, seq)`` ``h_t . w_target``: the exact answer for linear models (0 on padding)."""
  logits, states = model.forward(params, batch)
  target = jnp.argmax(logits, axis=-1)
  weights = params['W'][:, target].T  # (batch, hidden)
  if layer_index == 0:
    weights = jnp.einsum('dh,bh->bd', params['A'], weights)
  return np.asarray(jnp.einsum('btd,bd->bt', states[layer_index], weights) * batch['mask'])


@pytest.mark.parametrize('layer_index', [0, 1])
def test_gradients_of_a_linear_model(linear, layer_index):
  model, params, batch = linear
  result = jax.jit(functools.partial(baselines.gradient_attribution, model,
                                     layer_index=layer_index))(params, batch)
  logits, _ = model.forward(params, batch)
  target = np.argmax(logits, axis=-1)
  np.testing.assert_array_equal(result.target, target)
  weights = params['W'][:, target].T
  if layer_index == 0:
    weights = weights @ params['A'].T
  # d logit / d h_t = w_target on real tokens, 0 on padding (the head ignores them)
  expected = np.asarray(weights)[:, None, :] * np.asarray(batch['mask'])[..., None]
  np.testing.assert_allclose(result.gradients, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.gradient_norm, np.linalg.norm(expected, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(result.gradient_times_input,
                             contributions(model, params, batch, layer_index), rtol=1e-4,
                             atol=1e-5)


def test_occlusion_of_a_linear_model_is_each_contribution(linear):
  model, params, batch = linear
  result = baselines.occlusion(model, params, batch, layer_index=1, output='logit')
  np.testing.assert_allclose(result.token_scores, contributions(model, params, batch, 1),
                             rtol=1e-4, atol=1e-5)
  # erasing to a baseline b instead of 0 removes (h_t - b) . w
  baseline = jnp.ones(4)
  shifted = baselines.occlusion(model, params, batch, layer_index=1, output='logit',
                                baseline=baseline)
  target = np.argmax(model.forward(params, batch)[0], axis=-1)
  offset = np.asarray(params['W'][:, target].T @ baseline)
  expected = (contributions(model, params, batch, 1) - offset[:, None]) * np.asarray(batch['mask'])
  np.testing.assert_allclose(shifted.token_scores, expected, rtol=1e-4, atol=1e-5)


def test_lime_recovers_a_linear_models_contributions(linear):
  model, params, batch = linear
  result = jax.jit(functools.partial(baselines.lime, model, layer_index=0, num_samples=300,
                                     output='logit', ridge=1e-6, samples_per_call=64))(
                                         params, batch, jax.random.key(3))
  np.testing.assert_allclose(result.token_scores, contributions(model, params, batch, 0),
                             rtol=1e-3, atol=1e-3)
  # all erased: only the bias is left
  logits = model.forward(params, batch)[0]
  bias = np.asarray(params['bias'])[np.argmax(logits, axis=-1)]
  np.testing.assert_allclose(result.intercept, bias, rtol=1e-3, atol=1e-3)


def test_lime_masks_follow_limes_sampler():
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  masks = np.asarray(baselines.lime_masks(jax.random.key(0), mask, 4000))
  np.testing.assert_array_equal(masks[0], mask)  # the example itself comes first
  assert np.all(masks[:, ~np.asarray(mask)] == 0)  # padding is never kept
  erased = (np.asarray(mask)[None] & (masks == 0)).sum(-1)[1:]
  # between 1 and L positions erased, uniformly
  assert erased[:, 0].min() == 1 and erased[:, 0].max() == 4
  np.testing.assert_allclose(np.bincount(erased[:, 1])[1:] / len(erased), 1 / 6, atol=0.03)


def threshold_batch():
  inputs = np.array([[0.9, 0.0, 0.8, 0.1, 0.0],   # class 1; only {0, 2} of size <= 2 keeps it
                     [2.0, 0.5, 0.0, 0.0, 0.0],   # class 1; {0} alone keeps it
                     [0.2, 0.1, 0.0, 0.0, 0.0],   # class 0; any single kept position does: {2}
                                                   # is the most confident, {0} the closest
                     [0.6, 0.6, 0.6, 0.0, 0.0]],  # class 1; needs all three real positions
                    np.float32)[..., None]
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], bool)
  return {'inputs': jnp.asarray(inputs), 'mask': jnp.asarray(mask)}


def test_erasure_finds_the_known_smallest_subsets():
  batch = threshold_batch()
  result = baselines.erasure_search(ThresholdModel(), {}, batch, pairs_per_call=7)
  np.testing.assert_array_equal(result.keep, [[1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0],
                                              [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(result.size, [2, 1, 1, 3])
  np.testing.assert_array_equal(result.num_optimal, [1, 1, 3, 1])
  assert result.found.all() and result.complete
  closest = baselines.erasure_search(ThresholdModel(), {}, batch, tie_break='closest')
  np.testing.assert_array_equal(closest.keep[2], [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(closest.keep[[0, 1, 3]], result.keep[[0, 1, 3]])
  # size 1: 5 + 5 + 3 + 3 pairs; size 2: C(5,2) + C(3,2); size 3: C(3,3)
  assert result.evaluations == 16 + 13 + 1


def test_erasure_baseline_and_min_size():
  batch = threshold_batch()
  # erased positions worth 1.0 each: keeping nothing (min_size 0) already predicts class 1
  result = baselines.erasure_search(ThresholdModel(), {}, batch, baseline=jnp.ones(1), min_size=0)
  assert result.size[0] == 0 and result.keep[0].sum() == 0


def test_erasure_bound_raises_or_flags():
  batch = threshold_batch()
  with pytest.raises(baselines.ErasureBudgetExceeded, match='max_evaluations=20'):
    baselines.erasure_search(ThresholdModel(), {}, batch, max_evaluations=20)
  flagged = baselines.erasure_search(ThresholdModel(), {}, batch, max_evaluations=20,
                                     on_budget='flag')
  assert not flagged.complete
  np.testing.assert_array_equal(flagged.found, [False, True, True, False])
  assert flagged.keep[0].sum() == 0 and flagged.size[0] == -1
  with pytest.raises(baselines.ErasureBudgetExceeded, match='max_seconds'):
    baselines.erasure_search(ThresholdModel(), {}, batch, max_seconds=0.0)


@pytest.fixture(scope='module')
def one_token():
  model = OneTokenModel()
  params = {'u': jnp.array([1.0, -0.5])}
  inputs = jax.random.normal(jax.random.key(5), (6, 4, 2))
  # relevant token clearly on one side, so the prediction is confident
  inputs = inputs.at[:, 0].set(jnp.array([0.6, -0.4]) * jnp.array([1, -1, 1, -1, 1, -1])[:, None])
  mask = jnp.ones((6, 4), bool).at[1, 3].set(False)
  return model, params, {'inputs': inputs, 'mask': mask}


@pytest.mark.parametrize('attribution, per_feature', [('capacity', False), ('capacity', True),
                                                      ('gate', False)])
def test_schulz_attributes_to_the_only_relevant_token(one_token, attribution, per_feature):
  model, params, batch = one_token
  result = jax.jit(functools.partial(
      baselines.information_bottleneck, model, noise_mean=jnp.zeros(2), noise_std=jnp.ones(2),
      steps=100, learning_rate=0.1, optimizer='rmsprop', beta=1.0, attribution=attribution,
      per_feature=per_feature))(params, batch, jax.random.key(0))
  scores = np.asarray(result.token_scores)
  assert np.all(np.argmax(scores, axis=-1) == 0)
  assert np.all(scores[:, 0] > 3 * scores[:, 1:].max(axis=-1))
  assert scores[1, 3] == 0.0  # padding
  if attribution == 'capacity':  # bits per token: the per-feature capacities summed
    np.testing.assert_allclose(scores, np.asarray(result.capacity).sum(-1), rtol=1e-6)


def test_bottleneck_kl_closed_form():
  gates = jnp.array([0.0, 0.3, 0.9])
  state, mean, std = jnp.array([2.0, -1.0, 0.5]), jnp.array([0.5, 0.0, 1.0]), jnp.array([1.0, 2.0,
                                                                                          0.5])
  kl = schulz.bottleneck_kl(gates, jnp.log1p(-gates), state, mean, std)
  # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
  m1, s1 = gates * state + (1 - gates) * mean, (1 - gates) * std
  expected = np.log(std / s1) + (s1 ** 2 + (m1 - mean) ** 2) / (2 * std ** 2) - 0.5
  np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-7)
  assert float(kl[0]) == 0.0  # a closed gate lets nothing through


def test_guan_attributes_to_the_only_relevant_token(one_token):
  model, params, batch = one_token
  result = jax.jit(functools.partial(baselines.guan_noise_scales, model, steps=200,
                                     entropy_weight=0.05))(params, batch, jax.random.key(0))
  scores = np.asarray(result.token_scores)
  assert np.all(np.argmax(scores, axis=-1) == 0)
  sigma = np.asarray(result.noise_scales)
  assert np.all(sigma[:, 0] * 3 < np.min(np.where(batch['mask'][:, 1:], sigma[:, 1:], np.inf), -1))
  assert scores[1, 3] == 0.0


def test_state_statistics_over_real_tokens(linear):
  model, params, batch = linear
  halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
  mean, std = baselines.state_statistics(model, params, halves, layer_index=1)
  h1 = np.asarray(model.forward(params, batch)[1][1])[np.asarray(batch['mask'])]
  np.testing.assert_allclose(mean, h1.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, h1.std(0), rtol=1e-4)
  mean_p, std_p = baselines.state_statistics(model, params, halves, layer_index=1,
                                             per_position=True)
  assert mean_p.shape == (5, 4)
  states = np.asarray(model.forward(params, batch)[1][1])
  np.testing.assert_allclose(mean_p[0], states[:, 0].mean(0), rtol=1e-5)  # position 0: all real
  np.testing.assert_allclose(mean_p[4], states[0, 4], rtol=1e-5)  # position 4: one example
  every = baselines.states_statistics(model, params, halves)  # one pass, every state
  assert len(every) == len(model.state_dims)
  for layer_index, (mean_k, std_k) in enumerate(every):
    reference = np.asarray(model.forward(params, batch)[1][layer_index])[np.asarray(batch['mask'])]
    np.testing.assert_allclose(mean_k, reference.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std_k, reference.std(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('call, message', [
    (lambda m, p, b: baselines.gradient_attribution(m, p, b, layer_index=2), 'layer_index'),
    (lambda m, p, b: baselines.occlusion(m, p, b, output='margin'), 'output'),
    (lambda m, p, b: baselines.lime(m, p, b, jax.random.key(0), num_samples=1), 'num_samples'),
    (lambda m, p, b: baselines.erasure_search(m, p, b, on_budget='ignore'), 'on_budget'),
    (lambda m, p, b: baselines.information_bottleneck(
        m, p, b, jax.random.key(0), noise_mean=0.0, noise_std=1.0, attribution='bits'),
     'attribution'),
    (lambda m, p, b: baselines.guan_noise_scales(m, p, b, jax.random.key(0), steps=0), 'steps'),
])
def test_bad_arguments_are_one_line_value_errors(linear, call, message):
  model, params, batch = linear
  with pytest.raises(ValueError, match=message) as error:
    call(model, params, batch)
  assert '\n' not in str(error.value)
