"""Tests for dmx.data.squad on the shared SQuAD v1.1 dev set and the MiniLM minilm_tokenizer."""

import json
import sys

import numpy as np
import pytest

from dmx.data import squad

SUBSET_STEP = 35  # every 35th question: 302 questions from all 48 articles


@pytest.fixture(scope='module')
def dev():
  return squad.load_squad('dev')


@pytest.fixture(scope='module')
def subset(dev):
  # spread over the file: the first article (Super_Bowl_50) alone has many answers that
  # are part of a wordpiece ('8' of '18'), which no token span can reproduce
  return dev[::SUBSET_STEP]


@pytest.fixture(scope='module')
def features(subset, minilm_tokenizer):
  return squad.encode_squad(subset, minilm_tokenizer, max_length=384, doc_stride=128, max_query_length=64)


def _span_text(features, examples, f, start, end):
  context = examples[features.example_index[f]].context
  return context[features.offsets[f, start, 0]:features.offsets[f, end, 1]]


def test_dev_file_has_10570_questions(dev):
  with open(squad.squad_split_path('dev'), encoding='utf-8') as f:
    raw = json.load(f)
  counted = sum(len(paragraph['qas'])
                for article in raw['data'] for paragraph in article['paragraphs'])
  assert counted == 10570
  assert len(dev) == 10570
  assert len({example.id for example in dev}) == 10570
  assert sum(len(example.answers) for example in dev) == 34726
  assert dev[0].title == 'Super_Bowl_50' and dev[-1].title == 'Force'
  for example in dev:
    assert len(example.answers) == len(example.answer_starts) >= 1
    for text, start in zip(example.answers, example.answer_starts):
      assert example.context[start:start + len(text)] == text


def test_encode_shapes(subset, features, minilm_tokenizer):
  num = len(features)
  assert num >= len(subset)
  for name in ('input_ids', 'mask', 'token_type_ids', 'context_mask'):
    assert getattr(features, name).shape == (num, 384), name
  assert features.input_ids.dtype == np.int32 and features.token_type_ids.dtype == np.int32
  assert features.mask.dtype == bool and features.context_mask.dtype == bool
  assert features.offsets.shape == (num, 384, 2) and features.offsets.dtype == np.int32
  for name in ('example_index', 'start_positions', 'end_positions'):
    assert getattr(features, name).shape == (num,) and getattr(features, name).dtype == np.int32
  assert np.all(np.diff(features.example_index) >= 0)
  assert set(features.example_index.tolist()) == set(range(len(subset)))
  assert features.example_ids == tuple(example.id for example in subset)
  assert np.all(features.input_ids[:, 0] == minilm_tokenizer.cls_token_id)
  # context tokens are the type-1 tokens but the final [SEP], and only they have offsets
  lengths = features.mask.sum(axis=1)
  type_one = (features.token_type_ids == 1) & features.mask
  type_one[np.arange(num), lengths - 1] = False
  np.testing.assert_array_equal(features.context_mask, type_one)
  assert np.all(features.offsets[~features.context_mask] == -1)
  assert np.all(features.offsets[features.context_mask] >= 0)
  assert np.all(features.input_ids[np.arange(num), lengths - 1] == minilm_tokenizer.sep_token_id)
  # the question comes first, whole
  first = features.take(np.flatnonzero(features.example_index == 0)[:1])
  question_ids = first.input_ids[0][1:np.argmax(first.input_ids[0] == minilm_tokenizer.sep_token_id)]
  assert minilm_tokenizer.decode(question_ids) == subset[0].question.lower()


def test_targets_reproduce_the_gold_answer(subset, features):
  inside = features.answer_in_window
  assert set(features.example_index[inside].tolist()) == set(range(len(subset)))
  assert np.all(features.end_positions >= features.start_positions)
  assert np.all(features.end_positions[~inside] == 0)
  assert np.all(features.context_mask[np.flatnonzero(inside), features.start_positions[inside]])
  assert np.all(features.context_mask[np.flatnonzero(inside), features.end_positions[inside]])
  matches = [
      squad.normalize_answer(_span_text(features, subset, f, features.start_positions[f],
                                        features.end_positions[f]))
      == squad.normalize_answer(subset[features.example_index[f]].answers[0])
      for f in np.flatnonzero(inside)]
  assert np.mean(matches) >= 0.99


def test_a_long_dev_context_gives_several_windows(dev, minilm_tokenizer):
  example = dev[250]  # a context of about 400 tokens
  features = squad.encode_squad([example], minilm_tokenizer, max_length=384, doc_stride=128)
  assert len(features) >= 2
  assert features.answer_in_window.any()


