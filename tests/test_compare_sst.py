"""``dmx compare sst`` end to end on a tiny random BERT: every method, the faithfulness report,
Figure 5; plus the pieces it is built from (batching, word scores, the figure's normalisation)."""

import argparse
import json

import jax
import numpy as np
import pytest

from dmx import baselines, checkpoint, metrics, probes, viz
from dmx.data import sst as sst_data
from dmx.models import hf_import
from dmx.pipelines import compare_sst
from tests.conftest import tiny_bert
from tests.test_diffmask_text import SHARED_DATA

NUM_EXAMPLES = 5  # two batches of 3: the second holds a filler row
NUM_STATES = 3  # a one-layer BERT: h0 words, h1 embeddings, h2 layer 1
SENTENCE = 'a gripping , funny film .'
FAST = ['--ig-steps', '4', '--schulz-steps', '2', '--guan-steps', '3', '--lime-samples', '8']


def save_probe(folder, model_folder, gate: str, seed: int):
  """A random (untrained) probe checkpoint in the format ``dmx diffmask sst`` writes."""
  state_dims = (32,) * NUM_STATES
  probe = probes.DiffMaskProbe(gate=gate, state_dims=state_dims, form='mlp', hidden_size=8,
                               initial_logit=0.0)
  params = probe.init(jax.random.key(seed), [np.zeros((1, 1, 32), np.float32)] * NUM_STATES)
  return checkpoint.save(folder / f'probe_{gate}', params, dict(
      task='sst', gate=gate, form='mlp', hidden_size=8, initial_logit=0.0,
      state_dims=list(state_dims), model=str(model_folder), head='classification',
      max_length=48, steps=0, diffmask_config={}))


def parse(argv):
  parser = argparse.ArgumentParser()
  compare_sst.add_arguments(parser)
  return parser.parse_args(argv)


@pytest.fixture(scope='module')
def classifier_folder(tmp_path_factory, minilm_tokenizer):
  """A random one-layer SST-5 classifier (weights large enough that words move its prediction),
  saved as a Hugging Face folder with MiniLM's tokenizer."""
  model, params = tiny_bert(minilm_tokenizer, 0, head='classification', num_labels=5,
                            num_layers=1, initializer_range=0.3)
  return hf_import.save_pretrained(tmp_path_factory.mktemp('sst_one_layer') / 'model', model,
                                   params, minilm_tokenizer)


@pytest.fixture(scope='module')
def run(classifier_folder, tmp_path_factory):
  """One full ``dmx compare sst`` run with every method and Figure 5."""
  folder = tmp_path_factory.mktemp('compare_sst')
  input_probe = save_probe(folder, classifier_folder, 'input', 1)
  hidden_probe = save_probe(folder, classifier_folder, 'hidden', 2)
  out = folder / 'out'
  args = parse(['--model', str(classifier_folder), '--probe', str(input_probe),
                '--hidden-probe', str(hidden_probe), '--out', str(out), '--data', str(SHARED_DATA),
                '--num-examples', str(NUM_EXAMPLES), '--batch-size', '3', '--seed', '1',
                '--length-bucket', '64',
                '--figure5-sentence', SENTENCE, '--no-progress'] + FAST)
  report = compare_sst.run_from_args(args)
  return out, report


