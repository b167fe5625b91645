"""End-to-end tests of ``dmx diffmask sst|squad``: tiny random BERTs saved as HF folders."""

import argparse
import json
import math
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dmx import checkpoint, probes
from dmx.models import hf_import
from dmx.pipelines import diffmask_text, explain
from tests.conftest import tiny_bert

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REQUIRED_SST_KEYS = ('masked_fraction', 'agreement', 'macro_f1_original', 'macro_f1_masked')
REQUIRED_SQUAD_KEYS = ('masked_fraction', 'agreement', 'start_agreement', 'end_agreement',
                       'exact_match_original', 'exact_match_masked', 'f1_original', 'f1_masked')


@pytest.fixture(scope='module')
def qa_model_folder(tmp_path_factory, minilm_tokenizer):
  model, params = tiny_bert(minilm_tokenizer, 1, head='question_answering')
  return hf_import.save_pretrained(tmp_path_factory.mktemp('qa') / 'model', model, params,
                                   minilm_tokenizer)


def parse(task: str, argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  diffmask_text.add_arguments(parser, task)
  return parser.parse_args(argv)


def sst_args(model_folder, out, gate='input', **extra) -> list[str]:
  options = {'--model': str(model_folder), '--out': str(out), '--gate': gate,
             '--data': str(SHARED_DATA), '--steps': '3', '--batch-size': '8',
             '--eval-batch-size': '8', '--max-length': '48', '--max-train-examples': '24',
             '--max-eval-examples': '12', '--warmup-steps': '2', '--num-heatmaps': '2'}
  options.update(extra)
  return [item for pair in options.items() for item in pair] + ['--no-progress']


def finite_tree(value) -> bool:
  if isinstance(value, dict):
    return all(finite_tree(item) for item in value.values())
  if isinstance(value, list):
    return all(finite_tree(item) for item in value)
  return not (isinstance(value, float) and math.isnan(value))


@pytest.mark.parametrize('gate', probes.GATES)
def test_sst_end_to_end(sst_model_folder, tmp_path, gate):
  out = tmp_path / 'run'
  report = diffmask_text.run_from_args(parse('sst', sst_args(sst_model_folder, out, gate)), 'sst')
  saved = json.loads((out / 'report.json').read_text())
  assert saved['gate'] == gate and saved['task'] == 'sst'
  num_states = 4  # tiny BERT: 2 layers -> h0..h3
  for key in REQUIRED_SST_KEYS:
    assert key in saved and saved[key] is not None
  assert 0 <= saved['masked_fraction'] <= 1 and 0 <= saved['agreement'] <= 1
  assert 0 <= saved['macro_f1_original'] <= 1 and 0 <= saved['macro_f1_masked'] <= 1
  assert saved['summary_depth'] == (num_states - 1 if gate == 'input' else 'mean')
  assert len(saved['per_layer']) == num_states
  for layer in saved['per_layer']:
    assert 0 <= layer['masked_fraction'] <= 1 and 0 <= layer['mean_keep_prob'] <= 1
  assert report['macro_f1_original'] == pytest.approx(saved['macro_f1_original'])
  assert saved['data']['num_eval_sequences'] == 12 and saved['data']['num_train_sequences'] == 24
  assert saved['training'][-1]['step'] == 3

  aggregate = saved['layers_by_sentiment']
  assert aggregate['labels'] == [0, 1, 2, 3, 4] and sum(aggregate['num_tokens']) > 0
  for count, mean in zip(aggregate['num_tokens'], aggregate['layers_kept']):
    assert (mean is None) == (count == 0)
    assert mean is None or 0 <= mean <= num_states

  arrays = np.load(out / 'keep_prob.npz')
  assert arrays['keep_prob'].dtype == np.float16
  assert arrays['keep_prob'].shape == (num_states, 12, 48)
  assert arrays['input_ids'].shape == arrays['mask'].shape == arrays['word_ids'].shape == (12, 48)
  assert arrays['masked_predictions'].shape == (num_states, 12)
  keep = arrays['keep_prob'].astype(np.float32)
  assert np.all((keep >= 0) & (keep <= 1)) and np.all(keep[:, ~arrays['mask']] == 0)
  if gate == 'input':  # votes multiply: keep probabilities never grow with depth
    assert np.all(np.diff(keep, axis=0) <= 1e-3)

  for name in saved['files']['figures']:
    assert (out / name).is_file() and (out / name).stat().st_size > 0
  assert f'layers_by_sentiment_{gate}.png' in saved['files']['figures']
  assert len([n for n in saved['files']['figures'] if n.startswith('heatmap_')]) == 2

  metadata = checkpoint.read_metadata(out / f'probe_{gate}')
  assert metadata['gate'] == gate and metadata['state_dims'] == [32] * num_states
  assert pathlib.Path(metadata['model']) == sst_model_folder.absolute()
  probe = probes.DiffMaskProbe(gate=gate, state_dims=tuple(metadata['state_dims']),
                               form=metadata['form'], hidden_size=metadata['hidden_size'])
  states = [np.zeros((1, 4, 32), np.float32)] * num_states
  restored = checkpoint.restore(out / f'probe_{gate}', probe.init(jax.random.key(0), states))
  if gate == 'input':  # the baseline started from [MASK]'s embedding and moved little
    assert np.abs(np.asarray(restored['params']['baseline_0'])).sum() > 0


def test_squad_end_to_end(qa_model_folder, tmp_path):
  out = tmp_path / 'squad'
  args = parse('squad', [
      '--model', str(qa_model_folder), '--out', str(out), '--gate', 'hidden',
      '--data', str(SHARED_DATA), '--train-split', 'dev', '--steps', '2', '--batch-size', '4',
      '--eval-batch-size', '8', '--max-length', '96', '--max-train-examples', '6',
      '--max-eval-examples', '10', '--num-heatmaps', '1', '--no-progress'])
  diffmask_text.run_from_args(args, 'squad')
  saved = json.loads((out / 'report.json').read_text())
  for key in REQUIRED_SQUAD_KEYS:
    assert saved[key] is not None
  assert finite_tree({key: saved[key] for key in REQUIRED_SQUAD_KEYS})
  assert finite_tree(saved['per_layer'])
  assert 0 <= saved['agreement'] <= 1 and 0 <= saved['f1_masked'] <= 100
  assert saved['data']['num_eval_examples'] == 10
  arrays = np.load(out / 'keep_prob.npz')
  windows = saved['data']['num_eval_sequences']
  assert arrays['keep_prob'].shape == (4, windows, 96)
  assert arrays['example_index'].shape == (windows,)
  assert (out / 'heatmap_hidden_0.png').is_file()
  assert (out / 'probe_hidden' / 'metadata.json').is_file()


def test_bad_input_errors(sst_model_folder, qa_model_folder, tmp_path, minilm_tokenizer):
  out = tmp_path / 'bad'

  def run(task, argv):
    return diffmask_text.run_from_args(parse(task, argv), task)

  with pytest.raises(ValueError, match='does not exist'):
    run('sst', sst_args(tmp_path / 'missing', out))
  # the SST classifier has no question-answering head
  with pytest.raises(ValueError, match='no trained question_answering head'):
    run('squad', ['--model', str(sst_model_folder), '--out', str(out), '--data', str(SHARED_DATA),
                  '--train-split', 'dev'])
  # an encoder without any head
  model, params = tiny_bert(minilm_tokenizer, 2)
  encoder = hf_import.save_pretrained(tmp_path / 'encoder', model, params, minilm_tokenizer)
  with pytest.raises(ValueError, match='no trained classification head'):
    run('sst', sst_args(encoder, out))
  # a 3-way classifier is not an SST-5 model
  model, params = tiny_bert(minilm_tokenizer, 3, head='classification', num_labels=3)
  three_way = hf_import.save_pretrained(tmp_path / 'three', model, params, minilm_tokenizer)
  with pytest.raises(ValueError, match='SST-5 needs 5'):
    run('sst', sst_args(three_way, out))
  for option, value, message in [('--steps', '-1', 'steps'), ('--batch-size', '0', 'batch-size'),
                                 ('--max-length', '4096', 'model limit'),
                                 ('--margin', 'nan', 'margin'),
                                 ('--divergence-tail', '0', 'divergence-tail'),
                                 ('--flip-penalty', '-1', 'flip-penalty'),
                                 ('--probe-average-decay', '1', 'probe-average-decay'),
                                 ('--max-eval-examples', '0', 'max-eval-examples')]:
    with pytest.raises(ValueError, match=message):
      run('sst', sst_args(sst_model_folder, out, **{option: value}))
  with pytest.raises(ValueError, match='not found'):
    run('sst', sst_args(sst_model_folder, out, **{'--data': str(tmp_path / 'nodata')}))
  with pytest.raises(ValueError, match='--train-split dev'):
    run('squad', ['--model', str(qa_model_folder), '--out', str(out), '--max-length', '96',
                  '--data', str(SHARED_DATA)])
  assert not (out / 'report.json').exists()


def test_rerun_resumes_from_the_train_checkpoint_and_refuses_other_settings(
    sst_model_folder, tmp_path, capsys):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  argv = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, gate='hidden',
                                        **{'--steps': '4', '--checkpoint-every': '2'})
  assert main(argv) == 0
  first = json.loads((out / 'report.json').read_text())
  saved = checkpoint.read_metadata(out / diffmask_text.TRAIN_CHECKPOINT)
  assert saved['step'] == 4
  # the same command again: restored at the last step, nothing retrained, same numbers
  assert main(argv) == 0
  again = json.loads((out / 'report.json').read_text())
  assert again['per_layer'] == first['per_layer']
  # the same folder with another batch size: a one-line refusal, not a silent fresh start
  other = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, gate='hidden',
                                         **{'--steps': '4', '--batch-size': '4'})
  capsys.readouterr()
  assert main(other) == 2
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'batch_size' in error and '\n' not in error


