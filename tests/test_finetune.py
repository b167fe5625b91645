"""Tests of dmx.pipelines.finetune on a tiny random BERT and a handful of SST trees."""

import argparse
import json
import shutil

import jax
import numpy as np
import pytest

from dmx.data import sst
from dmx.models import hf_import
from dmx.models.hf_import import load_pretrained
from dmx.pipelines import finetune
from tests.conftest import tiny_bert

WORDS = {0: 'awful dreadful', 1: 'dull weak', 2: 'ordinary plain', 3: 'good nice',
         4: 'brilliant wonderful'}


def _tree(label: int, index: int) -> str:
  first, second = WORDS[label].split()
  return (f'({label} (2 the) ({label} ({label} (2 film{index % 3}) ({label} {first})) '
          f'({label} {second})))')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """``sst/train.txt`` with 16 trees and ``sst/dev.txt`` with 8, labels cycling 0..4."""
  folder = tmp_path_factory.mktemp('data')
  (folder / 'sst').mkdir()
  (folder / 'sst' / 'train.txt').write_text(
      '\n'.join(_tree(i % 5, i) for i in range(16)) + '\n')
  (folder / 'sst' / 'dev.txt').write_text('\n'.join(_tree((i + 2) % 5, i) for i in range(8)) + '\n')
  return folder


@pytest.fixture(scope='module')
def tiny_model_folder(tmp_path_factory, minilm_tokenizer):
  """A Hugging Face folder of a random 2-layer, 32-wide BERT (no head) with MiniLM's vocab."""
  model, params = tiny_bert(minilm_tokenizer, 0)
  return hf_import.save_pretrained(tmp_path_factory.mktemp('tiny_bert') / 'model', model, params,
                                   minilm_tokenizer)


def _config(model_folder, data_dir, **overrides):
  return finetune.FinetuneConfig.tiny(str(model_folder), data_dir=str(data_dir), **overrides)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tiny_model_folder, data_dir):
  """One uninterrupted 4-step run: ``(out_dir, report)``."""
  out = tmp_path_factory.mktemp('uninterrupted')
  with pytest.warns(UserWarning, match='randomly initialised'):
    report = finetune.run_finetune(_config(tiny_model_folder, data_dir), out, progress=False,
                                   log=lambda message: None)
  return out, report


def _restore(out, config):
  with pytest.warns(UserWarning, match='randomly initialised'):  # the head of the initial model
    model, params, _ = load_pretrained(config.model, head='classification', num_labels=5,
                                       with_tokenizer=False)
  optimizer = finetune.make_optimizer(config, 4)
  return model, finetune.restore_checkpoint(out / 'checkpoint', config,
                                            finetune.init_state(params, optimizer), params)


