"""SQuAD v1.1: reading, windowed BERT features, span decoding and the official metric.

Features follow BERT's ``run_squad.py`` (and the original DiffMask, which used
transformers' ``squad_convert_examples_to_features``): ``[CLS] question [SEP]
context window [SEP]``, the question cut to ``max_query_length`` tokens, and a long
context split into windows whose starts are ``doc_stride`` tokens apart. Note that
``doc_stride`` is therefore the *step* between windows, as in BERT; the fast
tokenizer's ``stride`` argument is the *overlap*, and we pass it
``context_budget - doc_stride`` (``context_budget = max_length - question tokens -
3``), grouping the questions by length so that each group is one tokenizer call.
(Hugging Face's ``run_qa.py`` passes its ``doc_stride`` as the overlap instead.)

Spans are decoded exactly: the best ``start <= end < start + max_answer_length`` over
the context tokens of all windows of an example, scored ``start_logit + end_logit``,
optionally restricted to each window's ``n_best`` highest start and end logits as in
the reference post-processing. BERT's "max context" filter for tokens that appear
in two windows is not applied (Hugging Face's post-processing does not either).

The metric is the official SQuAD v1.1 evaluation script's: answers are lowercased,
stripped of punctuation, articles (a, an, the) and extra whitespace; exact match and
token F1 take the maximum over the gold answers; both are percentages over all
questions, an unanswered question scoring 0.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from dmx.data.common import batch_indices, import_tfds, require_fast_tokenizer
from dmx.data.sst import DATA_DIR_ENV, default_data_dir

SPLIT_FILES = {'train': 'train-v1.1.json', 'dev': 'dev-v1.1.json'}


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One SQuAD question.

  Attributes:
    id: the question id.
    title: the article's title.
    question: the question text.
    context: the paragraph.
    answers: the gold answer texts (v1.1 dev has up to 3 per question, train 1).
    answer_starts: the character offset of each answer in ``context``.
  """
  id: str
  title: str
  question: str
  context: str
  answers: tuple[str, ...]
  answer_starts: tuple[int, ...]


class SquadFormatError(ValueError):
  """A JSON file that is not in SQuAD v1.1 format."""


def _check(condition: bool, path, where: str, message: str) -> None:
  if not condition:
    raise SquadFormatError(f'{path}: not SQuAD v1.1 format: {where}: {message}')


def parse_squad(dataset: Mapping, source: str = '<json>') -> list[SquadExample]:
  """Examples from an already loaded SQuAD v1.1 JSON object (``{"data": [...]}``)."""
  _check(isinstance(dataset, Mapping) and isinstance(dataset.get('data'), list), source,
         'top level', 'expected an object with a "data" list')
  version = dataset.get('version')
  if version is not None:
    _check(not str(version).lstrip('vV').startswith('2'), source, 'version',
           f'SQuAD {version} (unanswerable questions) is not supported, only v1.1')
  examples = []
  for a, article in enumerate(dataset['data']):
    where = f'data[{a}]'
    _check(isinstance(article, Mapping) and isinstance(article.get('paragraphs'), list), source,
           where, 'expected an object with a "paragraphs" list')
    title = str(article.get('title', ''))
    for p, paragraph in enumerate(article['paragraphs']):
      where = f'data[{a}].paragraphs[{p}]'
      _check(isinstance(paragraph, Mapping) and isinstance(paragraph.get('context'), str)
             and isinstance(paragraph.get('qas'), list), source, where,
             'expected an object with a "context" string and a "qas" list')
      context = paragraph['context']
      for q, qa in enumerate(paragraph['qas']):
        where = f'data[{a}].paragraphs[{p}].qas[{q}]'
        _check(isinstance(qa, Mapping) and 'id' in qa and isinstance(qa.get('question'), str)
               and isinstance(qa.get('answers'), list), source, where,
               'expected an object with "id", "question" and an "answers" list')
        _check(not qa.get('is_impossible', False), source, where,
               'an unanswerable (SQuAD v2.0) question; only v1.1 is supported')
        _check(len(qa['answers']) > 0, source, where, 'no answers')
        texts, starts = [], []
        for answer in qa['answers']:
          _check(isinstance(answer, Mapping) and isinstance(answer.get('text'), str)
                 and isinstance(answer.get('answer_start'), int), source, where,
                 'each answer needs a "text" string and an integer "answer_start"')
          start, text = answer['answer_start'], answer['text']
          _check(context[start:start + len(text)] == text, source, f'{where} (id {qa["id"]})',
                 f'answer {text!r} is not at context[{start}:{start + len(text)}]')
          texts.append(text)
          starts.append(start)
        examples.append(SquadExample(str(qa['id']), title, qa['question'], context, tuple(texts),
                                     tuple(starts)))
  return examples


