"""Tests of the toy task: the generator, the ground truth, the model's injection points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx.data.toy import generate_toy_data, ground_truth_attribution, iterate_batches, split_toy_data
from dmx.models.toy import ToyModel, ToyModelConfig, accuracy, classifier_loss, train_toy_model
from tests.conftest import tiny_toy


def test_generator_statistics_and_labels():
  data = generate_toy_data(seed=3, num_examples=4000)
  lengths = data.mask.sum(axis=1)
  assert lengths.min() == 1 and lengths.max() == 10
  assert np.all(data.query[:, 0] != data.query[:, 1])
  in_query = ((data.digits == data.query[:, :1]) | (data.digits == data.query[:, 1:])) & data.mask
  share = in_query.sum() / data.mask.sum()
  assert abs(share - 0.5) < 0.02, share  # half the positions come from the query
  # each of the eight other digits is equally likely among the rest
  others = data.digits[(~in_query) & data.mask]
  assert len(np.unique(others)) == 10
  count_n = ((data.digits == data.query[:, :1]) & data.mask).sum(axis=1)
  count_m = ((data.digits == data.query[:, 1:]) & data.mask).sum(axis=1)
  np.testing.assert_array_equal(data.labels, (count_n > count_m).astype(int))
  np.testing.assert_array_equal(data.digits[~data.mask], 0)


def test_generator_is_seeded():
  a, b = generate_toy_data(7, 100), generate_toy_data(7, 100)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(generate_toy_data(8, 100).digits, a.digits)


def test_split_and_batches():
  data = generate_toy_data(0, 1000)
  train, val = split_toy_data(data, 0.1)
  assert len(train) == 900 and len(val) == 100
  batches = list(iterate_batches(val, 32))
  assert [len(b) for b in batches] == [32, 32, 32, 4]
  assert [len(b) for b in iterate_batches(val, 32, drop_remainder=True)] == [32, 32, 32]
  with pytest.raises(ValueError):
    split_toy_data(data, 1.5)
  with pytest.raises(ValueError):
    generate_toy_data(0, num_examples=0)


def test_ground_truth_uniform_over_query_digits():
  data = generate_toy_data(1, 50)
  truth = ground_truth_attribution(data)
  for row, digits, mask, query in zip(truth, data.digits, data.mask, data.query):
    relevant = np.isin(digits, query) & mask
    if relevant.any():
      np.testing.assert_allclose(row[relevant], 1.0 / relevant.sum())
      np.testing.assert_array_equal(row[~relevant], 0.0)
    else:
      np.testing.assert_array_equal(row, 0.0)


@pytest.fixture(scope='module')
def tiny_model():
  return tiny_toy(8)


def test_states_shapes(tiny_model):
  model, params, batch = tiny_model
  logits, states = model.forward(params, batch)
  assert logits.shape == (8, 2)
  assert [s.shape for s in states] == [(8, 10, d) for d in model.state_dims]


@pytest.mark.parametrize('traced', [False, True], ids=['int', 'traced'])
def test_resumed_pass_equals_full_pass(tiny_model, traced):
  """Resuming at depth l with h_l replaced equals recomputing everything with that h_l."""
  model, params, batch = tiny_model
  logits, states = model.forward(params, batch)
  for layer in range(3):
    identity = model.forward_from(params, batch, states, jnp.asarray(layer) if traced else layer,
                                  lambda k, h: h)
    np.testing.assert_allclose(identity, logits, rtol=1e-5, atol=1e-6)
  # replace h1 by noise: resuming from 1 must equal running the GRU and head on that noise
  noise = jax.random.normal(jax.random.key(1), states[1].shape)
  resumed = model.forward_from(params, batch, states, jnp.asarray(1) if traced else 1,
                               lambda k, h: noise if k == 1 else h)
  expected = model.module.apply(
      params, model.module.apply(params, noise, method='recurrent'), batch['mask'],
      method='classify')
  np.testing.assert_allclose(resumed, expected, rtol=1e-5, atol=1e-6)


def test_classifier_reads_last_real_position(tiny_model):
  model, params, batch = tiny_model
  logits, _ = model.forward(params, batch)
  padded = dict(batch, digits=np.where(batch['mask'], batch['digits'], 7))
  np.testing.assert_allclose(model.forward(params, padded)[0], logits, rtol=1e-6)


def test_tiny_model_learns():
  data = generate_toy_data(0, 600)
  train, val = split_toy_data(data)
  model = ToyModel(ToyModelConfig.tiny())
  losses = []
  params = train_toy_model(model, train, epochs=6, batch_size=32, progress=False,
                           on_epoch=lambda epoch, loss: losses.append(loss))
  assert losses[-1] < losses[0]
  assert accuracy(model, params, train) > 0.6


@pytest.mark.parametrize('bad', [dict(embedding_dim=0), dict(gru_dim=-1),
                                 dict(feedforward_activation='sigmoid')])
def test_model_config_rejects_nonsense(bad):
  with pytest.raises(ValueError):
    ToyModelConfig(**bad)


def test_classifier_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 2)) * 3
  labels = rng.integers(0, 2, size=6)
  # float64 reference: softmax cross-entropy, and the entropy of a softmax over the batch of margins
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  cross_entropy = -log_softmax[np.arange(6), labels].mean()
  margins = logits[:, 1] - logits[:, 0]
  batch_probs = np.exp(margins - margins.max()) / np.exp(margins - margins.max()).sum()
  entropy = -(batch_probs * np.log(batch_probs)).sum()
  loss = classifier_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 0.1)
  np.testing.assert_allclose(float(loss), cross_entropy - 0.1 * entropy, rtol=1e-5)
  # equal margins maximise the entropy at log(batch); the penalty then lowers the loss by 0.1*log 6
  flat = jnp.zeros((6, 2))
  np.testing.assert_allclose(float(classifier_loss(flat, jnp.asarray(labels), 0.1)),
                             np.log(2) - 0.1 * np.log(6), rtol=1e-5)


def test_table1_entry_reports_an_infinite_kl_as_none():
  from dmx.pipelines.toy import score_attribution
  reference = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
  mask = np.ones((3, 3), bool)
  delta = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  entry = score_attribution(reference, delta, mask)
  # row 0 misses half the ground truth (infinite KL), row 1 has no ground truth, row 2 is exact
  assert entry['kl'] is None and entry['infinite_kl_examples'] == 1 and entry['num_examples'] == 2
  js_half = 0.5 * (0.5 * np.log(0.5 / 0.25) + np.log(1 / 0.75) + 0.5 * np.log(0.5 / 0.75))
  np.testing.assert_allclose(entry['js'], js_half / 2, rtol=1e-9)
  uniform = score_attribution(reference, np.ones((3, 3)), mask)
  assert uniform['kl'] is not None and uniform['infinite_kl_examples'] == 0


def test_table1_checks_follow_the_numbers():
  from dmx.pipelines.compare_methods import table1_checks
  methods = {'diffmask_hidden': dict(kl=0.01, js=0.005),
             'integrated_gradients': dict(kl=0.5, js=0.25),  # 0.11 from the paper's 0.14
             'erasure': dict(kl=None, js=0.26, settings=dict(single_position_fraction=1.0))}
  checks = table1_checks(methods)
  assert checks['diffmask_best_kl'] and checks['diffmask_best_js'] and checks['erasure_delta']
  assert checks['js_within_tolerance'] == {'integrated_gradients': False, 'erasure': True}
  methods['integrated_gradients']['js'] = 0.004
  assert not table1_checks(methods)['diffmask_best_js']


def test_run_toy_rejects_unknown_baselines(tmp_path):
  from dmx.pipelines.toy import ToyExperimentConfig, run_toy
  with pytest.raises(ValueError, match='unknown baselines'):
    run_toy(ToyExperimentConfig.tiny(), tmp_path, baseline_names=('attention',))
  with pytest.raises(ValueError, match='baseline_examples'):
    ToyExperimentConfig(baseline_examples=-1)
  with pytest.raises(ValueError, match='ig_variant must be one of'):
    ToyExperimentConfig(ig_variant='captum')
