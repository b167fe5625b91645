"""Tests for dmx.optim against a numpy float64 re-implementation of torch's RMSprop.

torch.optim.RMSprop (no momentum, no weight decay), for each step::

    square_avg = alpha * square_avg + (1 - alpha) * g^2
    centered:  grad_avg = alpha * grad_avg + (1 - alpha) * g
               avg = sqrt(square_avg - grad_avg^2) + eps
    else:      avg = sqrt(square_avg) + eps
    param -= lr * g / avg

and Lookahead (Zhang et al., 2019): every ``k`` fast steps,
``slow += alpha * (fast - slow)`` and ``fast = slow``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmx import optim


class NumpyRmsprop:
  """torch.optim.RMSprop for one array, in float64."""

  def __init__(self, shape, *, decay, eps, centered):
    self.decay, self.eps, self.centered = decay, eps, centered
    self.square_avg = np.zeros(shape)
    self.grad_avg = np.zeros(shape)

  def step(self, gradient, learning_rate):
    """Returns the parameter increment ``-lr * g / avg``."""
    gradient = np.asarray(gradient, np.float64)
    self.square_avg = self.decay * self.square_avg + (1 - self.decay) * gradient ** 2
    if self.centered:
      self.grad_avg = self.decay * self.grad_avg + (1 - self.decay) * gradient
      avg = np.sqrt(self.square_avg - self.grad_avg ** 2) + self.eps
    else:
      avg = np.sqrt(self.square_avg) + self.eps
    return -learning_rate * gradient / avg


def probe_like_params():
  rng = np.random.default_rng(0)
  return {'params': {
      'vote_0': {'hidden': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                            'bias': jnp.zeros((2,), jnp.float32)},
                 'out': {'kernel': jnp.asarray(rng.normal(size=(2, 1)), jnp.float32)}},
      'baseline_0': jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      'baseline_1': jnp.asarray(rng.normal(size=(2,)), jnp.float32),
  }}


def random_gradients(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(size=leaf.shape), jnp.float32) for leaf in leaves])


def path_names(params):
  """``{'/'.join(keys): leaf}`` so trees can be compared leaf by leaf in numpy."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf, np.float64)
          for path, leaf in flat}


# ----------------------------------------------------------------------------
# torch_rmsprop
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('centered', [True, False], ids=['centered', 'plain'])
@pytest.mark.parametrize('decay', [0.99, 0.9])
def test_torch_rmsprop_matches_numpy_reference(jit_or_not, centered, decay):
  learning_rate, eps = 0.01, 1e-8
  optimizer = optim.torch_rmsprop(learning_rate, decay=decay, eps=eps, centered=centered)
  rng = np.random.default_rng(1)
  params = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  references = {name: NumpyRmsprop(value.shape, decay=decay, eps=eps, centered=centered)
                for name, value in params.items()}
  expected = {name: np.asarray(value, np.float64) for name, value in params.items()}
  state = optimizer.init(params)
  update = jit_or_not(optimizer.update)
  for step in range(10):
    # a common offset makes the centered and plain variants differ
    grads = {name: jnp.asarray(rng.normal(0.5, 1.0, size=value.shape), jnp.float32)
             for name, value in params.items()}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name in params:
      expected[name] = expected[name] + references[name].step(grads[name], learning_rate)
      np.testing.assert_allclose(params[name], expected[name], rtol=1e-4, atol=1e-5,
                                 err_msg=f'{name} at step {step}')


def test_torch_rmsprop_puts_eps_outside_the_square_root():
  """A gradient far below eps tells ``sqrt(v) + eps`` from ``sqrt(v + eps)``."""
  optimizer = optim.torch_rmsprop(1.0, decay=0.5, eps=1e-3, centered=False)
  params = jnp.zeros((1,))
  state = optimizer.init(params)
  updates, state = optimizer.update(jnp.asarray([1e-4]), state, params)
  # sqrt(0.5 * 1e-8) + 1e-3 outside the root, vs sqrt(0.5e-8 + 1e-3) inside it
  expected = -1e-4 / (np.sqrt(0.5 * 1e-8) + 1e-3)
  np.testing.assert_allclose(updates, [expected], rtol=1e-5)


# ----------------------------------------------------------------------------
# baseline_labels and primal_optimizer
# ----------------------------------------------------------------------------