def test_windows_start_doc_stride_tokens_apart(minilm_tokenizer):
  words = [f'word{i}' for i in range(400)]
  context = ' '.join(words)
  answer = 'word390 word391'
  example = squad.SquadExample('q0', 't', 'Which words?', context, (answer,),
                               (context.index(answer),))
  features = squad.encode_squad([example], minilm_tokenizer, max_length=64, doc_stride=16)
  assert len(features) > 5
  first_offsets = [features.offsets[f][features.context_mask[f]][:, 0]
                   for f in range(len(features))]
  for previous, current in zip(first_offsets, first_offsets[1:]):
    assert current[0] == previous[16]  # the next window starts doc_stride tokens later
  last_offsets = features.offsets[-1][features.context_mask[-1]]
  assert last_offsets[-1, 1] == len(context)  # the last window reaches the end of the context
  inside = np.flatnonzero(features.answer_in_window)
  assert inside.size >= 1 and inside[-1] == len(features) - 1
  for f in inside:
    assert _span_text(features, [example], f, features.start_positions[f],
                      features.end_positions[f]) == answer


def test_long_questions_are_cut(minilm_tokenizer):
  question = ' '.join(['why'] * 100) + '?'
  example = squad.SquadExample('q0', 't', question, 'Because it is.', ('it is',), (8,))
  features = squad.encode_squad([example], minilm_tokenizer, max_length=96, max_query_length=10)
  assert features.num_truncated_questions == 1
  assert np.argmax(features.input_ids[0] == minilm_tokenizer.sep_token_id) == 11  # [CLS] + 10 tokens
  assert _span_text(features, [example], 0, features.start_positions[0],
                    features.end_positions[0]) == 'it is'


def test_evaluate_on_gold_and_empty_answers(dev):
  gold = squad.evaluate({e.id: e.answers[0] for e in dev}, dev)
  assert gold == {'exact_match': 100.0, 'f1': 100.0}
  # official behaviour: a gold '.' normalises to '' and scores F1 0 even against itself
  last = squad.evaluate({e.id: e.answers[-1] for e in dev}, dev)
  assert last['exact_match'] == 100.0 and last['f1'] == pytest.approx(100 * (1 - 1 / 10570))
  empty = squad.evaluate({e.id: '' for e in dev[:1000]}, dev[:1000])
  assert empty == {'exact_match': 0.0, 'f1': 0.0}
  # as in the official script, '' matches the 3 dev questions with a gold answer of '.'
  full = squad.evaluate({e.id: '' for e in dev}, dev)
  assert full['exact_match'] == pytest.approx(100 * 3 / 10570) and full['f1'] == 0.0


def test_metric_pieces():
  assert squad.normalize_answer('The  Denver Broncos!') == 'denver broncos'
  assert squad.normalize_answer('an apple, a pear') == 'apple pear'
  assert squad.exact_match('the Broncos.', 'Broncos')
  assert not squad.exact_match('Denver Broncos', 'Broncos')
  assert squad.f1_score('Denver Broncos', 'Broncos') == pytest.approx(2 / 3)
  assert squad.f1_score('big cat', 'big dog') == pytest.approx(0.5)
  assert squad.f1_score('', 'cat') == 0.0
  example = squad.SquadExample('q', 't', 'q?', 'c', ('Denver Broncos', 'Broncos'), (0, 7))
  assert squad.evaluate({'q': 'broncos'}, [example]) == {'exact_match': 100.0, 'f1': 100.0}
  with pytest.warns(UserWarning, match='no prediction'):
    assert squad.evaluate({}, [example]) == {'exact_match': 0.0, 'f1': 0.0}


def test_best_spans_recovers_peaked_gold_spans(subset, features):
  inside = features.answer_in_window
  rows = np.arange(len(features))
  start_logits = np.random.default_rng(0).normal(size=features.input_ids.shape)
  end_logits = np.random.default_rng(1).normal(size=features.input_ids.shape)
  start_logits[rows[inside], features.start_positions[inside]] += 20.0
  end_logits[rows[inside], features.end_positions[inside]] += 20.0
  predictions = squad.best_spans(start_logits, end_logits, features)
  assert set(predictions) == {example.id for example in subset}
  scores = squad.evaluate(predictions, subset)
  assert scores['exact_match'] >= 99.0 and scores['f1'] >= 99.0