@pytest.mark.parametrize('gate, layers, expected_depths', [('input', ['1'], [1]),
                                                           ('hidden', ['1', '3'], [1, 3])])
def test_layers_trains_only_those_depths_and_takes_the_headline_there(
    sst_model_folder, tmp_path, gate, layers, expected_depths):
  out = tmp_path / 'run'
  argv = sst_args(sst_model_folder, out, gate, **{'--steps': '6'})
  argv = argv[:-1] + ['--layers', *layers, '--no-progress']
  report = diffmask_text.run_from_args(parse('sst', argv), 'sst')
  steps = [layer['train_steps'] for layer in report['per_layer']]
  assert sum(steps) == 6
  assert all(count == 0 for depth, count in enumerate(steps) if depth not in expected_depths)
  assert report['diffmask_config']['layers'] == [int(k) for k in layers]
  for name in ('masked_fraction', 'agreement', 'macro_f1_masked', 'mean_keep_prob'):
    expected = np.mean([report['per_layer'][depth][name] for depth in expected_depths])
    assert report[name] == pytest.approx(expected)
  # Figure 8b counts the trained depths only (read back from JSON: NaN means are None there)
  aggregate = json.loads((out / 'report.json').read_text())['layers_by_sentiment']
  assert aggregate['depths'] == expected_depths
  assert all(mean is None or 0 <= mean <= len(expected_depths) for mean in aggregate['layers_kept'])
  if gate == 'input':
    assert report['summary_depth'] == 1 and 'deepest trained depth h1' in report['summary_note']
  else:
    assert report['summary_depth'] == 'mean over [1, 3]'


