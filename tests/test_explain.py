"""``dmx explain``: a probe trained for 3 steps on a tiny random classifier explains a sentence."""

import argparse
import json
import shutil

import numpy as np
import pytest

from dmx.data import sst as sst_data
from dmx.pipelines import diffmask_text, explain
from tests.test_diffmask_text import parse, sst_args

SENTENCE = 'a gripping , funny and deeply moving film .'
NUM_STATES = 4  # tiny BERT: 2 layers -> h0..h3
MAX_LENGTH = 48  # sst_args' --max-length


@pytest.fixture(scope='module')
def run_folder(tmp_path_factory, sst_model_folder):
  """A finished ``dmx diffmask sst --gate input`` run of 3 steps."""
  out = tmp_path_factory.mktemp('explain_run') / 'run'
  diffmask_text.run_from_args(parse('sst', sst_args(sst_model_folder, out, 'input')), 'sst')
  return out


def cli_args(argv):
  parser = argparse.ArgumentParser()
  explain.add_arguments(parser)
  return parser.parse_args(argv)


def edited_probe(run_folder, tmp_path, **changes):
  """A copy of the probe with some metadata fields replaced."""
  probe = shutil.copytree(run_folder / 'probe_input', tmp_path / 'probe_input')
  metadata = json.loads((probe / 'metadata.json').read_text())
  metadata.update(changes)
  (probe / 'metadata.json').write_text(json.dumps(metadata))
  return probe


def test_explanation_shapes_and_values(run_folder):
  result = explain.explain(run_folder / 'probe_input', SENTENCE)
  seq = len(result.tokens)
  assert result.tokens[0] == '[CLS]' and result.tokens[-1] == '[SEP]'
  assert result.keep_prob.shape == result.gates.shape == (NUM_STATES, seq)
  assert result.state_names == diffmask_text.state_names(NUM_STATES)
  assert np.all((result.keep_prob >= 0) & (result.keep_prob <= 1))
  assert np.all((result.gates >= 0) & (result.gates <= 1))
  # input gates multiply the votes up to each depth: never more likely to keep deeper down
  assert np.all(np.diff(result.keep_prob, axis=0) <= 1e-6)
  assert result.probabilities.shape == (sst_data.NUM_CLASSES,)
  assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
  assert result.prediction == int(result.probabilities.argmax())
  assert result.gate == 'input' and result.task == 'sst'
  # the run folder (holding one probe) is accepted as well
  again = explain.explain(run_folder, SENTENCE)
  np.testing.assert_allclose(again.keep_prob, result.keep_prob)


def test_matches_the_evaluator_of_diffmask_text(run_folder, sst_model_folder):
  """The evaluator behind keep_prob.npz, fed the same sentence padded to max_length, agrees."""
  result = explain.explain(run_folder, SENTENCE)
  config = diffmask_text.TextDiffMaskConfig(task='sst', model=str(sst_model_folder), gate='input',
                                            max_length=MAX_LENGTH)
  model, frozen_params, tokenizer = diffmask_text.load_frozen_model(config, log=lambda _: None)
  probe, probe_params, _, _ = explain.load_probe(run_folder)
  words = tuple(SENTENCE.split())
  example = sst_data.SstExample(SENTENCE, words, 2, (2,) * len(words), tree=None)
  features = sst_data.encode_sst([example], tokenizer, MAX_LENGTH)
  evaluator = diffmask_text.make_evaluator(model, frozen_params, probe, config.diffmask_config())
  evaluated = diffmask_text.run_evaluation(evaluator, probe_params, features, 1)
  seq = len(result.tokens)
  assert features.mask[0].sum() == seq
  assert tokenizer.convert_ids_to_tokens(features.input_ids[0, :seq].tolist()) == result.tokens
  np.testing.assert_allclose(result.keep_prob, evaluated['keep_prob'][:, 0, :seq], atol=1e-5)
  assert result.prediction == int(evaluated['outputs'][0].argmax())