def test_baseline_labels_marks_baseline_paths_only():
  params = {'params': {
      'baseline_0': jnp.zeros(3),
      'baseline_12': jnp.zeros(2),
      'baseline_3': {'nested': jnp.zeros(1)},
      'baseline': jnp.zeros(1),
      'not_baseline_0': jnp.zeros(1),
      'vote_0': {'hidden': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}},
  }}
  labels = optim.baseline_labels(params)['params']
  assert labels['baseline_0'] == 'baseline'
  assert labels['baseline_12'] == 'baseline'
  assert labels['baseline_3'] == {'nested': 'baseline'}
  assert labels['baseline'] == 'probe'
  assert labels['not_baseline_0'] == 'probe'
  assert labels['vote_0'] == {'hidden': {'kernel': 'probe', 'bias': 'probe'}}


def _run_primal(optimizer, params, num_steps, jit_or_not=lambda f: f):
  lookahead = optax.LookaheadParams.init_synced(params)
  state = optimizer.init(lookahead)
  update = jit_or_not(optimizer.update)
  history = []
  for step in range(num_steps):
    grads = random_gradients(params, seed=100 + step)
    updates, state = update(grads, state, lookahead)
    lookahead = optax.apply_updates(lookahead, updates)
    history.append((grads, lookahead))
  return history