def test_layers_out_of_range_or_changed_on_resume_is_refused(sst_model_folder, tmp_path, capsys):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, 'input', **{'--steps': '2'})
  capsys.readouterr()
  assert main(base + ['--layers', '9']) == 2
  error = capsys.readouterr().err.strip()
  assert 'out of range' in error and '\n' not in error
  assert main(base + ['--layers', '-1']) == 2
  assert '--layers' in capsys.readouterr().err
  assert main(base + ['--layers', '2']) == 0
  capsys.readouterr()
  assert main(base + ['--layers', '3']) == 2
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'layers' in error and '\n' not in error


@pytest.mark.parametrize('option, field', [('--divergence-tail', 'divergence_tail'),
                                           ('--flip-penalty', 'flip_penalty')])
def test_constraint_option_reaches_the_trainer_and_is_part_of_the_run(
    sst_model_folder, tmp_path, capsys, option, field):
  """Both options make the constrained term at least the KL; the paper's cannot resume them."""
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, 'hidden', **{'--steps': '2'})
  assert main(base + [option, '0.5']) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['diffmask_config'][field] == 0.5
  steps = report['training']
  assert all(step['constrained_divergence'] >= step['divergence'] for step in steps)
  capsys.readouterr()
  assert main(base) == 2
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and field in error and '\n' not in error


