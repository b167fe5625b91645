"""Tests of the Table 2 comparison: erasure's optimal sets, the scoring, the whole pipeline.

Erasure's new options (every optimal set, a KL bound, a per-example budget)
are checked against a brute-force numpy enumeration of every subset; the
scoring against hand-computed precision, recall and F1; the pipeline end to
end on a tiny untrained recurrent classifier and on a tiny random BERT
classifier, each on a few short SST sentences.
"""

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx.baselines.erasure import erasure_search, make_subset_evaluator
from dmx.data.sst import load_sst
from dmx.models import recurrent
from dmx.pipelines import compare_erasure
from known_models import ThresholdModel


INPUTS = np.array([[0.9, 0.6, 0.8, 0.1, 0.0],
                   [2.0, 0.5, 0.0, 0.0, 0.0],
                   [0.2, 0.1, 0.0, 0.0, 0.0],
                   [0.6, 0.6, 0.6, 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], bool)


def batch():
  return {'inputs': jnp.asarray(INPUTS[..., None]), 'mask': jnp.asarray(MASK)}


def brute_force(max_divergence=None):
  """Per example: (optimal size, sorted list of optimal kept tuples), in float64 numpy."""
  def log_softmax(logits):
    return logits - np.logaddexp.reduce(logits)

  answers = []
  for inputs, mask in zip(INPUTS.astype(np.float64), MASK):
    real = list(np.flatnonzero(mask))
    clean = log_softmax(np.array([0.0, 4 * (inputs[real].sum() - 1.5)]))
    for size in range(1, len(real) + 1):
      valid = []
      for kept in itertools.combinations(real, size):
        erased = log_softmax(np.array([0.0, 4 * (inputs[list(kept)].sum() - 1.5)]))
        kl = float(np.sum(np.exp(clean) * (clean - erased)))
        if erased.argmax() == clean.argmax() and (max_divergence is None or kl <= max_divergence):
          valid.append(kept)
      if valid:
        answers.append((size, valid))
        break
  return answers


@pytest.mark.parametrize('max_divergence', [None, 0.05, 0.3])
def test_every_optimal_set_matches_brute_force(max_divergence):
  result = erasure_search(ThresholdModel(), {}, batch(), max_divergence=max_divergence,
                          return_optimal=True, pairs_per_call=5)
  for example, (size, valid) in enumerate(brute_force(max_divergence)):
    assert result.size[example] == size and result.num_optimal[example] == len(valid)
    found = [tuple(np.flatnonzero(row)) for row in result.optimal_keeps[example]]
    assert found == valid  # lexicographic order, as enumerated
    assert result.optimal_divergences[example].shape == (len(valid),)
    if max_divergence is not None:
      assert np.all(result.optimal_divergences[example] <= max_divergence)
  # without return_optimal the result is what it always was
  plain = erasure_search(ThresholdModel(), {}, batch(), max_divergence=max_divergence)
  assert plain.optimal_keeps is None and plain.optimal_divergences is None
  np.testing.assert_array_equal(plain.keep, result.keep)


def test_per_example_budget_gives_up_one_example_only():
  # example 3 needs all 3 positions (3 + 3 + 1 = 7 evaluations); the others fewer
  result = erasure_search(ThresholdModel(), {}, batch(), max_evaluations_per_example=6,
                          return_optimal=True)
  np.testing.assert_array_equal(result.found, [False, True, True, False])
  assert not result.complete
  assert result.optimal_keeps[3].shape == (0, 5)
  generous = erasure_search(ThresholdModel(), {}, batch(), max_evaluations_per_example=100)
  assert generous.found.all() and generous.complete
  with pytest.raises(ValueError, match='max_evaluations_per_example'):
    erasure_search(ThresholdModel(), {}, batch(), max_evaluations_per_example=0)
  with pytest.raises(ValueError, match='max_divergence'):
    erasure_search(ThresholdModel(), {}, batch(), max_divergence=-1.0)


def test_a_reused_evaluator_gives_the_same_answer():
  evaluator = make_subset_evaluator(ThresholdModel(), 0)
  first = erasure_search(ThresholdModel(), {}, batch(), evaluator=evaluator)
  again = erasure_search(ThresholdModel(), {}, batch(), evaluator=evaluator)
  fresh = erasure_search(ThresholdModel(), {}, batch())
  np.testing.assert_array_equal(first.keep, fresh.keep)
  np.testing.assert_array_equal(again.keep, fresh.keep)


def test_score_against_optimal_by_hand():
  optimal = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], np.float32)
  # keeps {0, 2}: F1 1/2 with either optimal set; the first is reported
  scores = compare_erasure.score_against_optimal(np.array([1, 0, 1, 0, 0]), optimal)
  assert scores == dict(precision=0.5, recall=0.5, f1=0.5, optimality=0.0)
  # keeps {2, 3, 4}: closest is {2, 3}: precision 2/3, recall 1, F1 0.8
  scores = compare_erasure.score_against_optimal(np.array([0, 0, 1, 1, 1]), optimal)
  assert scores['precision'] == pytest.approx(2 / 3) and scores['recall'] == 1.0
  assert scores['f1'] == pytest.approx(0.8) and scores['optimality'] == 0.0
  scores = compare_erasure.score_against_optimal(np.array([0, 0, 1, 1, 0]), optimal)
  assert scores == dict(precision=1.0, recall=1.0, f1=1.0, optimality=1.0)
  scores = compare_erasure.score_against_optimal(np.zeros(5), optimal)
  assert scores == dict(precision=0.0, recall=0.0, f1=0.0, optimality=0.0)
  with pytest.raises(ValueError, match='empty'):
    compare_erasure.score_against_optimal(np.zeros(5), np.zeros((1, 5)))


