"""Tests of ``dmx toy``: a tiny end-to-end run, checkpoint reuse, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from dmx import cli

TINY = ['--num-examples', '300', '--epochs', '1', '--batch-size', '32', '--diffmask-steps', '30',
        '--no-progress']


def test_toy_end_to_end_and_reuse(tmp_path, capsys):
  out = tmp_path / 'run'
  assert cli.main(['toy', '--out', str(out), *TINY]) == 0
  report = json.loads((out / 'report.json').read_text())
  assert 0.0 <= report['model']['val_accuracy'] <= 1.0
  assert report['model']['reused_checkpoint'] is False
  for name in ('diffmask_input', 'diffmask_hidden'):
    scores = report['methods'][name]
    assert 0.0 <= scores['js'] <= 0.6932 and scores['kl'] >= 0.0
  for path in ('heatmap_input.png', 'heatmap_hidden.png', 'toy_model/metadata.json',
               'probe_hidden/metadata.json'):
    assert (out / path).exists(), path
  assert 'diffmask_hidden' in capsys.readouterr().out
  # a second run reuses the trained toy model
  assert cli.main(['toy', '--out', str(out), *TINY]) == 0
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