def test_report_schema_and_values(run):
  out, report = run
  saved = json.loads((out / 'report.json').read_text())
  assert saved == json.loads(json.dumps(report))
  assert list(saved['methods']) == list(compare_sst.METHODS) and saved['skipped'] == {}
  fractions = [str(f) for f in metrics.ERASER_FRACTIONS]
  for name, entry in saved['methods'].items():
    assert list(entry['comprehensiveness']) == fractions == list(entry['sufficiency'])
    for key in ('aopc_comprehensiveness', 'aopc_sufficiency', 'seconds'):
      assert np.isfinite(entry[key]), (name, key)
    # differences of probabilities
    for curve in ('comprehensiveness', 'sufficiency'):
      assert all(-1.0 <= value <= 1.0 for value in entry[curve].values()), (name, curve)
    assert entry['aopc_comprehensiveness'] == pytest.approx(
        np.mean(list(entry['comprehensiveness'].values())))
    assert entry['num_examples'] == NUM_EXAMPLES and entry['seconds'] >= 0
  data = saved['data']
  assert data['num_examples'] == NUM_EXAMPLES and len(data['indices']) == NUM_EXAMPLES
  dev = sst_data.load_sst('dev', SHARED_DATA)
  expected = np.sort(np.random.default_rng(1).permutation(len(dev))[:NUM_EXAMPLES])
  assert data['indices'] == expected.tolist()
  table = (out / 'report.md').read_text()
  assert table.count('\n| ') == 2 + len(compare_sst.METHODS)  # header, rule, a row per method
  assert 'dmx compare sst --model' in table


def test_per_example_curves_reproduce_the_summary_and_one_erasure_pass(run, classifier_folder):
  out, report = run
  arrays = np.load(out / 'per_example.npz')
  assert arrays['indices'].tolist() == report['data']['indices']
  for name, entry in report['methods'].items():
    comprehensiveness = arrays[f'{name}_comprehensiveness']
    assert comprehensiveness.shape == (len(metrics.ERASER_FRACTIONS), NUM_EXAMPLES)
    assert entry['aopc_sufficiency'] == pytest.approx(arrays[f'{name}_sufficiency'].mean())
  # one method's curve, recomputed without the pipeline: occlusion on the first sentence alone
  # (unpadded), words ranked by their mean piece score, erased to [MASK], one pass per fraction
  frozen = compare_sst.load_classifier(str(classifier_folder))
  example = sst_data.load_sst('dev', SHARED_DATA)[report['data']['indices'][0]]
  features = sst_data.encode_sst([example], frozen.tokenizer, 84)
  seq = int(features.mask.sum())
  batch = {name: value[:, :seq] for name, value in features.as_batch().items()}
  word_ids = features.word_ids[:, :seq]
  mask_vector = compare_sst.erasure_vector(frozen, 'mask')
  token_scores = np.asarray(baselines.occlusion(frozen.model, frozen.params, batch,
                                                baseline=mask_vector).token_scores)
  word_scores = sst_data.pool_word_scores(token_scores, word_ids)[0]
  logits, states = frozen.model.forward(frozen.params, batch)
  probabilities = np.asarray(jax.nn.softmax(logits[0]))
  target = probabilities.argmax()
  erased_logits = jax.jit(lambda replaced: frozen.model.forward_from(
      frozen.params, batch, states, 0, lambda i, old: replaced))
  ranked = sorted(range(len(word_scores)), key=lambda w: (-word_scores[w], w))
  expected = []
  for fraction in metrics.ERASER_FRACTIONS:
    top = ranked[:max(1, int(np.ceil(round(fraction * len(ranked), 6))))]
    erased = np.isin(word_ids[0], top)
    replaced = np.where(erased[:, None], mask_vector, np.asarray(states[0][0]))[None]
    probability = jax.nn.softmax(erased_logits(jax.numpy.asarray(replaced))[0])[target]
    expected.append(probabilities[target] - float(probability))
  np.testing.assert_allclose(arrays['occlusion_comprehensiveness'][:, 0], expected, atol=1e-5)
  assert np.abs(expected).max() > 1e-2  # the words matter to this model: the check has teeth


def test_figure5_is_written_with_every_panel(run):
  out, report = run
  assert (out / 'figure5.png').is_file() and (out / 'figure5.png').stat().st_size > 0
  figure = json.loads((out / 'figure5.json').read_text())
  assert report['figure5']['panels'] == list(compare_sst.FIGURE5_PANELS)
  assert figure['tokens'][0] == '[CLS]' and figure['tokens'][-1] == '[SEP]'
  seq = len(figure['tokens'])
  for name, panel in figure['panels'].items():
    values = np.asarray(panel['values'])
    rows = NUM_STATES - 2 if name == 'attention' else NUM_STATES  # attention: a row per layer
    assert values.shape == (rows, seq) and len(panel['rows']) == rows, name
    assert np.all(np.isfinite(values)) and np.all(values >= 0), name
  keep = np.asarray(figure['panels']['diffmask_hidden']['values'])
  assert np.all(keep <= 1.0)