def read_squad(path: str | os.PathLike) -> list[SquadExample]:
  """Reads a SQuAD v1.1 JSON file, one example per question.

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    SquadFormatError (a ValueError): when the file is not JSON or not SQuAD v1.1.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'SQuAD file not found: {path} (expected e.g. '
                            f'<data_dir>/squad/dev-v1.1.json; see dmx.data.squad.squad_split_path)')
  try:
    with open(path, encoding='utf-8') as f:
      dataset = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise SquadFormatError(f'{path}: not SQuAD v1.1 format: not valid JSON ({error})') from None
  return parse_squad(dataset, str(path))


def squad_split_path(split: str = 'dev', data_dir: str | os.PathLike | None = None) -> Path:
  """``<data_dir>/squad/{train,dev}-v1.1.json`` (or directly in ``data_dir``).

  ``data_dir`` defaults to :func:`dmx.data.sst.default_data_dir` (``$DMX_DATA_DIR``
  or ``../shared/data``).
  """
  if split not in SPLIT_FILES:
    raise ValueError(f'split must be one of {tuple(SPLIT_FILES)}, got {split!r}')
  data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
  candidates = [data_dir / 'squad' / SPLIT_FILES[split], data_dir / SPLIT_FILES[split]]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f'SQuAD {split} split not found: tried '
                          f'{", ".join(map(str, candidates))} '
                          f'(pass data_dir or set {DATA_DIR_ENV})')


def load_squad(split: str = 'dev', data_dir: str | os.PathLike | None = None) -> list[SquadExample]:
  """``read_squad(squad_split_path(split, data_dir))``."""
  return read_squad(squad_split_path(split, data_dir))


def load_squad_tfds(split: str = 'dev', **load_kwargs) -> list[SquadExample]:
  """SQuAD v1.1 from TensorFlow Datasets (``squad/v1.1``, needs network on first use).

  ``split`` is 'train' or 'dev' (TFDS 'validation'). tensorflow_datasets is imported
  here only; it is not a dependency of dmx. Untested offline.
  """
  tfds = import_tfds('load_squad_tfds', 'read the JSON file with read_squad / load_squad')
  tfds_split = {'dev': 'validation'}.get(split, split)
  dataset = tfds.load('squad/v1.1', split=tfds_split, **load_kwargs)

  def text(value) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)

  examples = []
  for row in tfds.as_numpy(dataset):
    answers = row['answers']
    examples.append(SquadExample(text(row['id']), text(row['title']), text(row['question']),
                                 text(row['context']), tuple(text(t) for t in answers['text']),
                                 tuple(int(s) for s in answers['answer_start'])))
  return examples


@dataclasses.dataclass(frozen=True)
class SquadFeatures:
  """Windowed features of ``E`` examples: ``F >= E`` windows of ``S = max_length`` tokens.

  Attributes:
    input_ids: ``(F, S)`` int32, ``[CLS] question [SEP] context window [SEP]`` + padding.
    mask: ``(F, S)`` bool, true on real tokens.
    token_type_ids: ``(F, S)`` int32, 0 on the question, 1 on the context window.
    example_index: ``(F,)`` int32, the example (index into the encoded list) of each window;
      non-decreasing.
    offsets: ``(F, S, 2)`` int32, ``[start, end)`` character span of each context token
      in its example's context, -1 on every other token.
    context_mask: ``(F, S)`` bool, true on context tokens.
    start_positions: ``(F,)`` int32, token index of the first gold answer's first
      token, 0 (``[CLS]``) when the answer is not wholly inside the window.
    end_positions: ``(F,)`` int32, likewise the answer's last token.
    example_ids: ``(E,)`` the question ids, per example.
    contexts: ``(E,)`` the contexts, per example (to turn spans into text).
    num_truncated_questions: how many questions were cut to ``max_query_length``.
  """
  input_ids: np.ndarray
  mask: np.ndarray
  token_type_ids: np.ndarray
  example_index: np.ndarray
  offsets: np.ndarray
  context_mask: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_ids: tuple[str, ...]
  contexts: tuple[str, ...]
  num_truncated_questions: int = 0

  _PER_FEATURE = ('input_ids', 'mask', 'token_type_ids', 'example_index', 'offsets', 'context_mask',
                  'start_positions', 'end_positions')

  def __len__(self) -> int:
    return len(self.example_index)

  def take(self, indices) -> 'SquadFeatures':
    """A subset of the windows; the per-example fields are kept whole."""
    return dataclasses.replace(self, **{name: getattr(self, name)[indices]
                                        for name in self._PER_FEATURE})

  def as_batch(self) -> dict:
    """The model's batch dict: ``input_ids``, ``mask``, ``token_type_ids``."""
    return {'input_ids': self.input_ids, 'mask': self.mask, 'token_type_ids': self.token_type_ids}

  @property
  def answer_in_window(self) -> np.ndarray:
    """``(F,)`` bool, true where the first gold answer lies inside the window."""
    return self.start_positions > 0


