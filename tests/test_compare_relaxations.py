"""Tests of ``dmx compare relaxations``: a tiny run end to end, the report, one-line errors."""

import json
import pathlib

import pytest

from dmx import cli, relaxations
from dmx.pipelines import compare_relaxations

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
TINY = ['--tiny', '--steps', '3', '--variance-draws', '32', '--no-progress']
FIELDS = {'js', 'sparsity', 'agreement', 'grad_variance', 'seconds'}


def test_tiny_run_writes_report_table_and_figure(tmp_path, capsys):
  out = tmp_path / 'run'
  assert cli.main(['compare', 'relaxations', '--out', str(out), *TINY,
                   '--relaxations', 'hard_kuma', 'reinforce',
                   '--set', 'hard_kuma.hard_kuma_b=0.8']) == 0
  report = json.loads((out / 'report.json').read_text())
  assert list(report['relaxations']) == ['hard_kuma', 'reinforce']
  for name, row in report['relaxations'].items():
    assert set(row) == FIELDS, name
    assert 0.0 <= row['js'] <= 0.6932 and 0.0 <= row['sparsity'] <= 1.0
    assert 0.0 <= row['agreement'] <= 1.0
    assert row['grad_variance'] >= 0.0 and row['seconds'] > 0.0
  assert report['details']['hard_kuma']['diffmask_config']['hard_kuma_b'] == 0.8
  assert report['details']['reinforce']['gradient'] == 'score_function'
  assert report['settings']['steps'] == 3 and report['settings']['variance_draws'] == 32
  assert set(report['checks']) == {'agreement_at_least_0.95', 'score_function_variance_highest'}
  table = (out / 'report.md').read_text()
  assert '| hard_kuma |' in table and '| reinforce |' in table
  assert 'dmx compare relaxations' in table
  for path in ('relaxations.png', 'probe_reinforce/metadata.json', 'toy_model/metadata.json'):
    assert (out / path).exists(), path
  assert 'report.json' in capsys.readouterr().out