@pytest.mark.parametrize('overrides, message', [
    (dict(batch_size=0), 'batch_size'),
    (dict(learning_rate=-1.0), 'learning_rate'),
    (dict(learning_rate=float('nan')), 'learning_rate'),
    (dict(epochs=0), 'epochs'),
    (dict(max_steps=0), 'max_steps'),
    (dict(warmup_fraction=1.0), 'warmup_fraction'),
    (dict(max_length=2), 'max_length'),
    (dict(time_budget_minutes=0), 'time_budget_minutes'),
    (dict(dtype='float16'), 'dtype'),
    (dict(select='first'), 'select'),
    (dict(label_smoothing=1.0), 'label_smoothing'),
    (dict(label_smoothing=-0.1), 'label_smoothing'),
    (dict(model=''), 'model'),
])
def test_bad_config_values_raise_one_line(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    finetune.FinetuneConfig(**overrides)
  assert '\n' not in str(error.value)


def test_train_step_overfits_a_fixed_batch(tiny_model_folder, minilm_tokenizer, data_dir):
  with pytest.warns(UserWarning, match='randomly initialised'):
    model, params, _ = load_pretrained(tiny_model_folder, head='classification', num_labels=5,
                                       with_tokenizer=False)
  features = sst.encode_sst(sst.load_sst('train', data_dir)[:8], minilm_tokenizer, 32)
  batch = finetune.trim_batch(features.as_batch(), 16)
  config = _config(tiny_model_folder, data_dir, max_steps=20, learning_rate=1e-2,
                   warmup_fraction=0.0)
  optimizer = finetune.make_optimizer(config, 20)
  train_step = finetune.make_train_step(model, optimizer)
  state = finetune.init_state(params, optimizer)
  losses = []
  for _ in range(20):
    state, outputs = train_step(state, batch, features.labels)
    losses.append(float(outputs['loss']))
  assert int(state['step']) == 20
  assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize('label_smoothing', [0.0, 0.2])
def test_train_step_loss_is_the_smoothed_cross_entropy(tiny_model_folder, minilm_tokenizer,
                                                       data_dir, label_smoothing):
  """The first step's loss against numpy float64: -sum_c target_c log softmax(logits)_c."""
  with pytest.warns(UserWarning, match='randomly initialised'):
    model, params, _ = load_pretrained(tiny_model_folder, head='classification', num_labels=5,
                                       with_tokenizer=False)
  features = sst.encode_sst(sst.load_sst('train', data_dir)[:8], minilm_tokenizer, 32)
  batch = finetune.trim_batch(features.as_batch(), 16)
  logits = np.asarray(jax.jit(model.forward)(params, batch)[0], np.float64)  # (8, 5)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets = np.full(logits.shape, label_smoothing / 5)
  targets[np.arange(8), features.labels] += 1 - label_smoothing
  expected = float(np.mean(-(targets * log_probs).sum(-1)))
  config = _config(tiny_model_folder, data_dir, label_smoothing=label_smoothing)
  optimizer = finetune.make_optimizer(config, 4)
  train_step = finetune.make_train_step(model, optimizer, config.label_smoothing)
  _, outputs = train_step(finetune.init_state(params, optimizer), batch, features.labels)
  np.testing.assert_allclose(float(outputs['loss']), expected, rtol=1e-5)


def test_label_smoothing_enters_the_fingerprint_only_when_used():
  """Checkpoints written before the option existed still resume without it."""
  assert 'label_smoothing' not in finetune.FinetuneConfig().fingerprint()
  smoothed = finetune.FinetuneConfig(label_smoothing=0.1).fingerprint()
  assert smoothed['label_smoothing'] == 0.1
  assert smoothed != finetune.FinetuneConfig().fingerprint()


def test_run_writes_a_model_folder_that_round_trips(uninterrupted, tiny_model_folder, data_dir):
  out, report = uninterrupted
  config = _config(tiny_model_folder, data_dir)
  assert report['steps'] == 4 and report['stopped_by'] == 'completed'
  assert [entry['step'] for entry in report['history']] == [2, 4]
  assert 0 <= report['dev_accuracy'] <= 1 and 0 <= report['dev_macro_f1'] <= 1
  assert json.loads((out / 'report.json').read_text())['dev_accuracy'] == report['dev_accuracy']
  hf_config = json.loads((out / 'model' / 'config.json').read_text())
  assert hf_config['architectures'] == ['BertForSequenceClassification']
  assert hf_config['num_labels'] == 5 and hf_config['model_type'] == 'bert'

  loaded_model, loaded_params, tokenizer = load_pretrained(out / 'model', head='classification')
  assert loaded_model.config.num_labels == 5 and tokenizer is not None
  model, (_, best_params, _) = _restore(out, config)
  batch = finetune.trim_batch(sst.encode_sst(sst.load_sst('dev', data_dir), tokenizer,
                                             32).as_batch(), 16)
  np.testing.assert_array_equal(np.asarray(loaded_model.forward(loaded_params, batch)[0]),
                                np.asarray(model.forward(best_params, batch)[0]))


def test_resume_gives_the_uninterrupted_params(uninterrupted, tiny_model_folder, data_dir,
                                               tmp_path, monkeypatch):
  out, report = uninterrupted
  config = _config(tiny_model_folder, data_dir)
  original_save = finetune.save_checkpoint

  def save_then_crash(path, state, best_params, metadata):
    original_save(path, state, best_params, metadata)
    raise KeyboardInterrupt  # killed right after the step-2 checkpoint

  monkeypatch.setattr(finetune, 'save_checkpoint', save_then_crash)
  with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
    finetune.run_finetune(config, tmp_path, progress=False, log=lambda message: None)
  monkeypatch.setattr(finetune, 'save_checkpoint', original_save)
  assert json.loads((tmp_path / 'checkpoint' / 'metadata.json').read_text())['step'] == 2

  with pytest.warns(UserWarning):
    resumed = finetune.run_finetune(config, tmp_path, progress=False, log=lambda message: None)
  assert resumed['resumed_from_step'] == 2 and resumed['steps'] == 4
  without_seconds = lambda history: [{k: v for k, v in entry.items() if k != 'seconds'}
                                     for entry in history]
  assert without_seconds(resumed['history']) == without_seconds(report['history'])
  _, (state_a, best_a, _) = _restore(out, config)
  _, (state_b, best_b, _) = _restore(tmp_path, config)
  for a, b in zip(jax.tree.leaves((state_a, best_a)), jax.tree.leaves((state_b, best_b))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_select_last_re_exports_the_final_params_of_a_finished_run(uninterrupted,
                                                                   tiny_model_folder, data_dir,
                                                                   tmp_path):
  out, report = uninterrupted
  shutil.copytree(out / 'checkpoint', tmp_path / 'checkpoint')
  config = _config(tiny_model_folder, data_dir, select='last')
  with pytest.warns(UserWarning):
    last = finetune.run_finetune(config, tmp_path, progress=False, log=lambda message: None)
  assert last['resumed_from_step'] == 4 and last['steps'] == 4  # nothing retrained
  assert last['history'] == report['history']
  assert (last['select'], last['model_step']) == ('last', 4)
  assert last['model_dev_accuracy'] == report['history'][-1]['dev_accuracy']
  model, (state, best_params, _) = _restore(out, config)
  loaded_model, loaded_params, tokenizer = load_pretrained(tmp_path / 'model',
                                                           head='classification')
  batch = finetune.trim_batch(sst.encode_sst(sst.load_sst('dev', data_dir), tokenizer,
                                             32).as_batch(), 16)
  exported = np.asarray(loaded_model.forward(loaded_params, batch)[0])
  np.testing.assert_array_equal(exported, np.asarray(model.forward(state['params'], batch)[0]))
  if report['best_step'] != 4:  # then the best and the last params differ, and so must the logits
    assert not np.array_equal(exported, np.asarray(model.forward(best_params, batch)[0]))


def test_mismatched_checkpoint_raises(uninterrupted, tiny_model_folder, data_dir, tmp_path):
  out, _ = uninterrupted
  shutil.copytree(out / 'checkpoint', tmp_path / 'checkpoint')
  config = _config(tiny_model_folder, data_dir, learning_rate=5e-4)
  with pytest.warns(UserWarning), pytest.raises(finetune.CheckpointMismatchError,
                                                match='learning_rate') as error:
    finetune.run_finetune(config, tmp_path, progress=False, log=lambda message: None)
  assert '\n' not in str(error.value)


def test_time_budget_stops_cleanly(tiny_model_folder, data_dir, tmp_path):
  config = _config(tiny_model_folder, data_dir, time_budget_minutes=1e-9)
  with pytest.warns(UserWarning):
    report = finetune.run_finetune(config, tmp_path, progress=False, log=lambda message: None)
  assert report['stopped_by'] == 'time_budget' and report['steps'] == 0
  assert (tmp_path / 'model' / 'model.safetensors').is_file()
  assert (tmp_path / 'checkpoint' / 'metadata.json').is_file()


def _parse(argv):
  parser = argparse.ArgumentParser()
  finetune.add_arguments(parser)
  return parser.parse_args(argv)


def test_cli_arguments_build_the_config(tiny_model_folder, tmp_path):
  args = _parse(['--model', str(tiny_model_folder), '--out', str(tmp_path / 'run'),
                 '--epochs', '1.5', '--batch-size', '8', '--learning-rate', '2e-5',
                 '--time-budget-minutes', '30', '--select', 'last', '--label-smoothing', '0.1',
                 '--no-progress'])
  config = finetune.config_from_args(args)
  assert (config.epochs, config.batch_size, config.learning_rate) == (1.5, 8, 2e-5)
  assert config.label_smoothing == 0.1
  assert config.select == 'last' and 'select' not in config.fingerprint()
  assert config.time_budget_minutes == 30 and args.no_progress


@pytest.mark.parametrize('argv, message', [
    (['--model', '/no/such/model'], 'does not exist'),
    (['--batch-size', '-3'], 'batch_size'),
    (['--learning-rate', '0'], 'learning_rate'),
    (['--data', '/no/such/data'], 'does not exist'),
])
def test_cli_bad_arguments_raise_one_line(argv, message, tiny_model_folder, tmp_path):
  base = {'--model': str(tiny_model_folder), '--out': str(tmp_path / 'run')}
  for flag, value in zip(argv[::2], argv[1::2]):
    base[flag] = value
  args = _parse([item for pair in base.items() for item in pair])
  with pytest.raises(ValueError, match=message) as error:
    finetune.run_from_args(args)
  assert '\n' not in str(error.value)


def test_cli_rejects_an_out_path_that_is_a_file(tiny_model_folder, tmp_path):
  (tmp_path / 'file').write_text('x')
  args = _parse(['--model', str(tiny_model_folder), '--out', str(tmp_path / 'file')])
  with pytest.raises(ValueError, match='not a folder'):
    finetune.run_from_args(args)
