"""Tests for dmx.probes: probe outputs and parameters, gate sampling, baselines."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from dmx import hard_concrete, probes

STATE_DIMS = (5, 3, 4)
BATCH, SEQ = 2, 4
TEMPERATURE, STRETCH = 0.2, (-0.2, 1.0)
GATES = ['input', 'hidden']
FORMS = ['mlp', 'bilinear']


def make_states(seed=0, dims=STATE_DIMS, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(BATCH, SEQ, dim)), dtype) for dim in dims]


@functools.lru_cache(maxsize=None)
def probe_and_params(gate, form):
  probe = probes.DiffMaskProbe(gate=gate, state_dims=STATE_DIMS, form=form, hidden_size=6)
  params = probe.init(jax.random.key(0), make_states())
  # non-zero baselines so that tests can tell them apart
  rng = np.random.default_rng(1)
  inner = dict(params['params'])
  for name in [n for n in inner if n.startswith('baseline_')]:
    inner[name] = jnp.asarray(rng.normal(size=inner[name].shape), jnp.float32)
  return probe, {**params, 'params': inner}


def numpy_log_prob_nonzero(logits):
  """``log P(z != 0) = log sigmoid(a - T log(-low / high))`` in float64."""
  low, high = STRETCH
  return np.log(special.expit(np.asarray(logits, np.float64)
                              - TEMPERATURE * np.log(-low / high)))


# ----------------------------------------------------------------------------
# DiffMaskProbe
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_probe_returns_float32_vote_logits_per_state(gate, form, dtype):
  probe, params = probe_and_params(gate, form)
  logits = probe.apply(params, make_states(dtype=dtype))
  assert logits.shape == (len(STATE_DIMS), BATCH, SEQ)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('form', FORMS)
def test_probe_reads_bfloat16_states_as_their_float32_values(gate, form):
  probe, params = probe_and_params(gate, form)
  low_precision = make_states(dtype=jnp.bfloat16)
  upcast = [state.astype(jnp.float32) for state in low_precision]
  np.testing.assert_allclose(probe.apply(params, low_precision), probe.apply(params, upcast),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('form', FORMS)
def test_probe_parameter_tree_has_one_vote_per_state_and_gate_baselines(gate, form):
  probe, _ = probe_and_params(gate, form)
  params = probe.init(jax.random.key(3), make_states())['params']
  baselines = sorted(name for name in params if name.startswith('baseline_'))
  votes = sorted(name for name in params if name.startswith('vote_'))
  assert votes == [f'vote_{k}' for k in range(len(STATE_DIMS))]
  if gate == 'input':
    assert baselines == ['baseline_0']
  else:
    assert baselines == [f'baseline_{k}' for k in range(len(STATE_DIMS))]
  for name in baselines:
    k = int(name.split('_')[1])
    assert params[name].shape == (STATE_DIMS[k],)
    assert params[name].dtype == jnp.float32
    np.testing.assert_array_equal(params[name], 0.0)
  vectors = probe.apply({'params': params}, method=probe.baseline_vectors)
  assert [v.shape for v in vectors] == [(STATE_DIMS[k],) for k in range(len(baselines))]


@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('form', FORMS)
def test_probe_votes_are_per_token(gate, form):
  """Changing one token's states changes only that token's votes."""
  probe, params = probe_and_params(gate, form)
  states = make_states()
  perturbed = [state.at[:, 2].add(1.5) for state in states]
  before, after = probe.apply(params, states), probe.apply(params, perturbed)
  others = [0, 1, 3]
  np.testing.assert_allclose(after[:, :, others], before[:, :, others], rtol=1e-6, atol=1e-6)
  assert not np.allclose(after[:, :, 2], before[:, :, 2])


@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('form', FORMS)
def test_probe_vote_does_not_read_later_states(gate, form):
  probe, params = probe_and_params(gate, form)
  states = make_states()
  before = probe.apply(params, states)
  for changed in range(1, len(STATE_DIMS)):
    perturbed = list(states)
    perturbed[changed] = states[changed] + 1.0
    after = probe.apply(params, perturbed)
    np.testing.assert_allclose(after[:changed], before[:changed], rtol=1e-6, atol=1e-6)
    assert not np.allclose(after[changed], before[changed])
    if gate == 'hidden':  # a hidden gate's vote reads its own state only
      np.testing.assert_allclose(after[changed + 1:], before[changed + 1:], rtol=1e-6,
                                 atol=1e-6)


@pytest.mark.parametrize('gate', GATES)
def test_bilinear_vote_matches_numpy_reference(gate):
  """Appendix A: ``a^T W1 h + W2 [a; h] + b``, input-gate logits averaged by eq. 9."""
  probe, params = probe_and_params(gate, 'bilinear')
  states = [np.asarray(state, np.float64) for state in make_states(seed=5)]
  expected = []
  for k, state in enumerate(states):
    vote = jax.tree.map(lambda x: np.asarray(x, np.float64), params['params'][f'vote_{k}'])
    anchor = states[0] if gate == 'input' else state
    bilinear = np.einsum('bsi,ij,bsj->bs', anchor, vote['bilinear'], state)
    features = np.concatenate([anchor, state], axis=-1)
    linear = features @ vote['linear']['kernel'][:, 0] + vote['linear']['bias'][0]
    expected.append(bilinear + linear)
  expected = np.stack(expected)
  if gate == 'input':
    averaged = expected.copy()
    for layer in range(1, len(states)):
      averaged[layer] = 0.5 * (expected[layer] + expected[:layer].mean(axis=0))
    expected = averaged
  logits = probe.apply(params, [jnp.asarray(s, jnp.float32) for s in states])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Weight normalisation (the original's MLP vote)
# ----------------------------------------------------------------------------

def weight_norm_layer_and_params(seed=0, d_in=5, features=3):
  """A WeightNormDense whose scale and bias are moved off their initial values."""
  layer = probes.WeightNormDense(features)
  params = layer.init(jax.random.key(seed), jnp.zeros((1, d_in)))['params']
  rng = np.random.default_rng(seed + 10)
  params = {'direction': params['direction'],
            'scale': jnp.asarray(rng.uniform(0.5, 2.0, size=features), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=features), jnp.float32)}
  return layer, params


def test_weight_norm_dense_matches_numpy_reference(jit_or_not):
  layer, params = weight_norm_layer_and_params()
  inputs = np.random.default_rng(2).normal(size=(2, 4, 5))
  direction, scale, bias = (np.asarray(params[name], np.float64)
                            for name in ('direction', 'scale', 'bias'))
  kernel = direction / np.linalg.norm(direction, axis=0, keepdims=True) * scale
  expected = inputs @ kernel + bias
  apply = jit_or_not(lambda p, x: layer.apply({'params': p}, x))
  np.testing.assert_allclose(apply(params, jnp.asarray(inputs, jnp.float32)), expected,
                             rtol=1e-5, atol=1e-5)


def test_weight_norm_dense_starts_as_a_plain_dense_layer_with_kernel_direction():
  layer = probes.WeightNormDense(3)
  params = layer.init(jax.random.key(4), jnp.zeros((1, 5)))['params']
  np.testing.assert_allclose(params['scale'], np.linalg.norm(params['direction'], axis=0),
                             rtol=1e-6)
  inputs = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
  np.testing.assert_allclose(layer.apply({'params': params}, inputs),
                             inputs @ np.asarray(params['direction']), rtol=1e-5, atol=1e-5)


def test_weight_norm_dense_matches_torch_weight_norm_values_and_gradients():
  torch = pytest.importorskip('torch')
  layer, params = weight_norm_layer_and_params(seed=1)
  inputs = np.random.default_rng(5).normal(size=(4, 5))
  weights = np.random.default_rng(6).normal(size=(4, 3))

  def loss(p, x):
    return jnp.sum(jnp.tanh(layer.apply({'params': p}, x)) * weights)

  value, grads = jax.value_and_grad(loss)(params, jnp.asarray(inputs, jnp.float32))
  linear = torch.nn.Linear(5, 3).double()
  with torch.no_grad():
    linear.bias.copy_(torch.tensor(np.asarray(params['bias'], np.float64)))
  # torch keeps (out, in) weights with g of shape (out, 1): the transposes of dmx's
  linear = torch.nn.utils.parametrizations.weight_norm(linear, dim=0)
  with torch.no_grad():
    linear.parametrizations.weight.original0.copy_(
        torch.tensor(np.asarray(params['scale'], np.float64)[:, None]))
    linear.parametrizations.weight.original1.copy_(
        torch.tensor(np.asarray(params['direction'], np.float64).T))
  torch_loss = (torch.tanh(linear(torch.tensor(inputs))) * torch.tensor(weights)).sum()
  torch_loss.backward()
  np.testing.assert_allclose(value, torch_loss.item(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads['scale'],
                             linear.parametrizations.weight.original0.grad.numpy()[:, 0],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads['direction'],
                             linear.parametrizations.weight.original1.grad.numpy().T,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads['bias'], linear.bias.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_weight_norm_direction_gradient_is_orthogonal_to_the_direction():
  """Only the direction's angle is learned through ``direction``; its length cancels."""
  layer, params = weight_norm_layer_and_params(seed=2)
  inputs = jnp.asarray(np.random.default_rng(7).normal(size=(8, 5)), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply({'params': p}, inputs))))(params)
  radial = np.sum(np.asarray(grads['direction']) * np.asarray(params['direction']), axis=0)
  assert np.abs(grads['direction']).max() > 1e-3
  np.testing.assert_allclose(radial, 0.0, atol=1e-5)