def test_probe_average_is_the_probe_reported_beside_the_last_iterate(sst_model_folder, tmp_path,
                                                                     capsys):
  """With --probe-average-decay the saved, scored probe is the average; the last iterate is scored too."""
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, 'hidden',
                                        **{'--steps': '4', '--warmup-steps': '0'})
  assert main(base + ['--probe-average-decay', '0.5']) == 0
  printed = capsys.readouterr().out
  report = json.loads((out / 'report.json').read_text())
  assert report['diffmask_config']['probe_average_decay'] == 0.5
  assert set(report['last_iterate']) == {'masked_fraction', 'agreement', 'macro_f1_masked'}
  assert 'the average of the iterates, decay 0.5' in printed
  _, saved, _, _ = explain.load_probe(out / 'probe_hidden')
  with ocp.StandardCheckpointer() as checkpointer:  # the train state as saved, no template
    trained = checkpointer.restore((out / 'train_checkpoint' / 'state').absolute())
  for name, want in (('averaged_params', True), ('params', False)):
    tree = trained[name]['fast'] if name == 'params' else trained[name]
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved),
                                                    jax.tree_util.tree_leaves(tree)))
    assert same == want, name
  assert main(base) == 2  # the last iterate's run cannot resume an averaged one
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'probe_average_decay' in error and '\n' not in error