def _truncate_questions(questions: list[str], tokenizer, max_query_length: int
                        ) -> tuple[list[str], np.ndarray, int]:
  """Cuts each question after its ``max_query_length``-th token; returns the texts,
  their token counts and how many were cut."""
  encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
  lengths = np.array([len(ids) for ids in encoded['input_ids']], np.int64)
  cut = np.flatnonzero(lengths > max_query_length)
  for i in cut:
    end = encoded['offset_mapping'][i][max_query_length - 1][1]
    questions[i] = questions[i][:end]
  if cut.size:
    again = tokenizer([questions[i] for i in cut], add_special_tokens=False)['input_ids']
    lengths[cut] = [len(ids) for ids in again]
  return questions, lengths, int(cut.size)


def _answer_tokens(offsets: np.ndarray, context_mask: np.ndarray, start_char: int,
                   end_char: int) -> tuple[int, int]:
  """Token span ``[start, end]`` covering characters ``[start_char, end_char)``, or (0, 0)."""
  context = np.flatnonzero(context_mask)
  if context.size == 0:
    return 0, 0
  first, last = context[0], context[-1]
  if offsets[first, 0] > start_char or offsets[last, 1] < end_char:
    return 0, 0
  token_starts, token_ends = offsets[first:last + 1, 0], offsets[first:last + 1, 1]
  start = first + int(np.searchsorted(token_starts, start_char, side='right')) - 1
  end = first + int(np.searchsorted(token_ends, end_char, side='left'))
  return start, min(max(end, start), last)