@pytest.mark.parametrize('gate', GATES)
def test_weight_normed_mlp_vote_matches_numpy_reference(gate):
  """``10 tanh(wn_out(tanh(wn_hidden([a; h])))) + bias`` at every depth."""
  probe = probes.DiffMaskProbe(gate=gate, state_dims=STATE_DIMS, hidden_size=6, weight_norm=True)
  states = make_states(seed=8)
  params = probe.init(jax.random.key(1), states)
  params = jax.tree.map(lambda x: x * 1.5 if x.ndim == 1 else x, params)  # scales off init

  def dense(layer, features):
    layer = jax.tree.map(lambda x: np.asarray(x, np.float64), layer)
    direction = layer['direction']
    kernel = direction / np.linalg.norm(direction, axis=0, keepdims=True) * layer['scale']
    return features @ kernel + layer['bias']

  expected = []
  for k, state in enumerate(np.asarray(s, np.float64) for s in states):
    vote = params['params'][f'vote_{k}']
    # an input gate's vote reads [h0; h_k], except at depth 0 where it reads h0 once
    features = state if gate == 'hidden' or k == 0 else np.concatenate(
        [np.asarray(states[0], np.float64), state], axis=-1)
    hidden = np.tanh(dense(vote['hidden'], features))
    expected.append(10.0 * np.tanh(dense(vote['out'], hidden)[..., 0])
                    + float(vote['bias']))
  np.testing.assert_allclose(probe.apply(params, states), np.stack(expected),
                             rtol=1e-4, atol=1e-4)