@pytest.mark.parametrize('cached', [False, True])
def test_mean_clean_states_averages_each_depth_over_real_tokens(minilm_tokenizer, cached):
  model, params = tiny_bert(minilm_tokenizer, 0, head='classification', num_labels=5)
  batch = hf_import.tokenize(minilm_tokenizer, ['a fine film .', 'no', 'it is long and dull'])
  outputs, states = model.forward(params, batch)
  if cached:  # the bucketed training batches carry the clean pass
    batch = {**batch, 'clean_outputs': np.asarray(outputs),
             'clean_states': tuple(np.asarray(state) for state in states)}
  means = diffmask_text.mean_clean_states(model, params, batch)
  real = batch['mask']
  assert not real.all()  # padding must be left out
  assert len(means) == len(model.state_dims)
  for state, mean in zip(states, means):
    want = np.asarray(state, np.float64)[real].mean(axis=0)  # (dim,) over real tokens only
    np.testing.assert_allclose(np.asarray(mean), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('gate, init', [('hidden', 'zeros'), ('hidden', 'mean_state'),
                                        ('hidden', 'mask_at_h0'), ('input', 'zeros')])
def test_initial_baselines(minilm_tokenizer, gate, init):
  """Input gates start at [MASK]; hidden gates at zeros, at each depth's mean clean state,
  or at [MASK] for h0 and zeros elsewhere."""
  model, params = tiny_bert(minilm_tokenizer, 0, head='classification', num_labels=5)
  batch = hf_import.tokenize(minilm_tokenizer, ['a fine film .', 'it is long and dull'])
  config = diffmask_text.TextDiffMaskConfig(task='sst', model='unused', gate=gate,
                                            hidden_baseline_init=init)
  probe = diffmask_text.make_probe(config, model)
  _, states = model.forward(params, batch)
  initial = probe.init(jax.random.key(0), states)
  started = probes.set_baselines(initial, diffmask_text.initial_baselines(
      config, model, params, minilm_tokenizer, batch))
  baselines = probe.apply(started, method='baseline_vectors')
  mask_embedding = params['embeddings']['word_embeddings']['embedding'][
      minilm_tokenizer.mask_token_id]
  if gate == 'input':
    want = [mask_embedding]
  elif init == 'zeros':
    want = [np.zeros(dim) for dim in model.state_dims]
  elif init == 'mask_at_h0':
    want = [mask_embedding] + [np.zeros(dim) for dim in model.state_dims[1:]]
  else:
    want = [np.asarray(state)[batch['mask']].mean(axis=0) for state in states]
  assert len(baselines) == len(want)
  for got, expected in zip(baselines, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_hidden_baseline_init_is_part_of_the_run_and_refused_for_input_gates(
    sst_model_folder, tmp_path, capsys):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, 'hidden', **{'--steps': '2'})
  assert main(base + ['--hidden-baseline-init', 'mean_state']) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['config']['hidden_baseline_init'] == 'mean_state'
  capsys.readouterr()
  assert main(base) == 2  # a zero-started run cannot resume a mean-started one
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'hidden_baseline_init' in error
  assert '\n' not in error
  input_gate = ['diffmask', 'sst'] + sst_args(sst_model_folder, tmp_path / 'input', 'input')
  assert main(input_gate + ['--hidden-baseline-init', 'mean_state']) == 2
  error = capsys.readouterr().err.strip()
  assert 'hidden gates only' in error and '\n' not in error


def test_probe_weight_norm_is_trained_saved_reloaded_and_part_of_the_run(sst_model_folder,
                                                                         tmp_path, capsys):
  """--probe-weight-norm trains the original's weight-normalised votes; explain rebuilds them."""
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'run'
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, out, 'hidden',
                                        **{'--steps': '2', '--warmup-steps': '0'})
  assert main(base + ['--probe-weight-norm']) == 0
  report = json.loads((out / 'report.json').read_text())
  assert report['config']['probe_weight_norm'] is True
  probe, saved, metadata, _ = explain.load_probe(out / 'probe_hidden')
  assert metadata['weight_norm'] is True and probe.weight_norm
  vote = saved['params']['vote_0']
  assert set(vote['hidden']) == {'direction', 'scale', 'bias'}
  # two steps moved the scales off their initial value, the direction's norm
  hidden_layers = [saved['params'][f'vote_{k}']['hidden']
                   for k in range(len(metadata['state_dims']))]
  moved = [np.abs(np.asarray(layer['scale'])
                  - np.linalg.norm(layer['direction'], axis=0)).max() for layer in hidden_layers]
  assert max(moved) > 0
  capsys.readouterr()
  assert main(base) == 2  # a plain probe cannot resume a weight-normalised one
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'probe_weight_norm' in error and '\n' not in error
  bilinear = ['diffmask', 'sst'] + sst_args(sst_model_folder, tmp_path / 'bilinear', 'hidden')
  assert main(bilinear + ['--probe-form', 'bilinear', '--probe-weight-norm']) == 2
  error = capsys.readouterr().err.strip()
  assert '--probe-weight-norm applies to the mlp probe only' in error and '\n' not in error


