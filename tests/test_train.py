"""Tests of the DiffMask train step: one step, the dual ascent, NaN safety, layer sampling."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import objective, probes, train
from tests.conftest import tiny_toy


@pytest.fixture(scope='module')
def toy_setup():
  return tiny_toy(32)


def _state(model, frozen, batch, config, initial_logit=5.0):
  probe = probes.DiffMaskProbe(gate=config.gate, state_dims=model.state_dims, hidden_size=8,
                               initial_logit=initial_logit)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batch)
  return probe, train.init_state(config, params, len(model.state_dims))


@pytest.mark.parametrize('gate', ['input', 'hidden'])
@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
def test_one_step_updates_probe_and_multiplier(toy_setup, gate, use_jit):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate=gate, warmup_steps=0, margin=0.0)
  probe, state = _state(model, frozen, batch, config)
  step = train.make_train_step(model, probe, config)
  if use_jit:
    step = jax.jit(step)
  before = jax.device_get(state)
  new_state, metrics = step(state, frozen, batch, jax.random.key(2))
  assert int(new_state.step) == 1
  layer = int(metrics['layer_index'])
  assert 0 <= layer < 3
  assert int(new_state.running_steps[layer]) == 1 and int(new_state.running_steps.sum()) == 1
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   before.params.fast, jax.device_get(new_state.params.fast))
  assert any(jax.tree_util.tree_leaves(changed)), 'no probe parameter moved'
  for name, value in metrics.items():
    assert np.isfinite(np.asarray(value)).all(), name
  # with margin 0 and a positive divergence the multiplier of that layer rises, the others stay
  multipliers = np.asarray(new_state.lagrange_multipliers)
  if float(metrics['divergence']) > 0:
    assert multipliers[layer] > 1.0
  others = np.delete(multipliers, layer)
  np.testing.assert_array_equal(others, 1.0)


def test_jit_and_nojit_agree(toy_setup):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate='hidden', warmup_steps=0)
  probe, state = _state(model, frozen, batch, config)
  step = train.make_train_step(model, probe, config)
  key = jax.random.key(3)
  eager_state, eager_metrics = step(state, frozen, batch, key)
  jit_state, jit_metrics = jax.jit(step)(state, frozen, batch, key)
  np.testing.assert_allclose(eager_metrics['loss'], jit_metrics['loss'], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         eager_state.params, jit_state.params)


def _run(model, frozen, batch, config, steps, initial_logit=5.0):
  probe, state = _state(model, frozen, batch, config, initial_logit)
  step = jax.jit(train.make_train_step(model, probe, config), donate_argnums=0)
  trace = []
  for i in range(steps):
    state, metrics = step(state, frozen, batch, jax.random.fold_in(jax.random.key(4), i))
    trace.append(float(state.lagrange_multipliers[1]))
  return state, np.array(trace)


def test_multiplier_rises_while_constraint_violated(toy_setup):
  model, frozen, batch = toy_setup
  # margin 0 with half-open gates: the masked output always differs, D - m > 0
  config = train.DiffMaskConfig(gate='hidden', margin=0.0, layers=(1,), warmup_steps=0,
                                dual_optimizer='sgd', multiplier_learning_rate=1.0)
  _, trace = _run(model, frozen, batch, config, 30, initial_logit=0.0)
  assert np.all(np.diff(trace) > 0), trace
  assert trace[-1] > 1.0


def test_multiplier_falls_to_zero_when_constraint_satisfied(toy_setup):
  model, frozen, batch = toy_setup
  # a margin no divergence can reach: D - m < 0, so lambda descends and is projected at 0
  config = train.DiffMaskConfig(gate='hidden', margin=100.0, layers=(1,), warmup_steps=0)
  state, trace = _run(model, frozen, batch, config, 40)
  assert trace[0] < 1.0
  assert np.all(np.diff(trace) <= 0)
  assert trace[-1] == 0.0
  assert np.all(np.asarray(state.multipliers.slow) >= 0)


def test_multiplier_is_capped(toy_setup):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate='hidden', margin=0.0, layers=(1,), warmup_steps=0,
                                dual_optimizer='sgd', multiplier_learning_rate=1e4,
                                multiplier_max=7.0)
  state, trace = _run(model, frozen, batch, config, 3, initial_logit=0.0)
  assert trace.max() == 7.0


class _NegInfModel:
  """A stand-in for extractive QA: outputs with -inf on padded positions."""
  state_dims = (4, 4)

  def forward(self, params, batch):
    h0 = batch['embeddings']
    return self._head(params, batch, h0), (h0, jnp.tanh(h0))

  def forward_from(self, params, batch, states, layer_index, intervention):
    h = jax.lax.switch(layer_index, (lambda s: intervention(0, s[0]), lambda s: intervention(1, s[1])),
                       states)
    return self._head(params, batch, h)

  def _head(self, params, batch, h):
    scores = jnp.einsum('bsd,d->bs', h, params)
    scores = jnp.where(batch['mask'], scores, -jnp.inf)
    return jnp.stack([scores, 2 * scores], axis=1)  # (batch, 2 heads, seq)


@pytest.mark.parametrize('gate', ['input', 'hidden'])
def test_no_nan_with_minus_inf_logits(gate):
  model = _NegInfModel()
  rng = np.random.default_rng(0)
  mask = np.ones((3, 6), bool)
  mask[0, 4:] = False
  mask[1, 1:] = False  # length-1 input
  batch = {'embeddings': jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32),
           'mask': jnp.asarray(mask)}
  frozen = jnp.ones((4,), jnp.float32)
  config = train.DiffMaskConfig(gate=gate, warmup_steps=0)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=4)
  params = train.init_probe_params(jax.random.key(0), model, probe, frozen, batch)
  state = train.init_state(config, params, 2)
  step = jax.jit(train.make_train_step(model, probe, config))
  for i in range(5):
    state, metrics = step(state, frozen, batch, jax.random.key(i))
    for name, value in metrics.items():
      assert np.isfinite(np.asarray(value)).all(), (name, value)
  for leaf in jax.tree_util.tree_leaves(state):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      assert np.isfinite(np.asarray(leaf)).all()


def test_layer_sampling_restricted_and_slowed():
  config = train.DiffMaskConfig(layers=(0, 2))
  state = train.DiffMaskState(
      step=jnp.zeros((), jnp.int32), params=None, opt_state=None, multipliers=None,
      multiplier_opt_state=None, running_agreement=jnp.array([0.9, 0.9, 0.9]),
      running_l0=jnp.array([0.05, 0.05, 0.5]), running_steps=jnp.array([200, 200, 200]))
  np.testing.assert_allclose(np.exp(train.layer_logits(state, config)), [1.0, 0.0, 1.0])
  slowed = dataclasses.replace(config, slow_converged_layers=True)
  # state 0 converged (agreement > .75, l0 < .1, > 100 steps), state 2 did not
  np.testing.assert_allclose(np.exp(train.layer_logits(state, slowed)), [0.1, 0.0, 1.0],
                             rtol=1e-6)
  young = state._replace(running_steps=jnp.array([50, 50, 50]))
  np.testing.assert_allclose(np.exp(train.layer_logits(young, slowed)), [1.0, 0.0, 1.0])


@pytest.mark.parametrize('overrides', [
    dict(gate='output'), dict(margin=-1.0), dict(divergence='l1'), dict(sparsity='l1'),
    dict(temperature=0.0), dict(stretch=(0.1, 1.0)), dict(multiplier_max=-1.0),
    dict(multiplier_init=300.0), dict(layers=()), dict(dual_optimizer='adam'),
    dict(divergence_tail=0.0), dict(divergence_tail=1.5),
    dict(probe_average_decay=-0.1), dict(probe_average_decay=1.0),
    dict(flip_penalty=-0.1), dict(flip_penalty=float('nan')), dict(flip_penalty=float('inf')),
    dict(flip_penalty=0.1, divergence='squared_error'),
])
def test_config_rejects_nonsense(overrides):
  with pytest.raises(ValueError):
    train.DiffMaskConfig(**overrides)


def test_layers_out_of_range_rejected():
  config = train.DiffMaskConfig(layers=(5,))
  with pytest.raises(ValueError, match='out of range'):
    train.init_state(config, {}, 3)


@pytest.mark.parametrize('gate', ['input', 'hidden'])
def test_cached_clean_pass_gives_the_same_step(toy_setup, gate):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate=gate, warmup_steps=0)
  probe, state = _state(model, frozen, batch, config)
  step = jax.jit(train.make_train_step(model, probe, config))
  outputs, states = model.forward(frozen, batch)
  cached = dict(batch, clean_outputs=outputs, clean_states=tuple(states))
  plain_state, plain_metrics = step(state, frozen, batch, jax.random.key(4))
  cached_state, cached_metrics = step(state, frozen, cached, jax.random.key(4))
  for got, want in zip(jax.tree_util.tree_leaves((cached_state, cached_metrics)),
                       jax.tree_util.tree_leaves((plain_state, plain_metrics))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='needs both'):
    step(state, frozen, dict(batch, clean_outputs=outputs), jax.random.key(4))


def test_given_layer_index_is_trained_instead_of_a_sampled_one(toy_setup):
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate='hidden', warmup_steps=0)
  probe, state = _state(model, frozen, batch, config)
  step = jax.jit(train.make_train_step(model, probe, config))
  key = jax.random.key(5)
  _, sampled = step(state, frozen, batch, key)
  for depth in range(len(model.state_dims)):  # one compiled program serves every depth
    new_state, metrics = step(state, frozen, batch, key, layer_index=jnp.int32(depth))
    assert int(metrics['layer_index']) == depth
    assert int(new_state.running_steps[depth]) == 1 and int(new_state.running_steps.sum()) == 1
  # the same key and the sampled depth given explicitly: the same step
  depth = int(sampled['layer_index'])
  _, given = step(state, frozen, batch, key, layer_index=jnp.int32(depth))
  for name in sampled:
    np.testing.assert_allclose(np.asarray(given[name]), np.asarray(sampled[name]), rtol=1e-6)


def _one_step_outputs(model, frozen, batch, probe, state, config, key, layer_index):
  """The clean and masked outputs of one step's gate sample, from the public pieces."""
  _, gate_key = jax.random.split(key)
  outputs, states = train.clean_pass(model, frozen, batch)
  vote_logits = probe.apply(state.params.fast, states)
  baselines = probe.apply(state.params.fast, method='baseline_vectors')
  gates, _ = probes.sample_gates(config.gate, gate_key, vote_logits, layer_index,
                                 relaxation=config.gate_relaxation())
  masked = train.masked_pass(model, frozen, batch, states, config.gate, gates, baselines,
                             layer_index)
  return outputs, masked