@pytest.mark.parametrize('args, message', [
    (['--relaxations', 'gumbel'], 'unknown relaxations'),
    (['--relaxations', 'reinforce', 'reinforce'], 'distinct'),
    (['--gate', 'output'], 'gate must be'),
    (['--steps', '0'], '--steps'),
    (['--variance-draws', '40'], 'multiple of 32'),
    (['--set', 'reinforce.margin=0.3'], 'cannot override'),
    (['--set', 'hard_kuma.hard_kuma_b=-1'], 'HardKuma b'),
    (['--set', 'binary_concrete.binary_concrete_temperature=x'], 'not a number'),
    (['--set', 'nonsense'], 'NAME.FIELD=VALUE'),
    (['--relaxations', 'hard_concrete', '--set', 'reinforce.probe_learning_rate=0.1'],
     'not compared'),
    (['--model', 'nowhere'], 'cannot be combined'),
    (['--margin', '0.1'], '--margin: only for --task sst'),
])
def test_nonsense_exits_2_with_one_line(tmp_path, capsys, args, message):
  assert cli.main(['compare', 'relaxations', '--out', str(tmp_path / 'x'), *TINY, *args]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


def test_missing_model_folder_is_one_line(tmp_path, capsys):
  assert cli.main(['compare', 'relaxations', '--out', str(tmp_path / 'x'),
                   '--model', str(tmp_path / 'nowhere')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'nowhere' in err


def test_default_config_compares_all_five_with_the_toy_settings():
  config = compare_relaxations.RelaxationComparisonConfig()
  assert config.names == relaxations.NAMES == ('hard_concrete', 'binary_concrete', 'hard_kuma',
                                               'straight_through', 'reinforce')
  assert config.toy.diffmask_steps == 20_000 and config.gate == 'hidden'
  assert config.variance_draws == 1024
  hard_concrete = config.diffmask_config('hard_concrete')
  # the Hard Concrete row is dmx toy's hidden-gate run
  from dmx.pipelines import toy  # pylint: disable=import-outside-toplevel
  assert hard_concrete == toy.toy_diffmask_config('hidden', config.toy.sparsity)


def test_checks_and_table_from_rows():
  rows = {name: dict(js=0.01, sparsity=0.5, agreement=0.99, grad_variance=1e-3, seconds=10.0)
          for name in relaxations.NAMES}
  rows['reinforce'] = dict(rows['reinforce'], grad_variance=1.0)
  rows['hard_kuma'] = dict(rows['hard_kuma'], agreement=0.9)
  checks = compare_relaxations.checks(rows)
  assert checks['score_function_variance_highest'] is True
  assert checks['agreement_at_least_0.95'] == {name: name != 'hard_kuma'
                                               for name in relaxations.NAMES}
  report = dict(relaxations=rows, details={name: dict(gradient='reparameterised')
                                            for name in rows},
                settings=dict(task='toy', gate='hidden', layer='feedforward', seed=0, steps=5,
                              batch_size=4,
                              variance_draws=8, variance_batch=4, variance_at='here',
                              command='dmx compare relaxations --out x'))
  table = compare_relaxations.format_markdown(report)
  assert table.count('\n| ') == len(rows) + 1
  assert '`dmx compare relaxations --out x`' in table


def test_parse_overrides_groups_by_relaxation():
  parsed = compare_relaxations.parse_overrides(
      ['hard_kuma.hard_kuma_b=0.8', 'reinforce.probe_learning_rate=3e-3',
       'hard_kuma.hard_kuma_stretch=[-0.2, 1.0]'])
  assert dict(parsed) == {'hard_kuma': (('hard_kuma_b', 0.8), ('hard_kuma_stretch', (-0.2, 1.0))),
                          'reinforce': (('probe_learning_rate', 0.003),)}
  config = compare_relaxations.RelaxationComparisonConfig(overrides=parsed)
  assert config.diffmask_config('hard_kuma').hard_kuma_stretch == (-0.2, 1.0)
  assert config.diffmask_config('reinforce').probe_learning_rate == 0.003
  assert config.diffmask_config('hard_concrete').probe_learning_rate == 1e-3


def sst_command(model_folder, out, *extra) -> list[str]:
  return ['compare', 'relaxations', '--task', 'sst', '--model', str(model_folder),
          '--out', str(out), '--data', str(SHARED_DATA), '--steps', '3', '--batch-size', '8',
          '--max-length', '48', '--max-train-examples', '16', '--max-eval-examples', '8',
          '--warmup-steps', '2', '--variance-draws', '32', '--no-progress', *extra]


def test_sst_run_on_a_tiny_bert(sst_model_folder, tmp_path):
  out = tmp_path / 'sst'
  assert cli.main(sst_command(sst_model_folder, out, '--relaxations', 'hard_concrete',
                              'reinforce', '--variance-layer', '1',
                              '--set', 'reinforce.probe_learning_rate=1e-3')) == 0
  report = json.loads((out / 'report.json').read_text())
  assert list(report['relaxations']) == ['hard_concrete', 'reinforce']
  for name, row in report['relaxations'].items():
    assert set(row) == FIELDS and row['js'] is None, name  # no ground truth on SST
    assert 0.0 <= row['sparsity'] <= 1.0 and 0.0 <= row['agreement'] <= 1.0
    assert row['grad_variance'] > 0.0 and row['seconds'] > 0.0
    assert len(report['details'][name]['per_layer']) == 4  # tiny BERT: h0..h3
    assert (out / f'sst_{name}' / 'probe_hidden' / 'metadata.json').is_file()
  assert report['details']['reinforce']['diffmask_config']['probe_learning_rate'] == 1e-3
  assert report['details']['reinforce']['diffmask_config']['relaxation'] == 'reinforce'
  settings = report['settings']
  assert settings['task'] == 'sst' and settings['layer'] == 'h1 embed'
  assert settings['model']['num_eval_sentences'] == 8 and settings['steps'] == 3
  table = (out / 'report.md').read_text()
  assert '| reinforce | score function | n/a |' in table and '--task sst' in table
  assert (out / 'relaxations.png').stat().st_size > 0


def test_sst_run_of_one_depth_trains_and_scores_only_that_depth(sst_model_folder, tmp_path):
  out = tmp_path / 'sst_layer'
  assert cli.main(sst_command(sst_model_folder, out, '--relaxations', 'hard_concrete',
                              '--layer', '2', '--steps', '6', '--margin', '1000')) == 0
  report = json.loads((out / 'report.json').read_text())
  settings = report['settings']
  assert settings['layer'] == settings['trained_layers'] == 'h2 L1'
  assert report['details']['hard_concrete']['diffmask_config']['layers'] == [2]
  row = report['relaxations']['hard_concrete']
  per_layer = report['details']['hard_concrete']['per_layer']
  assert list(report['details']['hard_concrete']['training']['per_layer']) == ['2']
  # a huge margin lets the sparsity term close gates at the trained depth
  assert row['sparsity'] == per_layer[2]['masked_fraction'] > 0.0
  assert row['agreement'] == per_layer[2]['agreement']
  assert '`h2 L1`, the only depth trained' in (out / 'report.md').read_text()
  assert '--layer 2' in (out / 'report.md').read_text()


@pytest.mark.parametrize('extra, message', [
    (('--model', 'x', '--layer', '1', '--gate', 'input'), '--layer is for SST hidden gates'),
    (('--model', 'x', '--layer', '1', '--variance-layer', '2'), 'differs from --layer 1'),
    ((), '--task sst needs --model'),
    (('--model', 'x', '--tiny'), '--tiny is for the toy task'),
    (('--model', 'x', '--variance-layer', '0', '--margin', '-1'), '--margin must be'),
])
def test_sst_nonsense_exits_2_with_one_line(tmp_path, capsys, extra, message):
  assert cli.main(['compare', 'relaxations', '--task', 'sst', '--out', str(tmp_path / 'x'),
                   *extra]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


def test_sst_variance_layer_out_of_range_is_one_line(sst_model_folder, tmp_path, capsys):
  assert cli.main(sst_command(sst_model_folder, tmp_path / 'x', '--relaxations',
                              'hard_concrete', '--variance-layer', '9')) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'variance layer must be in [0, 4)' in err, err