def test_more_steps_continue_a_finished_run_as_if_it_had_asked_for_them(sst_model_folder, tmp_path,
                                                                       capsys):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  command = lambda out, steps: ['diffmask', 'sst'] + sst_args(
      sst_model_folder, out, gate='hidden', **{'--steps': str(steps), '--checkpoint-every': '2'})
  out = tmp_path / 'run'
  assert main(command(out, 4)) == 0
  assert main(command(out, 6)) == 0
  continued = json.loads((out / 'report.json').read_text())
  assert continued['training'][-1]['step'] == 6
  assert main(command(tmp_path / 'fresh', 6)) == 0
  fresh = json.loads((tmp_path / 'fresh' / 'report.json').read_text())
  assert continued['per_layer'] == fresh['per_layer']
  capsys.readouterr()
  assert main(command(out, 3)) == 2  # fewer steps than the checkpoint took
  error = capsys.readouterr().err.strip()
  assert 'past this run' in error and '\n' not in error



def independent_scores(config, probe_folder, features) -> dict:
  """Pooled masked fraction and agreement of a saved probe, through ``attribute.masked_agreement``.

  A path apart from the pipeline's evaluator: one batch, the trained depth only.
  """
  from dmx import attribute, train  # pylint: disable=import-outside-toplevel
  model, frozen_params, _ = diffmask_text.load_frozen_model(config)
  probe = diffmask_text.make_probe(config, model)
  batch = features.as_batch()
  template = train.init_probe_params(jax.random.key(0), model, probe, frozen_params, batch)
  probe_params = checkpoint.restore(probe_folder, template)
  scores = attribute.masked_agreement(model, frozen_params, probe, probe_params,
                                      config.diffmask_config(), batch, config.layers[-1])
  lengths = features.mask.sum(axis=1)
  return dict(agreement=float(np.mean(scores['agreement'])),
              masked_fraction=float(np.sum(np.asarray(scores['masked_fraction']) * lengths)
                                    / lengths.sum()))


# a learning rate at which the tiny random model's held-out scores move between checkpoints
SELECTION_OPTIONS = {'--steps': '8', '--checkpoint-every': '2', '--validation-sentences': '10',
                     '--probe-learning-rate': '0.003', '--select-agreement': '0.5'}


def selection_args(model_folder, out, **extra) -> list[str]:
  argv = sst_args(model_folder, out, 'input', **{**SELECTION_OPTIONS, **extra})
  return argv[:-1] + ['--layers', '3', '--no-progress']


@pytest.mark.parametrize('bar', ['0', '1'])  # every probe meets it / (on this model) none does
def test_held_out_selection_reports_the_sparsest_probe_above_the_bar(sst_model_folder, tmp_path,
                                                                    bar):
  out = tmp_path / 'run'
  args = parse('sst', selection_args(sst_model_folder, out, **{'--select-agreement': bar}))
  report = diffmask_text.run_from_args(args, 'sst')
  config = diffmask_text.config_from_args(args, 'sst')
  assert report['data']['num_train_sequences'] == 24 - 10  # held out of the probe's training
  validations = [entry['validation'] for entry in report['training'] if 'validation' in entry]
  assert [entry['step'] for entry in validations] == [2, 4, 6, 8]
  # the rule, restated: most masking among the probes at or above the bar, else most
  # agreement; the earliest on ties
  above = [entry for entry in validations if entry['agreement'] >= float(bar)]
  expected = (max(above, key=lambda entry: (entry['masked_fraction'], -entry['step'])) if above
              else max(validations, key=lambda entry: (entry['agreement'], -entry['step'])))
  selection = report['selection']
  assert selection['selected_step'] == expected['step']
  assert selection['meets_bar'] == bool(above)
  assert selection['final_step'] == 8 and selection['final_validation'] == validations[-1]
  # the saved probe is the kept one: its held-out scores, recomputed another way, match
  model_tokenizer = diffmask_text.load_frozen_model(config)[2]
  train_features, _, eval_features = diffmask_text.load_task_data(config, model_tokenizer)
  _, held_out = diffmask_text.hold_out(train_features, 10)
  recomputed = independent_scores(config, out / 'probe_input', held_out)
  assert recomputed['agreement'] == pytest.approx(expected['agreement'], abs=1e-6)
  assert recomputed['masked_fraction'] == pytest.approx(expected['masked_fraction'], abs=1e-6)
  # and the headline is that probe on the evaluation split
  headline = independent_scores(config, out / 'probe_input', eval_features)
  assert report['agreement'] == pytest.approx(headline['agreement'], abs=1e-6)
  assert report['masked_fraction'] == pytest.approx(headline['masked_fraction'], abs=1e-6)
  if expected['step'] != 8:
    assert set(selection['final_iterate']) == {'masked_fraction', 'agreement', 'macro_f1_masked'}
  assert 'validation_input.png' in report['files']['figures']
  assert (out / 'validation_input.png').stat().st_size > 0