def test_pipeline_end_to_end_on_a_tiny_untrained_model(tmp_path):
  dev = load_sst('dev')
  sentences = [example.words for example in dev if len(example.words) <= 6]
  vocabulary = recurrent.build_vocabulary(sentences, min_count=1)
  model = recurrent.RecurrentModel(recurrent.RecurrentConfig.tiny(len(vocabulary)))
  params = model.init(jax.random.key(1))
  recurrent.save_recurrent(tmp_path / 'model',
                           recurrent.TrainedRecurrent(model, params, vocabulary, 0.2, []))
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--model', str(tmp_path / 'model'),
                            '--sentences', '3', '--max-tokens', '6', '--seeds', '0', '1',
                            '--steps', '4', '--samples', '1', '--max-evaluations', '1000',
                            '--reinforce-reward', 'original', '--baseline-decay', '0.99',
                            '--initial-logit', '5', '--sparsity', 'log_l0', '--logit-bound', '10',
                            '--flip-penalty', '0.5', '--no-progress'])
  report = compare_erasure.run_from_args(args)
  assert report['config']['reinforce_reward'] == 'original'
  assert (report['config']['initial_logit'], report['config']['sparsity'],
          report['config']['logit_bound']) == (5.0, 'log_l0', 10.0)
  assert report['config']['flip_penalty'] == 0.5
  saved = json.loads((tmp_path / 'out' / 'report.json').read_text())
  assert saved['checks'] == report['checks']
  markdown = (tmp_path / 'out' / 'report.md').read_text()
  assert 'paper DiffMask' in markdown and '87.15' in markdown
  assert report['data']['sentences'] == 3
  erasure = report['erasure']
  assert (erasure['scored_sentences'] + erasure['over_budget'] + erasure['empty_set_optimal']
          == 3)
  assert erasure['scored_sentences'] >= 1  # this model and sample score at least one
  for method in compare_erasure.METHODS:
    metrics = report['methods'][method]['metrics']
    for name in compare_erasure.METRICS:
      assert len(metrics[name]['per_seed']) == 2
      assert 0.0 <= metrics[name]['mean'] <= 100.0
    assert metrics['optimality']['per_seed'] == metrics['optimality_by_size']['per_seed']
  assert set(report['checks']) == {'diffmask_beats_reinforce_f1',
                                   'diffmask_beats_reinforce_optimality'}
  assert report['own_objective']['scored_sentences'] >= 1
  assert 'dmx compare sst-erasure' in report['command'] and '--steps 4' in report['command']
  assert '--reinforce-reward original --baseline-decay 0.99' in report['command']
  assert '--initial-logit 5.0 --sparsity log_l0' in report['command']
  assert '--logit-bound 10.0 --flip-penalty 0.5' in report['command']
  assert 'KL + 0.5 x the size of a flipped prediction bounded' in markdown
  assert "the original code's estimator" in markdown
  assert 'clipped to [-10.0, 10.0]' in markdown and 'log P(gate open)' in markdown


def test_pipeline_on_a_bert_classifier_erases_word_pieces(tmp_path, sst_model_folder,
                                                         minilm_tokenizer):
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--model', str(sst_model_folder),
                            '--sentences', '3', '--max-tokens', '7', '--seeds', '0',
                            '--steps', '3', '--samples', '1', '--max-evaluations', '200',
                            '--no-own-objective', '--no-progress'])
  report = compare_erasure.run_from_args(args)
  assert report['data']['token'] == 'word piece'
  assert 'BERT-family (2 layers' in report['model']['description']
  assert 0.0 <= report['model']['dev_accuracy'] <= 1.0
  assert not (tmp_path / 'out' / compare_erasure.MODEL_FOLDER).exists()  # nothing trained
  # the sentences are the dev ones of <= 7 word pieces, [CLS] and [SEP] included
  dev = load_sst('dev')
  counts = np.array([len(minilm_tokenizer(list(e.words), is_split_into_words=True)['input_ids'])
                     for e in dev])
  assert report['data']['eligible'] == int(np.sum(counts <= 7))
  assert all(counts[index] <= 7 for index in report['data']['indices'])
  assert report['data']['mean_tokens'] == pytest.approx(counts[report['data']['indices']].mean())
  erasure = report['erasure']
  assert (erasure['scored_sentences'] + erasure['over_budget'] + erasure['empty_set_optimal']
          == 3)
  markdown = (tmp_path / 'out' / 'report.md').read_text()
  assert 'word pieces' in markdown and 'BERT-family' in markdown