def test_make_batches_groups_by_length_and_fills_the_last_batch(minilm_tokenizer):
  examples = sst_data.load_sst('dev', SHARED_DATA, limit=7)
  features = sst_data.encode_sst(examples, minilm_tokenizer, 84)
  batches = compare_sst.make_batches(features, 3, 16, 'word')
  assert [len(b.rows) for b in batches] == [3, 3, 3]
  rows = np.concatenate([b.rows for b in batches])
  assert sorted(rows[rows >= 0].tolist()) == list(range(7)) and (rows < 0).sum() == 2
  lengths = features.mask.sum(axis=1)
  for batch in batches:
    seq = batch.inputs['input_ids'].shape[1]
    assert seq % 16 == 0 and seq >= lengths[batch.rows[batch.rows >= 0]].max()
    np.testing.assert_array_equal(batch.unit_ids, batch.word_ids)
  wordpieces = compare_sst.make_batches(features, 3, 16, 'wordpiece')
  for batch in wordpieces:
    real = batch.word_ids >= 0
    np.testing.assert_array_equal(batch.unit_ids >= 0, real)
    assert np.all(batch.unit_ids[real] == np.nonzero(real)[1])


def test_unit_scores_average_word_pieces():
  word_ids = np.array([[-1, 0, 0, 1, -1, -1]])
  batch = compare_sst.Batch({}, word_ids.astype(np.int32), word_ids, np.array([0]))
  scores = np.array([[9.0, 1.0, 3.0, -2.0, 9.0, 9.0]])
  np.testing.assert_allclose(compare_sst.unit_scores(scores, batch, 'word', 3), [[2.0, -2.0, 0.0]])


def test_normalize_rows_by_max():
  values = np.array([[1.0, 4.0, 2.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(viz.normalize_rows_by_max(values), [[0.25, 1.0, 0.5], [0, 0, 0]])
  with pytest.raises(ValueError, match='non-negative'):
    viz.normalize_rows_by_max(-values)


@pytest.mark.parametrize('argv, message', [
    (['--methods', 'gradient,magic'], 'unknown'),
    (['--num-examples', '0'], '--num-examples must be >= 1'),
    (['--figure5-sentence', '  '], 'empty'),
])
def test_bad_options_are_one_line_value_errors(tmp_path, argv, message):
  args = parse(['--model', 'unused', '--out', str(tmp_path / 'out')] + argv)
  with pytest.raises(ValueError, match=message):
    compare_sst.config_from_args(args)


def test_a_probe_of_the_wrong_gate_is_refused(classifier_folder, tmp_path):
  hidden = save_probe(tmp_path, classifier_folder, 'hidden', 0)
  args = parse(['--model', str(classifier_folder), '--out', str(tmp_path / 'out'),
                '--probe', str(hidden), '--data', str(SHARED_DATA)])
  with pytest.raises(ValueError, match='hidden-gate probe, expected input'):
    compare_sst.run_from_args(args)


def test_missing_data_is_a_one_line_value_error(classifier_folder, tmp_path):
  args = parse(['--model', str(classifier_folder), '--out', str(tmp_path / 'out'),
                '--data', str(tmp_path / 'nowhere')])
  with pytest.raises(ValueError, match='--data: SST dev split not found'):
    compare_sst.run_from_args(args)


def test_bad_fractions_are_refused_by_the_parser(tmp_path, capsys):
  with pytest.raises(SystemExit):
    parse(['--model', 'unused', '--out', str(tmp_path), '--fractions', '0.5,2'])
  assert 'fractions must be in (0, 1]' in capsys.readouterr().err


def test_cli_missing_model_folder_is_one_line(tmp_path, capsys):
  from dmx import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(['compare', 'sst', '--model', str(tmp_path / 'nowhere'),
                   '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'nowhere' in err, err
