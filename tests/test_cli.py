"""Tests of ``dmx toy``: a tiny end-to-end run, checkpoint reuse, and one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from dmx import cli

TINY = ['--num-examples', '300', '--epochs', '1', '--batch-size', '32', '--diffmask-steps', '30',
        '--baseline-examples', '12', '--no-progress']


def test_toy_end_to_end_and_reuse(tmp_path, capsys):
  out = tmp_path / 'run'
  assert cli.main(['toy', '--out', str(out), *TINY]) == 0
  report = json.loads((out / 'report.json').read_text())
  assert 0.0 <= report['model']['val_accuracy'] <= 1.0
  assert report['model']['reused_checkpoint'] is False
  for name in ('diffmask_input', 'diffmask_hidden'):
    scores = report['methods'][name]
    assert 0.0 <= scores['js'] <= 0.6932 and scores['kl'] >= 0.0
  # the paper's Table 1 baselines, on the first 12 validation examples
  for name in ('integrated_gradients', 'schulz', 'guan', 'erasure'):
    scores = report['methods'][name]
    assert 0.0 <= scores['js'] <= 0.6932 and scores['layer'] == 'feedforward'
    assert scores['num_examples'] <= 12 and scores['seconds'] >= 0.0
  assert report['methods']['erasure']['kl'] is None  # a delta misses most of the ground truth
  for path in ('heatmap_input.png', 'heatmap_hidden.png', 'toy_model/metadata.json',
               'probe_hidden/metadata.json'):
    assert (out / path).exists(), path
  assert 'diffmask_hidden' in capsys.readouterr().out
  # a second run reuses the trained toy model (no baselines this time: they cost compile time)
  assert cli.main(['toy', '--out', str(out), *TINY[:-3], '--baseline-examples', '0',
                   '--no-progress']) == 0
  again = json.loads((out / 'report.json').read_text())
  assert again['model']['reused_checkpoint'] is True
  assert again['model']['val_accuracy'] == report['model']['val_accuracy']


@pytest.mark.parametrize('args, message', [
    (['--epochs', '-1'], 'epochs'),
    (['--num-examples', '0'], 'num_examples'),
    (['--diffmask-steps', '-5'], 'diffmask_steps'),
    (['--feedforward-dim', '0'], 'feedforward_dim'),
])
def test_nonsense_values_exit_2_with_one_line(tmp_path, capsys, args, message):
  assert cli.main(['toy', '--out', str(tmp_path / 'x'), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err


def test_file_as_out(tmp_path, capsys):
  target = tmp_path / 'file.txt'
  target.write_text('x')
  assert cli.main(['toy', '--out', str(target)]) == 2
  assert 'not a folder' in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into a read-only folder')
def test_unwritable_out(tmp_path, capsys):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    assert cli.main(['toy', '--out', str(locked / 'sub')]) == 2
    assert 'not writable' in capsys.readouterr().err
  finally:
    locked.chmod(0o700)


def test_console_script_reports_usage_error():
  result = subprocess.run([sys.executable, '-m', 'dmx.cli', 'toy', '--out', '/tmp', '--epochs',
                           'x'], capture_output=True, text=True)
  assert result.returncode == 2 and 'invalid int value' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args', [
    ['finetune', 'sst', '--model', '{missing}', '--out', '{out}'],
    ['diffmask', 'sst', '--model', '{missing}', '--gate', 'input', '--out', '{out}'],
    ['diffmask', 'squad', '--model', '{missing}', '--gate', 'hidden', '--out', '{out}'],
])
def test_text_commands_name_a_missing_model_folder(tmp_path, capsys, args):
  args = [a.format(missing=tmp_path / 'no-such-model', out=tmp_path / 'out') for a in args]
  assert cli.main(args) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1
  assert 'no-such-model' in error and 'does not exist' in error


def test_compare_toy_reuses_a_model_and_writes_both_reports(tmp_path, capsys):
  import jax
  from dmx import checkpoint
  from dmx.models.toy import ToyModel
  from dmx.pipelines.toy import ToyExperimentConfig
  # an untrained tiny toy classifier, saved as dmx toy saves one: enough to exercise every method
  config = ToyExperimentConfig.tiny(num_examples=300)
  model_dir = tmp_path / 'toy_model'
  checkpoint.save(model_dir, ToyModel(config.model).init(jax.random.key(0), config.max_length),
                  config.model_fingerprint())
  out = tmp_path / 'compare'
  assert cli.main(['compare', 'toy', '--out', str(out), '--model', str(model_dir),
                   '--diffmask-steps', '0', '--baseline-steps', '5', '--ig-steps', '3',
                   '--ig-variant', 'original', '--examples', '10', '--no-progress']) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['model']['reused_checkpoint'] is True
  assert report['config']['num_examples'] == 300  # read from the model's metadata
  assert not (out / 'toy_model').exists()  # the given model is used in place
  assert report['config']['model'] == dataclasses.asdict(config.model)
  names = {'diffmask_input', 'diffmask_hidden', 'integrated_gradients', 'schulz', 'guan',
           'erasure', 'gradient', 'gradient_times_input', 'occlusion', 'lime', 'schulz_gate'}
  assert set(report['methods']) == names
  assert set(report['checks']['js_within_tolerance']) == {'integrated_gradients', 'schulz',
                                                          'guan', 'erasure'}
  assert report['paper']['table1']['schulz'] == {'kl': 1.21, 'js': 0.19}
  assert report['methods']['integrated_gradients']['settings']['variant'] == 'original'
  markdown = (out / 'report.md').read_text()
  assert '| exact erasure search (`erasure`) |' in markdown and '0.260' in markdown
  assert report['command'] in markdown
  assert 'report.md' in capsys.readouterr().out


@pytest.mark.parametrize('args, message', [
    (['--model', '{missing}'], 'no metadata.json'),
    (['--model', '{missing}', '--examples', '0'], 'metadata.json'),
    (['--examples', '0', '--model', '{bad}'], 'does not describe a dmx toy model'),
])
def test_compare_toy_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'metadata.json').write_text('{"seed": 0, "model": {"colour": "red"}}')
  args = [a.format(missing=tmp_path / 'none', bad=bad) for a in args]
  assert cli.main(['compare', 'toy', '--out', str(tmp_path / 'out'), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err