def encode_squad(examples: Sequence[SquadExample], tokenizer, max_length: int = 384,
                 doc_stride: int = 128, max_query_length: int = 64) -> SquadFeatures:
  """Tokenises questions and contexts into overlapping windows (see the module docstring).

  ``doc_stride`` is the number of context tokens between the starts of consecutive
  windows. Training targets are the first gold answer's token span in each window.
  """
  require_fast_tokenizer(tokenizer, 'offsets and overflowing windows')
  if not examples:
    raise ValueError('encode_squad needs at least one example')
  if doc_stride < 1 or max_query_length < 1:
    raise ValueError(f'doc_stride and max_query_length must be >= 1, got {doc_stride}, '
                     f'{max_query_length}')
  num_special = tokenizer.num_special_tokens_to_add(pair=True)
  questions = [example.question.lstrip() for example in examples]
  questions, query_lengths, num_cut = _truncate_questions(questions, tokenizer, max_query_length)
  budgets = max_length - query_lengths - num_special
  if budgets.min() < 1:
    index = int(np.argmin(budgets))
    raise ValueError(f'max_length {max_length} leaves no room for the context of example {index} '
                     f'(question of {query_lengths[index]} tokens); raise max_length or lower '
                     'max_query_length')

  rows = []  # (example index, window rank, input_ids, token types, mask, offsets, sequence ids)
  groups = collections.defaultdict(list)
  for i, budget in enumerate(budgets):
    groups[int(budget)].append(i)
  for budget, indices in groups.items():
    overlap = max(budget - doc_stride, 0)
    encoded = tokenizer([questions[i] for i in indices], [examples[i].context for i in indices],
                        truncation='only_second', max_length=max_length, stride=overlap,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding='max_length', return_token_type_ids=True,
                        return_attention_mask=True)
    rank = collections.Counter()
    for f, sample in enumerate(encoded['overflow_to_sample_mapping']):
      example_index = indices[sample]
      sequence_ids = [-1 if s is None else s for s in encoded.sequence_ids(f)]
      rows.append((example_index, rank[example_index], encoded['input_ids'][f],
                   encoded['token_type_ids'][f], encoded['attention_mask'][f],
                   encoded['offset_mapping'][f], sequence_ids))
      rank[example_index] += 1
  rows.sort(key=lambda row: (row[0], row[1]))

  num_features = len(rows)
  example_index = np.array([row[0] for row in rows], np.int32)
  input_ids = np.array([row[2] for row in rows], np.int32).reshape(num_features, max_length)
  token_type_ids = np.array([row[3] for row in rows], np.int32).reshape(num_features, max_length)
  mask = np.array([row[4] for row in rows], bool).reshape(num_features, max_length)
  offsets = np.array([row[5] for row in rows], np.int32).reshape(num_features, max_length, 2)
  context_mask = np.array([row[6] for row in rows], np.int32).reshape(num_features, max_length) == 1
  offsets = np.where(context_mask[..., None], offsets, -1).astype(np.int32)

  start_positions = np.zeros(num_features, np.int32)
  end_positions = np.zeros(num_features, np.int32)
  for f in range(num_features):
    example = examples[example_index[f]]
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answers[0])
    start_positions[f], end_positions[f] = _answer_tokens(offsets[f], context_mask[f], start_char,
                                                          end_char)
  return SquadFeatures(input_ids, mask, token_type_ids, example_index, offsets, context_mask,
                       start_positions, end_positions,
                       tuple(example.id for example in examples),
                       tuple(example.context for example in examples), num_cut)


def iterate_batches(features: SquadFeatures, batch_size: int,
                    rng: np.random.Generator | None = None, drop_remainder: bool = False
                    ) -> Iterator[tuple[dict, tuple[np.ndarray, np.ndarray]]]:
  """``(batch_dict, (start_positions, end_positions))``, in order or shuffled by ``rng``.

  ``batch_dict`` holds ``input_ids`` ``(B, S)`` int32, ``mask`` ``(B, S)`` bool and
  ``token_type_ids`` ``(B, S)`` int32; the positions are ``(B,)`` int32.
  """
  for indices in batch_indices(len(features), batch_size, rng, drop_remainder):
    batch = features.take(indices)
    yield batch.as_batch(), (batch.start_positions, batch.end_positions)