def _per_example_divergences(model, frozen, batch, probe, state, config, key, layer_index):
  """The divergences of one step's gate sample, example by example."""
  outputs, masked = _one_step_outputs(model, frozen, batch, probe, state, config, key,
                                      layer_index)
  return np.asarray(objective.output_divergence(config.divergence, outputs, masked), np.float64)


def _check_constrained_term(toy_setup, probe, state, config, key, layer_index, divergence,
                            constrained):
  """The gradient function reports ``divergence`` and ``constrained``, and the multiplier's
  gradient at ``layer_index`` is ``constrained - margin`` (0 elsewhere); the probe's is finite."""
  model, frozen, batch = toy_setup
  gradients = jax.jit(train.make_gradient_fn(model, probe, config))
  _, aux, probe_grads, multiplier_grads, _ = gradients(state, frozen, batch, key, None,
                                                       layer_index)
  np.testing.assert_allclose(aux['divergence'], divergence, rtol=1e-5)
  np.testing.assert_allclose(aux['constrained_divergence'], constrained, rtol=1e-5)
  expected = np.zeros(len(model.state_dims))
  expected[int(layer_index)] = constrained - config.margin
  np.testing.assert_allclose(multiplier_grads, expected, rtol=1e-5, atol=1e-8)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(probe_grads))