def test_format_and_cli_write_a_table_and_a_heatmap(run_folder, tmp_path, capsys):
  result = explain.explain(run_folder, SENTENCE)
  text = explain.format_explanation(result)
  assert 'h0 words' in text and 'prediction:' in text and 'masked at the deepest depth' in text
  for token in result.tokens:
    assert token in text
  assert f'{result.keep_prob[0, 0]:.2f}' in text

  png = tmp_path / 'figs' / 'explained.png'
  assert explain.run_from_args(cli_args(['--probe', str(run_folder), SENTENCE,
                                         '--out', str(png)])) == 0
  assert png.is_file() and png.stat().st_size > 0
  printed = capsys.readouterr().out
  assert 'prediction:' in printed and str(png) in printed
  no_plot = tmp_path / 'none.png'
  explain.run_from_args(cli_args(['--probe', str(run_folder), SENTENCE, '--out', str(no_plot),
                                  '--no-plot']))
  assert not no_plot.exists()


def test_hidden_gate_explanation(sst_model_folder, tmp_path):
  """A hidden-gate probe reads each depth's own gate, and agrees with its evaluator."""
  out = tmp_path / 'hidden'
  diffmask_text.run_from_args(parse('sst', sst_args(
      sst_model_folder, out, 'hidden', **{'--max-eval-examples': '4', '--eval-batch-size': '4',
                                      '--num-heatmaps': '0'})), 'sst')
  result = explain.explain(out / 'probe_hidden', SENTENCE)
  assert result.gate == 'hidden' and result.keep_prob.shape == (NUM_STATES, len(result.tokens))
  assert np.all((result.keep_prob >= 0) & (result.keep_prob <= 1))
  assert 'hidden states masked per depth' in explain.format_explanation(result)


def one_line_error(call, match):
  with pytest.raises(ValueError, match=match) as caught:
    call()
  assert '\n' not in str(caught.value), str(caught.value)


def test_errors_are_one_line(run_folder, sst_model_folder, tmp_path):
  one_line_error(lambda: explain.explain(tmp_path / 'missing', SENTENCE), 'does not exist')
  (tmp_path / 'empty').mkdir()
  one_line_error(lambda: explain.explain(tmp_path / 'empty', SENTENCE), 'no probe checkpoint')
  several = tmp_path / 'several'
  for gate in ('input', 'hidden'):
    shutil.copytree(run_folder / 'probe_input', several / f'probe_{gate}')
  one_line_error(lambda: explain.explain(several, SENTENCE), 'several probes')

  too_long = ' '.join(['good'] * (MAX_LENGTH + 5))
  one_line_error(lambda: explain.explain(run_folder, too_long), "probe's max_length allows 48")
  one_line_error(lambda: explain.explain(run_folder, '  '), 'empty')

  moved = edited_probe(run_folder, tmp_path, model=str(tmp_path / 'moved_away'))
  one_line_error(lambda: explain.explain(moved, SENTENCE), 'pass --model')
  one_line_error(lambda: explain.explain(moved, SENTENCE, model=tmp_path / 'nowhere'),
                 '--model .*does not exist')
  overridden = explain.explain(moved, SENTENCE, model=sst_model_folder)
  assert overridden.keep_prob.shape == (NUM_STATES, len(overridden.tokens))

  # an input-gate checkpoint whose metadata claims hidden gates lacks the hidden baselines
  mislabelled = tmp_path / 'mislabelled'
  mislabelled.mkdir()
  one_line_error(lambda: explain.explain(edited_probe(run_folder, mislabelled, gate='hidden'),
                                         SENTENCE), 'cannot restore')

  squad = tmp_path / 'squad'
  squad.mkdir()
  squad_probe = edited_probe(run_folder, squad, task='squad')
  one_line_error(lambda: explain.explain(squad_probe, SENTENCE), 'not supported yet')