def test_best_span_rules():
  context_mask = np.zeros((1, 12), bool)
  context_mask[0, 4:11] = True
  start = np.zeros((1, 12))
  end = np.zeros((1, 12))
  start[0, 0] = end[0, 0] = 100.0  # [CLS] is not a context token
  start[0, 9], end[0, 5], end[0, 10] = 10.0, 10.0, 1.0  # end 5 before start 9 is no span
  s, e, score = squad.best_span_indices(start, end, context_mask)
  assert (s[0], e[0], score[0]) == (9, 10, 11.0)
  start[0, 5] = 9.0
  s, e, score = squad.best_span_indices(start, end, context_mask)
  assert (s[0], e[0], score[0]) == (5, 5, 19.0)
  # only the top start (9) and top end (5) are candidates: no valid span is left
  _, _, score = squad.best_span_indices(start, end, context_mask, n_best=1)
  assert score[0] == -np.inf
  s, e, score = squad.best_span_indices(start, end, context_mask, n_best=3)
  assert (s[0], e[0], score[0]) == (5, 5, 19.0)
  start[0, 5] = 0.0
  s, e, score = squad.best_span_indices(start, end, context_mask, n_best=3)
  assert (s[0], e[0], score[0]) == (9, 10, 11.0)
  start[0, 4], end[0, 10] = 50.0, 50.0  # 7 tokens long
  s, e, _ = squad.best_span_indices(start, end, context_mask, max_answer_length=7)
  assert (s[0], e[0]) == (4, 10)
  s, e, _ = squad.best_span_indices(start, end, context_mask, max_answer_length=6)
  assert (s[0], e[0]) != (4, 10) and e[0] - s[0] < 6
  _, _, score = squad.best_span_indices(start, end, np.zeros((1, 12), bool))
  assert score[0] == -np.inf


def test_best_spans_takes_the_best_window(minilm_tokenizer):
  words = [f'word{i}' for i in range(200)]
  context = ' '.join(words)
  example = squad.SquadExample('q0', 't', 'Which?', context, ('word150',),
                               (context.index('word150'),))
  features = squad.encode_squad([example], minilm_tokenizer, max_length=64, doc_stride=32)
  start = np.zeros(features.input_ids.shape)
  end = np.zeros(features.input_ids.shape)
  f = int(np.flatnonzero(features.answer_in_window)[-1])
  first = int(np.flatnonzero(features.context_mask[0])[0])
  start[0, first] = end[0, first] = 5.0  # a weaker span in the first window
  start[f, features.start_positions[f]] = end[f, features.end_positions[f]] = 8.0
  assert squad.best_spans(start, end, features) == {'q0': 'word150'}
  empty = np.zeros((0, features.input_ids.shape[1]))
  assert squad.best_spans(empty, empty, features.take(np.array([], int))) == {'q0': ''}


def test_iterate_batches(features):
  batches = list(squad.iterate_batches(features, 8, rng=np.random.default_rng(0),
                                       drop_remainder=True))
  assert len(batches) == len(features) // 8
  batch, (starts, ends) = batches[0]
  assert set(batch) == {'input_ids', 'mask', 'token_type_ids'}
  assert batch['input_ids'].shape == (8, 384) and starts.shape == ends.shape == (8,)


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    squad.read_squad(tmp_path / 'missing.json')
  assert 'missing.json' in str(info.value) and '\n' not in str(info.value)
  cases = {
      'not_json.json': ('{"data": [', 'not valid JSON'),
      'list.json': ('[1, 2, 3]', '"data" list'),
      'no_paragraphs.json': ('{"data": [{"title": "x"}]}', 'paragraphs'),
      'no_qas.json': ('{"data": [{"paragraphs": [{"context": "c"}]}]}', 'qas'),
      'v2.json': ('{"version": "v2.0", "data": []}', 'v2.0'),
      'impossible.json': (json.dumps({'data': [{'paragraphs': [{'context': 'abc', 'qas': [
          {'id': '1', 'question': 'q', 'answers': [], 'is_impossible': True}]}]}]}),
                           'unanswerable'),
      'offset.json': (json.dumps({'data': [{'paragraphs': [{'context': 'abc', 'qas': [
          {'id': '1', 'question': 'q', 'answers': [{'text': 'bc', 'answer_start': 0}]}]}]}]}),
                      'not at context'),
  }
  for name, (text, message) in cases.items():
    path = tmp_path / name
    path.write_text(text, encoding='utf-8')
    with pytest.raises(squad.SquadFormatError, match=message):
      squad.read_squad(path)
  good = {'version': '1.1', 'data': [{'title': 'T', 'paragraphs': [{'context': 'abc', 'qas': [
      {'id': '1', 'question': 'q', 'answers': [{'text': 'bc', 'answer_start': 1}]}]}]}]}
  path = tmp_path / 'good.json'
  path.write_text(json.dumps(good), encoding='utf-8')
  assert squad.read_squad(path) == [squad.SquadExample('1', 'T', 'q', 'abc', ('bc',), (1,))]


def test_split_path(tmp_path, monkeypatch):
  monkeypatch.setenv('DMX_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='dev-v1.1.json'):
    squad.squad_split_path('dev')
  with pytest.raises(ValueError, match='split'):
    squad.squad_split_path('test')


def test_tfds_loader_is_optional(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match='tensorflow_datasets'):
    squad.load_squad_tfds('dev')