def test_selection_rank_orders_probes_by_the_bar_then_masking():
  rank = lambda agreement, masked: diffmask_text.selection_rank(
      dict(agreement=agreement, masked_fraction=masked), 0.9)
  assert rank(0.91, 0.2) > rank(0.89, 0.9)  # at the bar beats any masking below it
  assert rank(0.91, 0.5) > rank(0.99, 0.4)  # above the bar: masking decides
  assert rank(0.88, 0.1) > rank(0.85, 0.9)  # below it: agreement decides
  assert rank(0.90, 0.3) > rank(0.899, 0.3)  # the bar itself counts as met


def test_interrupted_selection_resumes_to_the_same_probe(sst_model_folder, tmp_path):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  whole, parts = tmp_path / 'whole', tmp_path / 'parts'
  assert main(['diffmask', 'sst'] + selection_args(sst_model_folder, whole)) == 0
  assert main(['diffmask', 'sst'] + selection_args(sst_model_folder, parts,
                                                   **{'--steps': '4'})) == 0
  assert main(['diffmask', 'sst'] + selection_args(sst_model_folder, parts)) == 0
  first = json.loads((whole / 'report.json').read_text())
  second = json.loads((parts / 'report.json').read_text())
  assert second['selection'] == first['selection']
  assert second['per_layer'] == first['per_layer']


def test_selection_options_that_make_no_sense_are_refused(sst_model_folder, tmp_path, capsys):
  from dmx.cli import main  # pylint: disable=import-outside-toplevel
  base = ['diffmask', 'sst'] + sst_args(sst_model_folder, tmp_path / 'run', 'input')
  capsys.readouterr()
  for extra, expected in ((['--select-agreement', '0.9'], '--validation-sentences'),
                          (['--validation-sentences', '4', '--select-agreement', '1.5'],
                           '--select-agreement must lie in [0, 1]'),
                          (['--validate-every', '2'], '--validation-sentences'),
                          (['--validation-sentences', '24'], 'leaves no training sentences')):
    assert main(base + extra) == 2, extra
    error = capsys.readouterr().err.strip()
    assert expected in error and '\n' not in error, error
  with pytest.raises(ValueError, match='only offered for sst'):
    diffmask_text.TextDiffMaskConfig(task='squad', model='unused', validation_sentences=5)
  # a run without selection cannot resume one with it
  with_selection = ['diffmask', 'sst'] + selection_args(sst_model_folder, tmp_path / 'sel',
                                                        **{'--steps': '2'})
  assert main(with_selection) == 0
  without = [item for item in with_selection if item not in ('--select-agreement', '0.5')]
  assert len(without) == len(with_selection) - 2
  capsys.readouterr()
  assert main(without) == 2
  error = capsys.readouterr().err.strip()
  assert 'belongs to another run' in error and 'select_agreement' in error