def test_weight_norm_is_refused_for_the_bilinear_vote():
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=STATE_DIMS, form='bilinear',
                               weight_norm=True)
  with pytest.raises(ValueError, match='weight normalisation'):
    probe.init(jax.random.key(0), make_states())


def test_probe_rejects_wrong_number_of_states():
  probe, params = probe_and_params('hidden', 'mlp')
  with pytest.raises(ValueError):
    probe.apply(params, make_states()[:2])


@pytest.mark.parametrize('gate, form', [('output', 'mlp'), ('input', 'attention'),
                                        ('hidden', 'linear')])
def test_probe_rejects_bad_gate_or_form_at_init(gate, form):
  probe = probes.DiffMaskProbe(gate=gate, state_dims=STATE_DIMS, form=form)
  with pytest.raises(ValueError):
    probe.init(jax.random.key(0), make_states())


# ----------------------------------------------------------------------------
# PerExampleProbe
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('gate', GATES)
def test_per_example_probe_shapes_and_initial_logits(gate):
  probe = probes.PerExampleProbe(gate=gate, state_dims=STATE_DIMS, num_examples=BATCH,
                                 max_length=7)
  params = probe.init(jax.random.key(0), make_states())
  assert params['params']['free_logits'].shape == (len(STATE_DIMS), BATCH, 7)
  logits = probe.apply(params, make_states())
  assert logits.shape == (len(STATE_DIMS), BATCH, SEQ)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 3.0)
  baselines = sorted(name for name in params['params'] if name.startswith('baseline_'))
  expected = ['baseline_0'] if gate == 'input' else [f'baseline_{k}' for k in range(3)]
  assert baselines == expected
  vectors = probe.apply(params, method=probe.baseline_vectors)
  assert [v.shape for v in vectors] == [(STATE_DIMS[k],) for k in range(len(expected))]


