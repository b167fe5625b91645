"""Sweeps: K probes in one vmapped program train exactly like K separate runs."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dmx import checkpoint, probes, sweep, train
from dmx.cli import main
from dmx.data.common import endless_batches
from dmx.data.toy import generate_toy_data
from dmx.models.toy import ToyModel, ToyModelConfig

SEEDS = (3, 5)
STEPS = 6


@pytest.fixture(scope='module')
def toy():
  model = ToyModel(ToyModelConfig.tiny())
  frozen = model.init(jax.random.key(0))
  data = generate_toy_data(0, num_examples=64)
  return model, frozen, data


def batches(data):
  return endless_batches(data, 16, seed=2)


def separate_run(model, frozen, probe, config, data, seed, depth_key=None):
  probe_key, run_key = sweep.member_keys(seed)
  params = train.init_probe_params(probe_key, model, probe, frozen, next(batches(data)))
  state = train.init_state(config, params, len(model.state_dims))
  state, history = train.fit(model, frozen, probe, config, state, batches(data), STEPS, run_key,
                             progress=False, log_every=1, depth_key=depth_key)
  return state, history


@pytest.mark.parametrize('shared_depths', [False, True], ids=['independent', 'shared'])
@pytest.mark.parametrize('gate', ['input', 'hidden'])
def test_each_member_trains_like_its_separate_run(toy, gate, shared_depths):
  model, frozen, data = toy
  config = train.DiffMaskConfig(gate=gate, warmup_steps=2, probe_learning_rate=1e-2)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=8)
  depth_key = jax.random.key(7) if shared_depths else None
  states = sweep.init_sweep(model, frozen, probe, config, next(batches(data)), SEEDS)
  assert states.step.shape == (len(SEEDS),)
  states, last_metrics = sweep.fit_sweep(model, frozen, probe, config, states, batches(data),
                                         STEPS, SEEDS, depth_key=depth_key, progress=False)
  assert last_metrics['loss'].shape == (len(SEEDS),)
  depths = []
  for index, seed in enumerate(SEEDS):
    expected, history = separate_run(model, frozen, probe, config, data, seed, depth_key)
    depths.append([int(depth) for entry in history for depth in entry['per_layer']])
    for got, want in zip(jax.tree_util.tree_leaves(sweep.member(states, index)),
                         jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # the members really differ (different seeds), so the equality above is not trivial
  first, second = (jax.tree_util.tree_leaves(sweep.member(states, k).params.fast)
                   for k in range(2))
  assert max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(first, second)) > 1e-3
  # shared depths: every member (and its separate run) visits the same depths;
  # independent: these seeds' schedules differ, so sharing is not an accident
  assert (depths[0] == depths[1]) == shared_depths
  if shared_depths:
    assert np.all(last_metrics['layer_index'] == last_metrics['layer_index'][0])


def test_every_member_starts_at_the_given_baselines(toy):
  model, frozen, data = toy
  config = train.DiffMaskConfig(gate='hidden')
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  vectors = [jax.random.normal(jax.random.key(k), (dim,)) for k, dim in
             enumerate(model.state_dims)]
  states = sweep.init_sweep(model, frozen, probe, config, next(batches(data)), SEEDS,
                            baselines=vectors)
  for index in range(len(SEEDS)):
    for name in ('fast', 'slow'):
      params = getattr(sweep.member(states, index).params, name)
      for got, want in zip(probe.apply(params, method='baseline_vectors'), vectors):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # without baselines the probe's own (zero) initialisation stays
  plain = sweep.init_sweep(model, frozen, probe, config, next(batches(data)), SEEDS)
  for got in probe.apply(sweep.member(plain, 0).params.fast, method='baseline_vectors'):
    assert not np.asarray(got).any()


def test_members_with_their_own_margin(toy):
  model, frozen, data = toy
  config = train.DiffMaskConfig(gate='hidden', warmup_steps=2, probe_learning_rate=1e-2)
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  margins = (0.0, 0.5)
  states = sweep.init_sweep(model, frozen, probe, config, next(batches(data)), SEEDS)
  states, _ = sweep.fit_sweep(model, frozen, probe, config, states, batches(data), STEPS, SEEDS,
                              margins=margins, progress=False)
  for index, (seed, margin) in enumerate(zip(SEEDS, margins)):
    expected, _ = separate_run(model, frozen, probe, dataclasses.replace(config, margin=margin),
                               data, seed)
    np.testing.assert_allclose(np.asarray(states.multipliers.fast[index]),
                               np.asarray(expected.multipliers.fast), rtol=1e-5, atol=1e-6)


def test_attribution_spread_is_the_mean_std_over_real_tokens():
  keep = np.array([[[[0.0, 1.0, 0.3]]], [[[1.0, 1.0, 0.9]]]])  # (K=2, states=1, batch=1, seq=3)
  mask = np.array([[1, 1, 0]])
  spread = sweep.attribution_spread(keep, mask)
  assert spread['std_per_state'] == [pytest.approx((0.5 + 0.0) / 2)]
  assert spread['std'] == pytest.approx(0.25)
  with pytest.raises(ValueError, match='two members'):
    sweep.attribution_spread(keep[:1], mask)


def test_sweep_errors(toy):
  model, frozen, data = toy
  config = train.DiffMaskConfig(gate='hidden')
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  with pytest.raises(ValueError, match='distinct'):
    sweep.init_sweep(model, frozen, probe, config, next(batches(data)), (1, 1))
  with pytest.raises(ValueError, match='margins'):
    sweep.make_sweep_step(model, probe, config, margins=(-1.0, 0.1))
  slow = train.DiffMaskConfig(gate='hidden', slow_converged_layers=True)
  states = sweep.init_sweep(model, frozen, probe, slow, next(batches(data)), SEEDS)
  with pytest.raises(ValueError, match='slow_converged_layers'):
    sweep.fit_sweep(model, frozen, probe, slow, states, batches(data), 1, SEEDS,
                    depth_key=jax.random.key(0), progress=False)


def test_cli_sweep_toy_writes_the_report(tmp_path, capsys):
  out = tmp_path / 'sweep'
  code = main(['sweep', 'toy', '--tiny', '--seeds', '0', '1', '--steps', '4', '--gate', 'hidden',
               '--out', str(out), '--no-progress'])
  assert code == 0
  report = json.loads((out / 'report.json').read_text())
  hidden = report['gates']['hidden']
  assert report['seeds'] == [0, 1] and len(hidden['members']) == 2
  assert report['depths'] == 'shared'
  assert 0 <= hidden['std_of_attributions'] <= 0.5
  assert hidden['sweep_seconds'] > 0 and hidden['separate_seconds'] > 0
  assert hidden['max_keep_prob_difference_sweep_vs_separate'] < 1e-4
  assert 'std of attributions' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--seeds', '1'], 'at least 2 seeds'),
    (['--seeds', '1', '1'], 'distinct'),
    (['--seeds', '0', '1', '--margins', '0.1'], '1 margins for 2 seeds'),
    (['--steps', '0'], 'steps must be >= 1'),
])
def test_cli_sweep_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
  code = main(['sweep', 'toy', '--tiny', '--out', str(tmp_path / 'out'), *argv])
  assert code == 2
  error = capsys.readouterr().err.strip()
  assert message in error and '\n' not in error


def sst_sweep_argv(model_folder, out, *extra) -> list[str]:
  from tests.test_diffmask_text import SHARED_DATA  # pylint: disable=import-outside-toplevel
  return ['sweep', 'sst', '--model', str(model_folder), '--out', str(out), '--gate', 'hidden',
          '--data', str(SHARED_DATA), '--steps', '4', '--batch-size', '8', '--eval-batch-size',
          '8', '--max-length', '48', '--max-train-examples', '24', '--max-eval-examples', '12',
          '--warmup-steps', '2', '--checkpoint-every', '2', '--seeds', '0', '1', '2',
          '--timing-steps', '1', '--no-progress', *extra]


def test_cli_sweep_sst_reports_the_spread_and_resumes(sst_model_folder, tmp_path, capsys):
  out = tmp_path / 'sweep_sst'
  assert main(sst_sweep_argv(sst_model_folder, out)) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['seeds'] == [0, 1, 2] and report['depths'] == 'shared'
  assert len(report['std_per_state']) == 4  # tiny BERT: h0..h3
  assert 0 < report['std_of_attributions'] <= 0.5  # random probes of different seeds differ
  assert report['std_of_attributions'] == pytest.approx(np.mean(list(
      report['std_per_state'].values())))
  for member_report in report['members']:
    assert 0 <= member_report['masked_fraction'] <= 1 and 0 <= member_report['agreement'] <= 1
  timing = report['timing']
  assert timing['sweep_seconds_per_step'] > 0 and timing['separate_seconds_per_step'] > 0
  assert 'std of attributions across seeds' in capsys.readouterr().out
  # a finished sweep run again resumes from its checkpoint: the same members, no training
  assert main(sst_sweep_argv(sst_model_folder, out, '--timing-steps', '0')) == 0
  again = json.loads((out / 'report.json').read_text())
  assert again['members'] == report['members']
  assert again['std_per_state'] == report['std_per_state']
  # another sweep's checkpoint is refused with one line, never silently restarted
  assert main(sst_sweep_argv(sst_model_folder, out, '--margin', '0.5')) == 2
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and '\n' not in error


class Killed(Exception):
  """Stands for the process dying between two steps."""


def killed_at(stream, count: int):
  """``stream``, raising ``Killed`` instead of its batch number ``count``."""
  for index, batch in enumerate(stream):
    if index == count:
      raise Killed()
    yield batch


def test_killed_sweep_resumes_bit_for_bit(toy, tmp_path):
  model, frozen, data = toy
  config = train.DiffMaskConfig(gate='hidden', warmup_steps=2, probe_learning_rate=1e-2)
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, hidden_size=8)
  fresh = lambda: sweep.init_sweep(model, frozen, probe, config, next(batches(data)), SEEDS)
  fit = lambda stream, **kwargs: sweep.fit_sweep(
      model, frozen, probe, config, fresh(), stream, STEPS, SEEDS, depth_key=jax.random.key(7),
      progress=False, checkpoint_every=2, **kwargs)
  uninterrupted, _ = fit(batches(data))
  folder = tmp_path / 'checkpoint'
  with pytest.raises(Killed):
    fit(killed_at(batches(data), 5), checkpoint_dir=folder)  # dies after the step-4 checkpoint
  assert json.loads((folder / 'metadata.json').read_text())['step'] == 4
  with pytest.raises(checkpoint.CheckpointError, match='different seeds'):
    sweep.fit_sweep(model, frozen, probe, config,
                    sweep.init_sweep(model, frozen, probe, config, next(batches(data)), (3, 6)),
                    batches(data), STEPS, (3, 6), depth_key=jax.random.key(7), progress=False,
                    checkpoint_dir=folder)
  resumed, _ = fit(batches(data), checkpoint_dir=folder)
  for got, want in zip(jax.tree_util.tree_leaves(resumed),
                       jax.tree_util.tree_leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