def test_primal_optimizer_uses_group_learning_rates(jit_or_not):
  probe_rate, baseline_rate = 3e-3, 2e-2
  optimizer = optim.primal_optimizer(probe_learning_rate=probe_rate,
                                     baseline_learning_rate=baseline_rate, warmup_steps=0,
                                     sync_period=1000)
  params = probe_like_params()
  history = _run_primal(optimizer, params, 6, jit_or_not)
  expected = path_names(params)
  references = {name: NumpyRmsprop(value.shape, decay=0.99, eps=1e-8, centered=True)
                for name, value in expected.items()}
  for step, (grads, lookahead) in enumerate(history):
    grads = path_names(grads)
    fast = path_names(lookahead.fast)
    for name in expected:
      rate = baseline_rate if '/baseline_' in name else probe_rate
      expected[name] = expected[name] + references[name].step(grads[name], rate)
      np.testing.assert_allclose(fast[name], expected[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} at step {step}')
    # no sync yet: the slow weights have not moved
    for name, value in path_names(lookahead.slow).items():
      np.testing.assert_array_equal(value, path_names(params)[name])


def test_primal_optimizer_warms_up_linearly_from_zero():
  probe_rate, baseline_rate, warmup = 1e-2, 5e-2, 4
  optimizer = optim.primal_optimizer(probe_learning_rate=probe_rate,
                                     baseline_learning_rate=baseline_rate,
                                     warmup_steps=warmup, sync_period=1000)
  params = probe_like_params()
  history = _run_primal(optimizer, params, 7)
  # the first update is exactly zero: the learning rate starts at 0
  for name, value in path_names(history[0][1].fast).items():
    np.testing.assert_array_equal(value, path_names(params)[name], err_msg=name)
  expected = path_names(params)
  references = {name: NumpyRmsprop(value.shape, decay=0.99, eps=1e-8, centered=True)
                for name, value in expected.items()}
  for step, (grads, lookahead) in enumerate(history):
    grads = path_names(grads)
    fast = path_names(lookahead.fast)
    for name in expected:
      peak = baseline_rate if '/baseline_' in name else probe_rate
      rate = peak * min(step / warmup, 1.0)
      expected[name] = expected[name] + references[name].step(grads[name], rate)
      np.testing.assert_allclose(fast[name], expected[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} at step {step}')


@pytest.mark.parametrize('sync_period, slow_step_size', [(3, 0.5), (2, 0.25)])
def test_primal_optimizer_lookahead_syncs_every_period(sync_period, slow_step_size):
  rate = 1e-2
  optimizer = optim.primal_optimizer(probe_learning_rate=rate, baseline_learning_rate=rate,
                                     warmup_steps=0, sync_period=sync_period,
                                     slow_step_size=slow_step_size)
  params = probe_like_params()
  history = _run_primal(optimizer, params, 3 * sync_period + 1)
  fast = path_names(params)
  slow = path_names(params)
  references = {name: NumpyRmsprop(value.shape, decay=0.99, eps=1e-8, centered=True)
                for name, value in fast.items()}
  previous_slow = path_names(params)
  for step, (grads, lookahead) in enumerate(history, start=1):
    grads = path_names(grads)
    for name in fast:
      fast[name] = fast[name] + references[name].step(grads[name], rate)
    synced = step % sync_period == 0
    if synced:
      for name in fast:
        slow[name] = slow[name] + slow_step_size * (fast[name] - slow[name])
        fast[name] = slow[name].copy()
    got_fast, got_slow = path_names(lookahead.fast), path_names(lookahead.slow)
    for name in fast:
      np.testing.assert_allclose(got_fast[name], fast[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'fast {name} at step {step}')
      np.testing.assert_allclose(got_slow[name], slow[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'slow {name} at step {step}')
      if synced:
        # equal up to float32 rounding: optax applies the sync as an increment
        np.testing.assert_allclose(got_fast[name], got_slow[name], rtol=1e-6, atol=1e-7)
        assert not np.array_equal(got_slow[name], previous_slow[name]), (name, step)
      else:
        np.testing.assert_array_equal(got_slow[name], previous_slow[name])
    previous_slow = got_slow


# ----------------------------------------------------------------------------
# dual_optimizer and project_multipliers
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['lookahead_rmsprop', 'sgd'])
def test_dual_optimizer_ascends(jit_or_not, kind):
  optimizer = optim.dual_optimizer(kind, learning_rate=0.3)
  multipliers = optax.LookaheadParams.init_synced(jnp.asarray([1.0, 1.0, 1.0]))
  state = optimizer.init(multipliers)
  gradient = jnp.asarray([0.5, -0.25, 2.0])
  updates, state = jit_or_not(optimizer.update)(gradient, state, multipliers)
  multipliers = optax.apply_updates(multipliers, updates)
  fast = np.asarray(multipliers.fast)
  assert fast[0] > 1.0 and fast[2] > 1.0 and fast[1] < 1.0
  if kind == 'sgd':
    expected = 1.0 + 0.3 * np.asarray(gradient, np.float64)
    np.testing.assert_allclose(fast, expected, rtol=1e-6)
    # sgd is a plain step: slow weights follow the fast ones at once
    np.testing.assert_allclose(multipliers.slow, expected, rtol=1e-6)
  else:
    # first torch RMSprop step on -g: lambda + lr * g / (sqrt(0.01 g^2) + eps)
    reference = NumpyRmsprop((3,), decay=0.99, eps=1e-8, centered=False)
    expected = 1.0 - reference.step(np.asarray(gradient), 0.3)
    np.testing.assert_allclose(fast, expected, rtol=1e-5)
    np.testing.assert_array_equal(multipliers.slow, [1.0, 1.0, 1.0])


@pytest.mark.parametrize('kind', ['lookahead_rmsprop', 'sgd'])
def test_dual_optimizer_keeps_increasing_under_constant_violation(kind):
  optimizer = optim.dual_optimizer(kind, learning_rate=0.1)
  multipliers = optax.LookaheadParams.init_synced(jnp.zeros((2,)))
  state = optimizer.init(multipliers)
  slow_values = [np.asarray(multipliers.slow)]
  for _ in range(12):
    updates, state = optimizer.update(jnp.asarray([1.0, 0.2]), state, multipliers)
    multipliers = optax.apply_updates(multipliers, updates)
    slow_values.append(np.asarray(multipliers.slow))
  assert np.all(np.asarray(multipliers.fast) > 0.0)
  assert np.all(slow_values[-1] > slow_values[0])
  assert np.all(np.diff(np.stack(slow_values), axis=0) >= 0.0)


def test_dual_optimizer_rejects_unknown_kind():
  with pytest.raises(ValueError, match='unknown dual optimizer'):
    optim.dual_optimizer('adam')


def test_project_multipliers_clips_fast_and_slow():
  multipliers = optax.LookaheadParams(fast=jnp.asarray([-1.0, 0.5, 7.0, 5.0]),
                                      slow=jnp.asarray([-2.0, 3.0, 11.0, 0.0]))
  projected = optim.project_multipliers(multipliers, 5.0)
  assert isinstance(projected, optax.LookaheadParams)
  np.testing.assert_array_equal(projected.fast, [0.0, 0.5, 5.0, 5.0])
  np.testing.assert_array_equal(projected.slow, [0.0, 3.0, 5.0, 0.0])


def test_project_multipliers_under_jit():
  multipliers = optax.LookaheadParams(fast=jnp.asarray([-0.1, 0.2]),
                                      slow=jnp.asarray([0.3, 9.0]))
  projected = jax.jit(optim.project_multipliers, static_argnums=1)(multipliers, 1.0)
  np.testing.assert_allclose(projected.fast, [0.0, 0.2])
  np.testing.assert_allclose(projected.slow, [0.3, 1.0])