@pytest.mark.parametrize('gate', ['input', 'hidden'])
def test_divergence_tail_constrains_the_worst_examples(toy_setup, gate):
  """With ``divergence_tail`` the multiplier's gradient is the tail mean minus the margin."""
  model, frozen, batch = toy_setup
  key, layer_index, margin = jax.random.key(6), jnp.int32(1), 0.01
  mean_config = train.DiffMaskConfig(gate=gate, warmup_steps=0, margin=margin)
  tail_config = dataclasses.replace(mean_config, divergence_tail=0.25)
  probe, state = _state(model, frozen, batch, mean_config, initial_logit=0.0)
  divergences = _per_example_divergences(model, frozen, batch, probe, state, mean_config, key,
                                         layer_index)
  assert divergences.std() > 0.1 * divergences.mean() > 0  # a tail unlike the mean
  worst_quarter = np.sort(divergences)[::-1][:len(divergences) // 4].mean()

  for config, constrained in ((mean_config, divergences.mean()), (tail_config, worst_quarter)):
    _check_constrained_term(toy_setup, probe, state, config, key, layer_index,
                            divergences.mean(), constrained)


@pytest.mark.parametrize('gate', ['input', 'hidden'])
def test_flip_penalty_adds_the_flips_to_the_constrained_divergence(toy_setup, gate):
  """``constrained_divergence`` is mean(KL + w * argmax_flip); ``divergence`` stays the KL."""
  model, frozen, batch = toy_setup
  key, layer_index, margin, weight = jax.random.key(6), jnp.int32(1), 0.01, 0.3
  plain = train.DiffMaskConfig(gate=gate, warmup_steps=0, margin=margin)
  penalised = dataclasses.replace(plain, flip_penalty=weight)
  probe, state = _state(model, frozen, batch, plain, initial_logit=0.0)
  outputs, masked = _one_step_outputs(model, frozen, batch, probe, state, plain, key,
                                      layer_index)
  kl = np.asarray(objective.output_divergence('kl', outputs, masked), np.float64)
  flips = np.asarray(objective.argmax_flip(outputs, masked), np.float64)
  assert (flips > 0).any()  # some sampled masks flip, or the penalty is not exercised

  for config, constrained in ((plain, kl.mean()), (penalised, (kl + weight * flips).mean())):
    _check_constrained_term(toy_setup, probe, state, config, key, layer_index, kl.mean(),
                            constrained)


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
def test_probe_average_is_the_bias_corrected_moving_average_of_the_iterates(toy_setup, use_jit):
  """``averaged_params`` after T steps equals sum_t (1-d) d^(T-t) x_t / (1 - d^T), in float64."""
  model, frozen, batch = toy_setup
  decay, num_steps = 0.8, 6
  plain = train.DiffMaskConfig(gate='hidden', warmup_steps=0)
  averaged = dataclasses.replace(plain, probe_average_decay=decay)
  probe, state = _state(model, frozen, batch, plain)
  _, averaged_state = _state(model, frozen, batch, averaged)
  assert state.averaged_params is None
  step = train.make_train_step(model, probe, plain)
  averaged_step = train.make_train_step(model, probe, averaged)
  if use_jit:
    step, averaged_step = jax.jit(step), jax.jit(averaged_step)
  iterates = []
  for t in range(num_steps):
    key = jax.random.fold_in(jax.random.key(7), t)
    state, _ = step(state, frozen, batch, key)
    averaged_state, _ = averaged_step(averaged_state, frozen, batch, key)
    iterates.append(jax.device_get(state.params.fast))
  # averaging reads the iterates and never feeds back into training
  for ours, theirs in zip(jax.tree_util.tree_leaves(averaged_state.params),
                          jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)
  weights = np.array([(1 - decay) * decay ** (num_steps - 1 - t) for t in range(num_steps)])
  weights /= 1 - decay ** num_steps
  expected = jax.tree_util.tree_map(
      lambda *xs: np.tensordot(weights, np.stack([np.asarray(x, np.float64) for x in xs]), 1),
      *iterates)
  got = jax.device_get(averaged_state.probe_params)
  moved = False
  for got_leaf, want_leaf, last_leaf in zip(jax.tree_util.tree_leaves(got),
                                            jax.tree_util.tree_leaves(expected),
                                            jax.tree_util.tree_leaves(iterates[-1])):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
    moved |= bool(np.abs(want_leaf - last_leaf).max() > 1e-4)
  assert moved, 'the average equals the last iterate: the test would not see a wrong weighting'
  np.testing.assert_array_equal(np.asarray(jax.tree_util.tree_leaves(
      averaged_state.last_iterate_params)[0]), np.asarray(jax.tree_util.tree_leaves(
          averaged_state.params.fast)[0]))


def test_first_average_is_the_first_iterate_and_decay_zero_keeps_the_last():
  first = {'w': jnp.array([1.0, -2.0])}
  start = {'w': jnp.array([50.0, 50.0])}  # whatever the average held before is forgotten
  np.testing.assert_allclose(train.average_iterates(start, first, 1, 0.999)['w'], first['w'])
  np.testing.assert_allclose(train.average_iterates(start, first, 7, 0.0)['w'], first['w'])
  # step 2 at decay 0.5: weights (0.5 * 0.5, 0.5) / 0.75 on (x1, x2)
  second = {'w': jnp.array([4.0, 1.0])}
  np.testing.assert_allclose(train.average_iterates(first, second, 2, 0.5)['w'],
                             (0.25 * first['w'] + 0.5 * second['w']) / 0.75, rtol=1e-6,
                             atol=1e-6)


def test_averaged_run_resumes_bit_for_bit(toy_setup, tmp_path):
  """The average is part of the checkpoint: an interrupted run continues it exactly."""
  model, frozen, batch = toy_setup
  config = train.DiffMaskConfig(gate='hidden', warmup_steps=2, probe_average_decay=0.9)
  probe, state = _state(model, frozen, batch, config)

  def fit(batches, folder):
    return train.fit(model, frozen, probe, config, jax.tree_util.tree_map(jnp.array, state),
                     batches, 4, jax.random.key(2), progress=False, checkpoint_dir=folder,
                     checkpoint_every=2)

  reference, _ = fit(itertools.repeat(batch), tmp_path / 'reference')
  with pytest.raises(ValueError, match='ran out'):  # dies after the checkpoint of step 2
    fit(iter([batch] * 3), tmp_path / 'interrupted')
  resumed, _ = fit(itertools.repeat(batch), tmp_path / 'interrupted')
  assert resumed.averaged_params is not None
  for ours, theirs in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