def best_span_indices(start_logits, end_logits, context_mask, max_answer_length: int = 30,
                      n_best: int | None = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The best span of each window: ``(start, end, score)``, each ``(F,)``.

  Among context tokens with ``start <= end < start + max_answer_length``, maximises
  ``start_logits[start] + end_logits[end]``; with ``n_best``, only the window's
  ``n_best`` highest start logits and end logits are candidates. A window with no
  valid span gets score ``-inf`` and span (0, 0).
  """
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  context_mask = np.asarray(context_mask, bool)
  if not start_logits.shape == end_logits.shape == context_mask.shape or start_logits.ndim != 2:
    raise ValueError(f'expected (F, S) logits and context mask, got {start_logits.shape}, '
                     f'{end_logits.shape}, {context_mask.shape}')
  start_logits = np.where(context_mask & ~np.isnan(start_logits), start_logits, -np.inf)
  end_logits = np.where(context_mask & ~np.isnan(end_logits), end_logits, -np.inf)
  num_features, length = start_logits.shape
  if n_best is not None and n_best < length:
    for logits in (start_logits, end_logits):
      kth = -np.partition(-logits, n_best - 1, axis=1)[:, n_best - 1:n_best]
      logits[logits < kth] = -np.inf
  rows = np.arange(num_features)
  best_score = np.full(num_features, -np.inf)
  best_start = np.zeros(num_features, np.int64)
  best_end = np.zeros(num_features, np.int64)
  for width in range(min(max_answer_length, length)):
    scores = start_logits[:, :length - width] + end_logits[:, width:]
    starts = np.argmax(scores, axis=1)
    values = scores[rows, starts]
    better = values > best_score
    best_score = np.where(better, values, best_score)
    best_start = np.where(better, starts, best_start)
    best_end = np.where(better, starts + width, best_end)
  return best_start, best_end, best_score


def best_spans(start_logits, end_logits, features: SquadFeatures, max_answer_length: int = 30,
               n_best: int | None = 20) -> dict[str, str]:
  """The predicted answer text of every example, ``{question id: text}``.

  ``start_logits`` and ``end_logits`` are ``(F, S)``, one row per window of
  ``features`` (numpy or jax arrays). Each example takes its best span over all its
  windows (see :func:`best_span_indices`); an example with no valid span gets ''.
  """
  starts, ends, scores = best_span_indices(start_logits, end_logits, features.context_mask,
                                           max_answer_length, n_best)
  best = {}  # example index -> (score, feature)
  for f, example in enumerate(features.example_index.tolist()):
    if np.isfinite(scores[f]) and (example not in best or scores[f] > best[example][0]):
      best[example] = (scores[f], f)
  predictions = {}
  for example, example_id in enumerate(features.example_ids):
    if example not in best:
      predictions[example_id] = ''
      continue
    f = best[example][1]
    char_start = features.offsets[f, starts[f], 0]
    char_end = features.offsets[f, ends[f], 1]
    predictions[example_id] = features.contexts[example][char_start:char_end]
  return predictions


# --- the official SQuAD v1.1 evaluation ---------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(text: str) -> str:
  """Lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def exact_match(prediction: str, ground_truth: str) -> bool:
  """Whether the two answers are equal after :func:`normalize_answer`."""
  return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
  """Token-level F1 (0..1) between the normalised answers."""
  prediction_tokens = normalize_answer(prediction).split()
  ground_truth_tokens = normalize_answer(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(ground_truth_tokens)
  return 2 * precision * recall / (precision + recall)


def evaluate(predictions: Mapping[str, str], examples: Sequence[SquadExample]) -> dict[str, float]:
  """``{'exact_match': %, 'f1': %}`` over ``examples``, as the official v1.1 script.

  Each score is the maximum over the gold answers; a question missing from
  ``predictions`` scores 0 (with a warning).
  """
  if not examples:
    raise ValueError('evaluate needs at least one example')
  total_em = total_f1 = 0.0
  missing = 0
  for example in examples:
    if example.id not in predictions:
      missing += 1
      continue
    prediction = predictions[example.id]
    total_em += max(float(exact_match(prediction, gold)) for gold in example.answers)
    total_f1 += max(f1_score(prediction, gold) for gold in example.answers)
  if missing:
    warnings.warn(f'{missing} of {len(examples)} questions have no prediction and score 0',
                  stacklevel=2)
  return {'exact_match': 100.0 * total_em / len(examples), 'f1': 100.0 * total_f1 / len(examples)}