def test_per_example_probe_returns_its_free_logits():
  probe = probes.PerExampleProbe(gate='hidden', state_dims=STATE_DIMS, num_examples=BATCH,
                                 max_length=6, initial_logit=-1.5)
  params = probe.init(jax.random.key(0), make_states())
  np.testing.assert_array_equal(params['params']['free_logits'], -1.5)
  free = jnp.arange(3 * BATCH * 6, dtype=jnp.float32).reshape(3, BATCH, 6)
  params = {'params': {**params['params'], 'free_logits': free}}
  np.testing.assert_array_equal(probe.apply(params, make_states()), free[:, :, :SEQ])


def test_per_example_probe_rejects_bad_gate():
  probe = probes.PerExampleProbe(gate='both', state_dims=STATE_DIMS, num_examples=2,
                                 max_length=4)
  with pytest.raises(ValueError):
    probe.init(jax.random.key(0), make_states())


# ----------------------------------------------------------------------------
# average_with_earlier_layers and gate_log_keep_probs
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('num_states', [1, 2, 5])
def test_average_with_earlier_layers_matches_eq9_loop(num_states):
  rng = np.random.default_rng(num_states)
  raw = rng.normal(size=(num_states, 2, 3))
  expected = np.empty_like(raw)
  for layer in range(num_states):
    if layer == 0:
      expected[layer] = raw[0]
    else:
      earlier_mean = sum(raw[k] for k in range(layer)) / layer
      expected[layer] = (raw[layer] + earlier_mean) / 2
  result = probes.average_with_earlier_layers(jnp.asarray(raw, jnp.float32))
  np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_gate_log_keep_probs_adds_votes_for_input_gates():
  logits = np.random.default_rng(2).normal(0.0, 2.0, (3, BATCH, SEQ)).astype(np.float32)
  per_vote = numpy_log_prob_nonzero(logits)
  input_gates = probes.gate_log_keep_probs('input', jnp.asarray(logits),
                                           temperature=TEMPERATURE, stretch=STRETCH)
  hidden_gates = probes.gate_log_keep_probs('hidden', jnp.asarray(logits),
                                            temperature=TEMPERATURE, stretch=STRETCH)
  np.testing.assert_allclose(input_gates, np.cumsum(per_vote, axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hidden_gates, per_vote, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# sample_gates
# ----------------------------------------------------------------------------

def _vote_logits():
  return jnp.asarray(np.random.default_rng(4).normal(1.0, 2.0, (3, BATCH, SEQ)), jnp.float32)


@pytest.mark.parametrize('gate', GATES)
def test_sample_gates_combines_votes_up_to_layer(jit_or_not, gate):
  key = jax.random.key(9)
  logits = _vote_logits()
  votes = np.asarray(hard_concrete.sample(key, logits, temperature=TEMPERATURE,
                                          stretch=STRETCH), np.float64)
  assert np.any(votes == 0.0) and np.any((votes > 0.0) & (votes < 1.0))
  log_votes = numpy_log_prob_nonzero(logits)
  sample = jit_or_not(lambda layer: probes.sample_gates(
      gate, key, logits, layer, temperature=TEMPERATURE, stretch=STRETCH))
  for layer in range(3):
    gates, log_keep = sample(jnp.asarray(layer, jnp.int32))
    assert gates.shape == (BATCH, SEQ) and gates.dtype == jnp.float32
    assert log_keep.shape == (BATCH, SEQ)
    if gate == 'input':
      expected_gates = np.prod(votes[:layer + 1], axis=0)
      expected_log_keep = log_votes[:layer + 1].sum(axis=0)
    else:
      expected_gates, expected_log_keep = votes[layer], log_votes[layer]
    np.testing.assert_allclose(gates, expected_gates, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(log_keep, expected_log_keep, rtol=1e-5, atol=1e-6)
    assert np.all((np.asarray(gates) >= 0.0) & (np.asarray(gates) <= 1.0))


def test_sample_gates_accepts_python_int_layer():
  key = jax.random.key(1)
  logits = _vote_logits()
  from_int = probes.sample_gates('input', key, logits, 2, temperature=TEMPERATURE,
                                 stretch=STRETCH)
  from_array = probes.sample_gates('input', key, logits, jnp.asarray(2), temperature=TEMPERATURE,
                                   stretch=STRETCH)
  for a, b in zip(from_int, from_array):
    np.testing.assert_array_equal(a, b)


def test_sample_gates_input_gate_is_closed_once_any_vote_is_closed():
  key = jax.random.key(2)
  logits = _vote_logits().at[1, 0, :].set(-1e4)  # vote 1 closes every token of example 0
  for layer in range(3):
    gates, log_keep = probes.sample_gates('input', key, logits, layer,
                                          temperature=TEMPERATURE, stretch=STRETCH)
    if layer >= 1:
      np.testing.assert_array_equal(gates[0], 0.0)
      assert np.all(np.asarray(log_keep[0]) < -1e3)
    hidden, _ = probes.sample_gates('hidden', key, logits, layer, temperature=TEMPERATURE,
                                    stretch=STRETCH)
    if layer == 2:
      assert np.any(np.asarray(hidden[0]) > 0.0)


# ----------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------

def test_replace_with_baseline_exact_at_zero_and_one():
  rng = np.random.default_rng(6)
  state = jnp.asarray(rng.normal(size=(BATCH, SEQ, 5)), jnp.float32)
  baseline = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  np.testing.assert_array_equal(
      probes.replace_with_baseline(state, jnp.zeros((BATCH, SEQ)), baseline),
      np.broadcast_to(baseline, state.shape))
  np.testing.assert_array_equal(
      probes.replace_with_baseline(state, jnp.ones((BATCH, SEQ)), baseline), state)
  gates = jnp.asarray(rng.uniform(size=(BATCH, SEQ)), jnp.float32)
  mixed = probes.replace_with_baseline(state, gates, baseline)
  expected = (np.asarray(gates, np.float64)[..., None] * np.asarray(state, np.float64)
              + (1 - np.asarray(gates, np.float64)[..., None]) * np.asarray(baseline))
  np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6)


def test_replace_with_baseline_keeps_bfloat16_and_exact_endpoints():
  rng = np.random.default_rng(7)
  state = jnp.asarray(rng.normal(size=(BATCH, SEQ, 3)), jnp.bfloat16)
  baseline = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  gates = jnp.asarray([[0.0, 1.0, 0.0, 1.0], [1.0, 0.5, 0.0, 1.0]], jnp.float32)
  mixed = probes.replace_with_baseline(state, gates, baseline)
  assert mixed.dtype == jnp.bfloat16 and mixed.shape == state.shape
  mixed, state_np = np.asarray(mixed), np.asarray(state)
  closed, open_ = np.asarray(gates) == 0.0, np.asarray(gates) == 1.0
  np.testing.assert_array_equal(mixed[open_], state_np[open_])
  np.testing.assert_array_equal(
      mixed[closed], np.broadcast_to(np.asarray(baseline.astype(jnp.bfloat16)),
                                     (closed.sum(), 3)))
  half = 0.5 * state_np[1, 1].astype(np.float64) + 0.5 * np.asarray(baseline, np.float64)
  np.testing.assert_allclose(mixed[1, 1].astype(np.float64), half, rtol=1e-2)


def test_replace_with_baseline_rounds_bfloat16_only_once():
  """The mix is computed in float32 and rounded to bfloat16 once, so every
  output is within half a bfloat16 ulp of the exact mix, even for fractional
  gates that bfloat16 itself cannot represent."""
  rng = np.random.default_rng(8)
  state = jnp.asarray(rng.normal(size=(BATCH, 64, 8)), jnp.bfloat16)
  baseline = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  gates = jnp.asarray(rng.uniform(size=(BATCH, 64)), jnp.float32)
  mixed = np.asarray(probes.replace_with_baseline(state, gates, baseline), np.float64)
  g = np.asarray(gates, np.float64)[..., None]
  exact = g * np.asarray(state, np.float64) + (1 - g) * np.asarray(baseline, np.float64)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
  assert np.all(np.abs(mixed - exact) <= 0.5 * ulp * (1 + 1e-3) + 1e-30)


def test_select_baseline_with_int_and_traced_index(jit_or_not):
  baselines = tuple(jnp.full((4,), float(k)) for k in range(3))
  assert probes.select_baseline(baselines, 2) is baselines[2]
  select = jit_or_not(lambda index: probes.select_baseline(baselines, index))
  for k in range(3):
    np.testing.assert_array_equal(select(jnp.asarray(k)), baselines[k])


def test_select_baseline_rejects_traced_index_with_mixed_widths():
  baselines = tuple(jnp.zeros((dim,)) for dim in STATE_DIMS)
  np.testing.assert_array_equal(probes.select_baseline(baselines, 1), jnp.zeros((3,)))
  with pytest.raises(ValueError, match='traced layer index'):
    jax.jit(lambda index: probes.select_baseline(baselines, index))(jnp.asarray(1))


@pytest.mark.parametrize('gate', GATES)
def test_set_baseline_replaces_one_vector(gate):
  probe, params = probe_and_params(gate, 'mlp')
  layer = 0 if gate == 'input' else 2
  vector = jnp.arange(STATE_DIMS[layer], dtype=jnp.float32) + 0.5
  updated = probes.set_baseline(params, vector, layer)
  np.testing.assert_array_equal(updated['params'][f'baseline_{layer}'], vector)
  assert updated['params'][f'baseline_{layer}'].dtype == jnp.float32
  # other leaves are untouched, and the input params were not mutated
  for name, value in params['params'].items():
    if name != f'baseline_{layer}':
      assert updated['params'][name] is value
  assert not np.array_equal(params['params'][f'baseline_{layer}'], vector)
  vectors = probe.apply(updated, method=probe.baseline_vectors)
  np.testing.assert_array_equal(vectors[layer], vector)


def test_set_baseline_rejects_wrong_shape_or_missing_state():
  _, input_params = probe_and_params('input', 'mlp')
  _, hidden_params = probe_and_params('hidden', 'mlp')
  with pytest.raises(ValueError, match='shape'):
    probes.set_baseline(input_params, jnp.zeros((4,)), 0)
  with pytest.raises(ValueError, match='shape'):
    probes.set_baseline(hidden_params, jnp.zeros((5,)), 1)
  with pytest.raises(ValueError, match='no baseline'):
    probes.set_baseline(input_params, jnp.zeros((3,)), 1)
  with pytest.raises(ValueError, match='no baseline'):
    probes.set_baseline(hidden_params, jnp.zeros((3,)), 3)