def test_pipeline_trains_the_originals_recurrent_model_on_pretrained_pieces(tmp_path,
                                                                          sst_model_folder):
  from dmx.data.sst import default_data_dir  # pylint: disable=import-outside-toplevel
  data = tmp_path / 'data'
  (data / 'sst').mkdir(parents=True)
  for split, count in (('train', 40), ('dev', 40)):
    lines = (default_data_dir() / 'sst' / f'{split}.txt').read_text().splitlines()[:count]
    (data / 'sst' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--data', str(data),
                            '--pretrained-embeddings', str(sst_model_folder), '--model-epochs',
                            '1', '--sentences', '2', '--max-tokens', '12', '--seeds', '0',
                            '--steps', '2', '--samples', '1', '--max-evaluations', '300',
                            '--no-own-objective', '--no-progress'])
  report = compare_erasure.run_from_args(args)
  config = report['model']['config']
  assert (config['cell'], config['bidirectional']) == ('gru', False)
  assert config['hidden_dim'] == config['embedding_dim'] == 32  # as wide as the tiny BERT's
  assert report['data']['token'] == 'word piece'
  assert '--pretrained-embeddings' in report['command']
  trained, metadata = recurrent.load_recurrent(tmp_path / 'out' / compare_erasure.MODEL_FOLDER)
  assert metadata['fingerprint']['pretrained_embeddings'] == str(sst_model_folder)
  from dmx.models.hf_import import load_pretrained  # pylint: disable=import-outside-toplevel
  _, bert_params, _ = load_pretrained(sst_model_folder, head=None)
  np.testing.assert_array_equal(
      np.asarray(trained.params['params']['embedding']['embedding']),
      np.asarray(bert_params['embeddings']['word_embeddings']['embedding']))


def test_a_classifier_that_is_not_sst5_is_a_one_line_error(tmp_path, minilm_tokenizer):
  from dmx.models import hf_import  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_bert  # pylint: disable=import-outside-toplevel
  model, params = tiny_bert(minilm_tokenizer, 0, head='classification', num_labels=3)
  folder = hf_import.save_pretrained(tmp_path / 'model', model, params, minilm_tokenizer)
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--model', str(folder),
                            '--no-progress'])
  with pytest.raises(ValueError, match='3-way classifier') as error:
    compare_erasure.run_from_args(args)
  assert '\n' not in str(error.value)


def test_bad_config_is_a_one_line_error():
  with pytest.raises(ValueError, match='seeds'):
    compare_erasure.ErasureComparisonConfig(seeds=())
  with pytest.raises(ValueError, match='margin'):
    compare_erasure.ErasureComparisonConfig(margin=-0.1)
  with pytest.raises(ValueError, match='num_sentences'):
    compare_erasure.ErasureComparisonConfig(num_sentences=0)
  with pytest.raises(ValueError, match='reinforce_reward'):
    compare_erasure.ErasureComparisonConfig(reinforce_reward='baseline')
  with pytest.raises(ValueError, match='baseline_decay'):
    compare_erasure.ErasureComparisonConfig(baseline_decay=1.0)
  with pytest.raises(ValueError, match='sparsity'):
    compare_erasure.ErasureComparisonConfig(sparsity='l1')
  with pytest.raises(ValueError, match='logit_bound'):
    compare_erasure.ErasureComparisonConfig(logit_bound=-1.0)
  with pytest.raises(ValueError, match='outside the logit bound'):
    compare_erasure.ErasureComparisonConfig(initial_logit=5.0, logit_bound=4.0)
  with pytest.raises(ValueError, match='flip_penalty'):
    compare_erasure.ErasureComparisonConfig(flip_penalty=-0.5)


def test_a_given_model_and_embeddings_to_train_with_are_a_one_line_error(tmp_path):
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--model', str(tmp_path),
                            '--pretrained-embeddings', 'bundled-minilm'])
  with pytest.raises(ValueError, match='give one of them'):
    compare_erasure.run_from_args(args)


def test_missing_data_is_a_one_line_error(tmp_path):
  parser = argparse.ArgumentParser()
  compare_erasure.add_arguments(parser)
  args = parser.parse_args(['--out', str(tmp_path / 'out'), '--data', str(tmp_path / 'none'),
                            '--no-progress'])
  with pytest.raises(ValueError, match='SST train split not found'):
    compare_erasure.run_from_args(args)


def test_cli_missing_data_is_one_line(tmp_path, capsys):
  from dmx import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(['compare', 'sst-erasure', '--out', str(tmp_path / 'out'),
                   '--data', str(tmp_path / 'nowhere')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'nowhere' in err, err
