"""Tests of the speed benchmark (dmx.bench, dmx bench) and of integrated gradients.

Tiny model only. Timings are never asserted: these tests check that both
steps run and report, that the PyTorch step computes the same loss as dmx's
step on the same weights, gates and depth, and that integrated gradients
satisfy completeness.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import bench, cli
from dmx.baselines import integrated_gradients, path_quadrature
from dmx.models import hf_import
from dmx.models.bert import BertModel
from dmx.probes import DiffMaskProbe
from dmx.train import DiffMaskConfig, init_probe_params, init_state, make_train_step

REPO = Path(__file__).resolve().parents[1]
TINY_STEP = ['--size', 'tiny', '--batch', '2', '--seq', '8', '--steps', '4', '--warmup', '1']


def _json_line(capsys) -> dict:
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, lines
  return json.loads(lines[0])


@pytest.mark.parametrize('impl', bench.IMPLS)
def test_bench_step_prints_one_json_line(impl, capsys):
  if impl == 'torch':
    pytest.importorskip('torch')
  assert cli.main(['bench', 'step', '--impl', impl, '--gate', 'hidden', *TINY_STEP]) == 0
  result = _json_line(capsys)
  assert (result['impl'], result['size'], result['gate']) == (impl, 'tiny', 'hidden')
  assert (result['batch'], result['seq'], result['steps']) == (2, 8, 4)
  assert result['examples_per_s'] > 0 and result['step_seconds'] > 0
  assert result['peak_memory_mb'] > 0 and np.isfinite(result['mean_loss'])
  assert f'{impl}_version' in result and result['device']


@pytest.mark.parametrize('gate', bench.GATES)
def test_cached_clean_pass_step_takes_the_same_steps(gate, capsys, monkeypatch):
  """A batch that carries its clean pass trains exactly as one that recomputes it,
  and the cached step itself never runs the clean pass."""
  losses, forward_calls = {}, []
  original_forward = BertModel.forward

  def counting_forward(self, params, batch):
    forward_calls.append(1)
    return original_forward(self, params, batch)

  monkeypatch.setattr(BertModel, 'forward', counting_forward)
  counts = {}
  for flags in ([], ['--cached-clean-pass']):
    forward_calls.clear()
    assert cli.main(['bench', 'step', '--impl', 'jax', '--gate', gate, *TINY_STEP, *flags]) == 0
    result = _json_line(capsys)
    losses[result['clean_pass']] = result['mean_loss']
    counts[result['clean_pass']] = len(forward_calls)
  assert set(losses) == {'computed', 'cached'}
  np.testing.assert_allclose(losses['cached'], losses['computed'], rtol=1e-5, atol=1e-6)
  # both trace the forward pass once outside the step (probe init or the cache); only the
  # computed step traces it again inside
  assert counts == {'computed': 2, 'cached': 1}, counts


def test_bench_attribution_prints_one_json_line(capsys):
  assert cli.main(['bench', 'attribution', '--size', 'tiny', '--batch', '2', '--seq', '8',
                   '--ig-steps', '4', '--repeats', '1']) == 0
  result = _json_line(capsys)
  assert result['kind'] == 'attribution' and result['ig_steps'] == 4
  assert result['diffmask_examples_per_s'] > 0 and result['ig_examples_per_s'] > 0
  assert result['ratio'] > 0


@pytest.mark.parametrize('args, message', [
    (['step', '--impl', 'jax', '--batch', '0'], 'batch'),
    (['step', '--impl', 'jax', '--seq', '100000'], 'seq'),
    (['step', '--impl', 'jax', '--steps', '0'], 'steps'),
    (['step', '--impl', 'jax', '--layer', '4'], 'layer'),
    (['step', '--impl', 'jax', '--threads', '2'], 'threads'),
    (['step', '--impl', 'torch', '--warmup', '-1'], 'warmup'),
    (['step', '--impl', 'torch', '--cached-clean-pass'], 'cached clean pass'),
    (['attribution', '--ig-steps', '0'], 'ig_steps'),
    (['attribution', '--batch', '2', '--ig-batch', '3'], 'ig_batch'),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
  assert cli.main(['bench', *args]) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and message in error, error


def test_torch_impl_without_torch_is_a_one_line_error(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  assert cli.main(['bench', 'step', '--impl', 'torch', *TINY_STEP]) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and 'pip install' in error, error


def test_unknown_choice_is_an_argparse_error():
  result = subprocess.run([sys.executable, '-m', 'dmx.cli', 'bench', 'step', '--impl', 'mxnet'],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2 and 'invalid choice' in result.stderr
  assert 'Traceback' not in result.stderr


def test_depth_schedule_visits_every_depth():
  assert bench.depth_schedule(4, 6) == [0, 1, 2, 3, 0, 1]
  assert bench.depth_schedule(4, 3, layer_index=2) == [2, 2, 2]


# ---------------------------------------------------------------------------
# The PyTorch step computes dmx's step


@pytest.fixture(scope='module')
def tiny_classifier():
  """``(config, model, params, batch)``: tiny random BERT, its head scaled up.

  A random-init head gives near-uniform logits whatever the input; scaling it
  makes the masked pass change the prediction, so the divergences compared
  below are far from zero.
  """
  config = bench.bert_config('tiny')
  model = BertModel(config)
  params = model.init(jax.random.key(0), 8)
  head = params['head']
  params['head'] = {**head, 'classifier': {**head['classifier'],
                                           'kernel': 200.0 * head['classifier']['kernel']}}
  batch = {name: jnp.asarray(value) for name, value in bench.random_batch(config, 3, 8).items()}
  return config, model, params, batch


@pytest.mark.parametrize('gate', bench.GATES)
def test_torch_step_loss_equals_dmx_step_loss_at_every_depth(tiny_classifier, gate):
  torch = pytest.importorskip('torch')
  config, model, params, batch = tiny_classifier
  # initial logit 0: gates start half closed, so the masked pass matters
  probe = DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=8, initial_logit=0.0)
  probe_params = init_probe_params(jax.random.key(1), model, probe, params, batch)
  diffmask = DiffMaskConfig(gate=gate)
  state = init_state(diffmask, probe_params, config.num_states)
  step = jax.jit(make_train_step(model, probe, diffmask))

  torch_model = bench.build_torch_classifier(config, hf_import.to_state_dict(model, params))
  runner = bench.TorchDiffMaskStep(config, diffmask, torch_model, probe_hidden_size=8)
  runner.load_flax_probe(probe_params)
  input_ids = torch.as_tensor(np.array(batch['input_ids']), dtype=torch.long)
  mask = torch.as_tensor(np.array(batch['mask']), dtype=torch.long)

  depths = list(range(config.num_states))
  divergences = []
  for depth, key in zip(depths, jax.random.split(jax.random.key(2), len(depths))):
    _, metrics = step(state, params, batch, key, layer_index=jnp.int32(depth))
    assert int(metrics['layer_index']) == depth
    # the logistic noise dmx's Hard Concrete sample draws from the step's gate key
    noise = jax.random.logistic(jax.random.split(key)[1],
                                (config.num_states,) + batch['input_ids'].shape)
    loss, aux = runner.loss(input_ids, mask, depth, noise=noise)
    for name, value in (('loss', loss), ('divergence', aux['divergence']),
                        ('sparsity', aux['sparsity'])):
      np.testing.assert_allclose(float(value.detach()), float(metrics[name]), rtol=2e-4, atol=2e-5,
                                 err_msg=f'{gate} gate, depth {depth}: {name}')
    divergences.append(float(metrics['divergence']))
  assert max(divergences) > 1e-2, divergences

  # a full step (backward and both optimisers) runs and keeps the multipliers in the box
  result = runner.step(input_ids, mask, config.num_states - 1)
  assert torch.isfinite(result['loss'])
  assert bool(((runner.multipliers >= 0) & (runner.multipliers <= 200)).all())


def test_torch_masked_pass_with_open_gates_reproduces_the_clean_logits(tiny_classifier):
  torch = pytest.importorskip('torch')
  config, model, params, batch = tiny_classifier
  torch_model = bench.build_torch_classifier(config, hf_import.to_state_dict(model, params))
  runner = bench.TorchDiffMaskStep(config, DiffMaskConfig(gate='hidden'), torch_model)
  input_ids = torch.as_tensor(np.array(batch['input_ids']), dtype=torch.long)
  mask = torch.ones_like(input_ids)
  clean, states = runner.clean_pass(input_ids, mask)
  np.testing.assert_allclose(clean.numpy(), np.asarray(model.forward(params, batch)[0]),
                             rtol=1e-4, atol=1e-4)
  for depth, state in enumerate(states):
    with torch.no_grad():
      masked = runner.masked_pass(input_ids, mask, depth, state.clone())
      # and a replaced state does reach the output
      changed = runner.masked_pass(input_ids, mask, depth, torch.zeros_like(state))
    np.testing.assert_allclose(masked.numpy(), clean.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed.numpy(), clean.numpy(), atol=1e-3), depth


# ---------------------------------------------------------------------------
# Integrated gradients


class QuadraticModel:
  """``outputs[b, c] = sum_{s, d} weights[c, d] * h[b, s, d] ** 2`` with one state ``h``.

  From a zero baseline the exact integrated gradient of class ``c`` is
  ``weights[c, d] * h ** 2``; a right Riemann sum over ``m`` points gives
  ``(1 + 1/m)`` times that, the midpoint rule the exact value.
  """
  state_dims = (3,)

  def forward(self, params, batch):
    return self._head(params, batch['h']), (batch['h'],)

  def forward_from(self, params, batch, states, layer_index, intervention):
    return self._head(params, intervention(layer_index, states[layer_index]))

  def _head(self, params, state):
    return jnp.einsum('cd,bsd->bc', params, state ** 2)


def _quadratic_case():
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  batch = {'h': jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32),
           'mask': jnp.ones((2, 5), bool)}
  target = jnp.asarray([1, 3])
  exact = np.asarray(weights)[np.asarray(target)][:, None, :] * np.asarray(batch['h']) ** 2
  return weights, batch, target, exact


# a right Riemann sum of the linear integrand 2a over 7 points is (1 + 1/7); the
# original code's extra factor a makes it 2a^2, whose integral is 2/3 (midpoint over
# 7 points: 2/3 - 1/(6 * 49); Gauss-Legendre with 2+ points is exact for it)
@pytest.mark.parametrize('rule, variant, factor', [
    ('right', 'paper', 1.0 + 1.0 / 7), ('midpoint', 'paper', 1.0),
    ('gauss_legendre', 'paper', 1.0), ('gauss_legendre', 'original', 2.0 / 3.0),
    ('midpoint', 'original', 2.0 / 3.0 - 1.0 / (6 * 49))])
@pytest.mark.parametrize('path_batch_size', [None, 3])
@pytest.mark.parametrize('use_jit', [True, False])
def test_integrated_gradients_on_a_quadratic(rule, variant, factor, path_batch_size, use_jit):
  weights, batch, target, exact = _quadratic_case()
  run = lambda batch: integrated_gradients(QuadraticModel(), weights, batch, steps=7, rule=rule,
                                           variant=variant, target=target,
                                           path_batch_size=path_batch_size)
  result = (jax.jit(run) if use_jit else run)(batch)
  np.testing.assert_allclose(result.attributions, factor * exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.token_scores, factor * exact.sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.convergence_delta, (factor - 1.0) * exact.sum((1, 2)),
                             rtol=1e-4, atol=1e-5)


def test_gauss_legendre_is_exact_for_polynomials_of_degree_below_twice_the_steps():
  """The quadrature integrates a^k exactly for k < 2 * steps, in float64 numpy."""
  for steps in (1, 3, 6):
    alphas, weights = path_quadrature(steps, 'gauss_legendre')
    assert np.all((alphas > 0) & (alphas < 1))
    for power in range(2 * steps):
      np.testing.assert_allclose(np.sum(weights.astype(np.float64) * alphas.astype(np.float64)
                                        ** power), 1.0 / (power + 1), rtol=1e-6)


def test_path_quadrature():
  alphas, weights = path_quadrature(4)
  np.testing.assert_allclose(alphas, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(weights, [0.25] * 4)
  np.testing.assert_allclose(path_quadrature(4, 'midpoint')[0], [0.125, 0.375, 0.625, 0.875])
  for rule in ('right', 'midpoint', 'gauss_legendre'):
    np.testing.assert_allclose(path_quadrature(5, rule)[1].sum(), 1.0, rtol=1e-6)
  for steps, rule in ((0, 'right'), (3, 'trapezoid')):
    with pytest.raises(ValueError, match='steps|rule'):
      path_quadrature(steps, rule)


def test_integrated_gradients_rejects_an_unknown_variant():
  weights, batch, target, _ = _quadratic_case()
  with pytest.raises(ValueError, match="variant must be one of"):
    integrated_gradients(QuadraticModel(), weights, batch, steps=2, variant='captum')


def test_integrated_gradients_completeness_on_bert(tiny_classifier):
  """Attributions to h0 sum to f(x) - f(baseline) of the predicted logit."""
  _, model, params, batch = tiny_classifier
  result = jax.jit(lambda params, batch: integrated_gradients(
      model, params, batch, steps=16, rule='gauss_legendre', path_batch_size=8))(params, batch)
  outputs = model.forward(params, batch)[0]
  np.testing.assert_array_equal(result.target, np.argmax(outputs, axis=-1))
  assert result.attributions.shape == batch['input_ids'].shape + (model.config.hidden_size,)
  gap = result.token_scores.sum(-1) - result.convergence_delta  # f(x) - f(baseline)
  assert np.all(np.abs(gap) > 1e-2), gap
  np.testing.assert_array_less(np.abs(result.convergence_delta), 1e-2 * np.abs(gap) + 1e-4)


# ---------------------------------------------------------------------------
# The side-by-side script (its subprocesses replaced by canned results)


def test_benchmark_script_pairs_implementations_and_writes_json_lines(tmp_path, monkeypatch,
                                                                      capsys):
  spec = importlib.util.spec_from_file_location('bench_step', REPO / 'benchmarks' / 'bench_step.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  calls = []

  def fake_run(arguments):
    calls.append(arguments)
    options = dict(zip(arguments[2::2], arguments[3::2]))
    if arguments[1] == 'attribution':
      return dict(kind='attribution', size=options['--size'], diffmask_examples_per_s=100.0,
                  ig_examples_per_s=1.0, ratio=100.0, ig_steps=int(options['--ig-steps']),
                  device='cpu')
    speed = 30.0 if options['--impl'] == 'jax' else 20.0
    cached = '--cached-clean-pass' in arguments
    return dict(impl=options['--impl'], size=options['--size'], gate=options['--gate'],
                examples_per_s=40.0 if cached else speed, peak_memory_mb=500.0, device='cpu',
                clean_pass='cached' if cached else 'computed')

  monkeypatch.setattr(script, 'run_one', fake_run)
  out = tmp_path / 'bench.jsonl'
  assert script.main(['--sizes', 'tiny', '--batch', '4', '--seq', '8', '--steps', '3',
                      '--torch-threads', '1', '--out', str(out)]) == 0
  assert [call[:4] for call in calls] == [
      ['bench', 'step', '--impl', 'jax'], ['bench', 'step', '--impl', 'torch'],
      ['bench', 'step', '--impl', 'jax'], ['bench', 'step', '--impl', 'torch'],
      ['bench', 'attribution', '--size', 'tiny']]
  assert '--threads' in calls[1] and '--threads' not in calls[0]
  assert calls[-1][calls[-1].index('--ig-batch') + 1] == '4'  # never more than --batch
  printed = capsys.readouterr().out
  assert '1.50x' in printed and '100.0x' in printed
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(lines) == 5 and lines[-1]['kind'] == 'attribution'

  calls.clear()
  assert script.main(['--sizes', 'tiny', '--gates', 'hidden', '--cached-clean-pass',
                      '--no-attribution', '--out', str(out)]) == 0
  assert [call[3] for call in calls] == ['jax', 'torch', 'jax']
  assert ['--cached-clean-pass' in call for call in calls] == [False, False, True]
  rows = capsys.readouterr().out.splitlines()
  assert any('hidden (cached)' in row and '2.00x' in row for row in rows), rows


@pytest.mark.parametrize('part', bench.FORWARD_PARTS)
@pytest.mark.parametrize('impl', bench.IMPLS)
def test_time_forward_measures_every_part_of_both_implementations(impl, part):
  if impl == 'torch':
    pytest.importorskip('torch')
  result = bench.time_forward(impl, 'tiny', 2, 8, repeats=1, part=part)
  assert result['impl'] == impl and result['part'] == part and result['seconds'] > 0


def test_time_forward_rejects_nonsense():
  with pytest.raises(ValueError, match='impl'):
    bench.time_forward('mxnet', 'tiny', 2, 8)
  with pytest.raises(ValueError, match='repeats'):
    bench.time_forward('jax', 'tiny', 2, 8, repeats=0)
  with pytest.raises(ValueError, match='part'):
    bench.time_forward('jax', 'tiny', 2, 8, part='backward')


def test_cpu_description_names_the_first_processor(tmp_path):
  import platform
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n'
                     'model\t\t: 2\nmodel name\t: AMD EPYC\n\n'
                     'processor\t: 1\nmodel name\t: Other\n')
  assert bench.cpu_description(str(cpuinfo)) == (
      f'cpu ({bench._cpu_count()} cores, AMD EPYC, family 26 model 2, {platform.machine()})')
  # no /proc/cpuinfo (macOS, Windows): cores and architecture only
  assert bench.cpu_description(str(tmp_path / 'missing')) == (
      f'cpu ({bench._cpu_count()} cores, {platform.machine()})')
