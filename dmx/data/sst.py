"""The Stanford Sentiment Treebank (SST-5) in PTB tree format, for a BERT classifier.

Each line of ``train.txt`` / ``dev.txt`` is one binarised constituency tree, every
node labelled 0..4 (very negative .. very positive), e.g.
``(3 (2 It) (4 (4 (2 's) ...)))``. The root label is the sentence label; the labels
of the leaf nodes are the token-level labels that the paper's Figure 8 compares
attributions with.

Text. ``SstExample.words`` are the leaves with the PTB escapes undone
(``-LRB-`` -> ``(``, ``-RRB-`` -> ``)``, ``-LSB-``/``-RSB-``, ``-LCB-``/``-RCB-``,
``\\/`` -> ``/``, ``\\*`` -> ``*``) and ``SstExample.text`` is the words joined by
single spaces. No detokenisation is done: ``it 's``, ``do n't`` and the PTB quotes
(two backquotes, two apostrophes) stay as they are, which is what the original DiffMask fed BERT (a
WordPiece tokenizer splits punctuation anyway, so re-attaching clitics would only
change a few token boundaries). The original removed the backslashes but kept
``-LRB-``/``-RRB-`` literally; ``read_sst(..., unescape='backslash')`` reproduces that
for parity, ``unescape='none'`` keeps the leaves verbatim. Leaves are split on ASCII
whitespace only: one leaf (``2\\xa01\\/2``) holds a no-break space and stays one word.

Where the files are: :func:`sst_split_path` looks in ``data_dir`` when given, else in
``$DMX_DATA_DIR``, else in ``../shared/data`` next to the repository and then next to
the current directory; ``<data_dir>/sst/<split>.txt`` (or ``<data_dir>/<split>.txt``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np

from dmx.data.common import batch_indices, import_tfds, require_fast_tokenizer

NUM_CLASSES = 5
LABEL_NAMES = ('very negative', 'negative', 'neutral', 'positive', 'very positive')
SPLITS = ('train', 'dev', 'test')
DATA_DIR_ENV = 'DMX_DATA_DIR'

PTB_ESCAPES = {
    '-LRB-': '(', '-RRB-': ')', '-LSB-': '[', '-RSB-': ']', '-LCB-': '{', '-RCB-': '}',
}
Unescape = Literal['ptb', 'backslash', 'none']

# parentheses, or a run of anything but parentheses and ASCII whitespace (a no-break
# space inside a leaf is part of the leaf)
_TOKEN = re.compile(r'\(|\)|[^()\x20\t\n\r\f\v]+')


def unescape_leaf(leaf: str, mode: Unescape = 'ptb') -> str:
  """Undoes the PTB escapes of one leaf (see the module docstring for ``mode``)."""
  if mode == 'none':
    return leaf
  if mode not in ('ptb', 'backslash'):
    raise ValueError(f"unescape must be 'ptb', 'backslash' or 'none', got {mode!r}")
  leaf = leaf.replace('\\', '')
  if mode == 'ptb':
    leaf = PTB_ESCAPES.get(leaf, leaf)
  return leaf


class Tree(NamedTuple):
  """One node of a sentiment tree.

  Attributes:
    label: the node's sentiment label, 0..4.
    children: the child nodes, empty for a leaf.
    word: the leaf's token as written in the file (PTB escapes kept), None for an
      inner node.
  """
  label: int
  children: tuple['Tree', ...] = ()
  word: str | None = None

  @property
  def is_leaf(self) -> bool:
    return self.word is not None

  def subtrees(self) -> Iterator['Tree']:
    """All nodes, this one first, in pre-order (left to right)."""
    stack = [self]
    while stack:
      node = stack.pop()
      yield node
      stack.extend(reversed(node.children))

  @property
  def leaves(self) -> list[str]:
    """The leaf tokens, left to right, as written in the file."""
    return [node.word for node in self.subtrees() if node.is_leaf]

  @property
  def leaf_labels(self) -> list[int]:
    """The label of each leaf node, aligned with :attr:`leaves`."""
    return [node.label for node in self.subtrees() if node.is_leaf]

  def spans(self) -> list[tuple[int, int, int]]:
    """``(start, end, label)`` of every node in pre-order; ``leaves[start:end]`` is its phrase."""
    out = []

    def visit(node: Tree, start: int) -> int:  # returns the end of the node's span
      index = len(out)
      out.append(None)
      end = start + 1 if node.is_leaf else start
      for child in node.children:
        end = visit(child, end)
      out[index] = (start, end, node.label)
      return end

    visit(self, 0)
    return out


def _where(line_number: int | None, column: int | None = None) -> str:
  where = 'tree' if line_number is None else f'line {line_number}'
  return where if column is None else f'{where}, column {column + 1}'


_LABELS = {str(label): label for label in range(NUM_CLASSES)}


def parse_tree(line: str, line_number: int | None = None) -> Tree:
  """Parses one PTB sentiment tree such as ``(3 (2 It) (4 (2 's) (3 good)))``.

  Every node is ``(label child ...)`` or, for a leaf, ``(label word)``.

  Args:
    line: the tree, on one line.
    line_number: 1-based line number used in error messages.

  Raises:
    ValueError naming the line (and column) on unbalanced parentheses, a bad or
    missing label, a node mixing words and subtrees, an empty node, or text outside
    the tree.
  """
  tokens = _TOKEN.findall(line)

  def fail(message: str, token_index: int | None = None):
    column = None
    if token_index is not None:  # columns are only worked out on the error path
      column = [match.start() for match in _TOKEN.finditer(line)][token_index]
    raise ValueError(f'{_where(line_number, column)}: {message}')

  if not tokens:
    fail('empty line, expected a tree')
  if tokens[0] != '(':
    fail(f"a tree must start with '(', got {tokens[0]!r}", 0)
  # each open node on the stack: [label, children, words, index of its '(' token]
  stack: list[list] = []
  root = None
  i = 0
  num_tokens = len(tokens)
  while i < num_tokens:
    token = tokens[i]
    if root is not None:
      fail(f'unexpected {token!r} after the end of the tree (unbalanced parentheses?)', i)
    if token == '(':
      if i + 1 >= num_tokens or tokens[i + 1] in ('(', ')'):
        fail('missing label after "("', i)
      label = _LABELS.get(tokens[i + 1])
      if label is None:
        fail(f'bad label {tokens[i + 1]!r}, expected an integer 0..{NUM_CLASSES - 1}', i + 1)
      stack.append([label, [], [], i])
      i += 2
      continue
    if token == ')':
      if not stack:
        fail("unbalanced parentheses, ')' with no matching '('", i)
      label, children, words, open_index = stack.pop()
      if words and children:
        fail(f'a node mixes words {words} and subtrees', open_index)
      if len(words) > 1:
        fail(f'a leaf holds several words {words}; expected (label word)', open_index)
      if not words and not children:
        fail(f'empty node ({label})', open_index)
      node = Tree(label, tuple(children), words[0] if words else None)
      if stack:
        stack[-1][1].append(node)
      else:
        root = node
    else:
      if not stack:
        fail(f'word {token!r} outside any node', i)
      stack[-1][2].append(token)
    i += 1
  if stack:
    fail(f"unbalanced parentheses, {len(stack)} '(' never closed")
  return root


@dataclasses.dataclass(frozen=True)
class SstExample:
  """One SST sentence.

  Attributes:
    text: the words joined by single spaces.
    words: the leaf tokens, PTB escapes undone (see the module docstring).
    label: the root (sentence) label, 0..4.
    word_labels: the label of each leaf node, aligned with ``words``.
    tree: the parsed tree (leaves as written in the file).
  """
  text: str
  words: tuple[str, ...]
  label: int
  word_labels: tuple[int, ...]
  tree: Tree = dataclasses.field(repr=False, compare=False)

  def phrases(self) -> list[tuple[str, int]]:
    """``(text, label)`` of every subtree (the sentence first, leaves included), pre-order."""
    return [(' '.join(self.words[start:end]), label) for start, end, label in self.tree.spans()]


def example_from_tree(tree: Tree, unescape: Unescape = 'ptb') -> SstExample:
  words = tuple(unescape_leaf(leaf, unescape) for leaf in tree.leaves)
  return SstExample(' '.join(words), words, tree.label, tuple(tree.leaf_labels), tree)


def read_sst(path: str | os.PathLike, unescape: Unescape = 'ptb',
             limit: int | None = None) -> list[SstExample]:
  """Reads a file of PTB sentiment trees, one per line (blank lines are skipped).

  ``limit`` stops after that many trees (the rest of the file is not parsed).

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: on a malformed tree, naming the line number.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'SST tree file not found: {path} (expected a PTB tree file such as '
                            f'<data_dir>/sst/dev.txt; see dmx.data.sst.sst_split_path)')
  examples = []
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if len(examples) == limit:
        break
      if not line.strip():
        continue
      try:
        tree = parse_tree(line, line_number)
      except ValueError as error:
        raise ValueError(f'{path}: {error}') from None
      examples.append(example_from_tree(tree, unescape))
  return examples


def _repo_root() -> Path:
  return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
  """``$DMX_DATA_DIR`` if set, else the first existing of ``<repo>/../shared/data`` and
  ``<cwd>/../shared/data`` (the repo-relative one when neither exists)."""
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV]).expanduser()
  candidates = [_repo_root().parent / 'shared' / 'data', Path.cwd().parent / 'shared' / 'data']
  for candidate in candidates:
    if candidate.is_dir():
      return candidate
  return candidates[0]


def sst_split_path(split: str, data_dir: str | os.PathLike | None = None) -> Path:
  """The path of ``<data_dir>/sst/<split>.txt`` (or ``<data_dir>/<split>.txt``).

  ``data_dir`` defaults to :func:`default_data_dir`. Raises FileNotFoundError naming
  the paths tried when neither exists.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  data_dir = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
  candidates = [data_dir / 'sst' / f'{split}.txt', data_dir / f'{split}.txt']
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f'SST {split} split not found: tried {", ".join(map(str, candidates))} '
                          f'(pass data_dir or set {DATA_DIR_ENV})')


def load_sst(split: str, data_dir: str | os.PathLike | None = None,
             unescape: Unescape = 'ptb', limit: int | None = None) -> list[SstExample]:
  """``read_sst(sst_split_path(split, data_dir), unescape, limit)``."""
  return read_sst(sst_split_path(split, data_dir), unescape, limit)


def load_sst_tfds(split: str = 'train', unescape: Unescape = 'ptb',
                  **load_kwargs) -> list[SstExample]:
  """SST-5 from TensorFlow Datasets (``huggingface:sst/ptb``, needs network on first use).

  ``split`` is 'train', 'dev' (TFDS 'validation') or 'test'. tensorflow_datasets is
  imported here only; it is not a dependency of dmx. Untested offline.
  """
  tfds = import_tfds('load_sst_tfds', 'read the PTB files with read_sst / load_sst')
  tfds_split = {'dev': 'validation'}.get(split, split)
  dataset = tfds.load('huggingface:sst/ptb', split=tfds_split, **load_kwargs)
  examples = []
  for index, row in enumerate(tfds.as_numpy(dataset)):
    tree = row['ptb_tree']
    tree = tree.decode('utf-8') if isinstance(tree, bytes) else str(tree)
    examples.append(example_from_tree(parse_tree(tree, index + 1), unescape))
  return examples


@dataclasses.dataclass(frozen=True)
class SstFeatures:
  """Tokenised SST sentences, padded to ``max_length`` (``S``).

  Attributes:
    input_ids: ``(N, S)`` int32, ``[CLS] sentence [SEP]`` then padding.
    mask: ``(N, S)`` bool, true on real tokens (special tokens included).
    token_type_ids: ``(N, S)`` int32, all zeros.
    labels: ``(N,)`` int32, the sentence labels 0..4.
    word_ids: ``(N, S)`` int32, the index of the word (leaf) each wordpiece comes from,
      -1 on special tokens and padding.
    word_labels: ``(N, W)`` int32, the leaf labels, -1 past the sentence's last word
      (``W`` is the most words of any sentence).
    num_words: ``(N,)`` int32, words per sentence.
    lengths: ``(N,)`` int32, tokens per sentence before truncation, specials included.
    truncated: ``(N,)`` bool, true where ``lengths > max_length``.
  """
  input_ids: np.ndarray
  mask: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  word_ids: np.ndarray
  word_labels: np.ndarray
  num_words: np.ndarray
  lengths: np.ndarray
  truncated: np.ndarray

  @property
  def num_truncated(self) -> int:
    """How many sentences lost tokens to truncation."""
    return int(self.truncated.sum())

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices) -> 'SstFeatures':
    return SstFeatures(*(getattr(self, field.name)[indices] for field in dataclasses.fields(self)))

  def as_batch(self) -> dict:
    """The model's batch dict: ``input_ids``, ``mask``, ``token_type_ids``."""
    return {'input_ids': self.input_ids, 'mask': self.mask, 'token_type_ids': self.token_type_ids}


def word_piece_ids(sentences: Sequence[Sequence[str]], tokenizer) -> list[list[int]]:
  """The ids of ``[CLS] pieces [SEP]`` of each sentence given as words (pre-split, untruncated)."""
  if not sentences:
    return []
  return tokenizer([list(words) for words in sentences], is_split_into_words=True,
                   add_special_tokens=True, truncation=False)['input_ids']


def token_lengths(examples: Sequence[SstExample], tokenizer) -> np.ndarray:
  """``(N,)`` int32, the number of tokens of each sentence, special tokens included."""
  return np.array([len(ids) for ids in word_piece_ids([e.words for e in examples], tokenizer)],
                  np.int32)


def check_fits(examples: Sequence[SstExample], tokenizer, max_length: int = 84) -> np.ndarray:
  """Raises ValueError naming the first sentence longer than ``max_length`` tokens.

  Returns the ``(N,)`` token lengths (special tokens included) when all fit.
  """
  lengths = token_lengths(examples, tokenizer)
  too_long = np.flatnonzero(lengths > max_length)
  if too_long.size:
    index = int(too_long[0])
    raise ValueError(f'sentence {index} has {lengths[index]} tokens (special tokens included) '
                     f'but max_length is {max_length}; {too_long.size} sentence(s) too long: '
                     f'{examples[index].text[:80]!r}')
  return lengths


def encode_sst(examples: Sequence[SstExample], tokenizer, max_length: int = 84,
               strict: bool = False) -> SstFeatures:
  """Tokenises sentences as ``[CLS] words [SEP]`` with a fast (BERT) tokenizer.

  The words are given to the tokenizer pre-split (``is_split_into_words``), so each
  wordpiece knows its leaf. Longer sentences are truncated (the final ``[SEP]`` is
  kept) and counted in ``num_truncated``; with ``strict=True`` they raise instead
  (see :func:`check_fits`).
  """
  require_fast_tokenizer(tokenizer, 'word ids')
  if not examples:
    raise ValueError('encode_sst needs at least one example')
  lengths = check_fits(examples, tokenizer, max_length) if strict else token_lengths(
      examples, tokenizer)
  encoded = tokenizer([list(example.words) for example in examples], is_split_into_words=True,
                      add_special_tokens=True, truncation=True, max_length=max_length,
                      padding='max_length', return_token_type_ids=True, return_attention_mask=True)
  num = len(examples)
  input_ids = np.asarray(encoded['input_ids'], np.int32).reshape(num, max_length)
  mask = np.asarray(encoded['attention_mask'], np.int32).reshape(num, max_length).astype(bool)
  token_type_ids = np.asarray(encoded['token_type_ids'], np.int32).reshape(num, max_length)
  word_ids = np.array([[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(num)],
                      np.int32).reshape(num, max_length)
  num_words = np.array([len(example.words) for example in examples], np.int32)
  word_labels = np.full((num, int(num_words.max())), -1, np.int32)
  for i, example in enumerate(examples):
    word_labels[i, :len(example.word_labels)] = example.word_labels
  labels = np.array([example.label for example in examples], np.int32)
  return SstFeatures(input_ids, mask, token_type_ids, labels, word_ids, word_labels, num_words,
                     lengths, lengths > max_length)


def pool_word_scores(token_scores: np.ndarray, word_ids: np.ndarray, num_words: int | None = None,
                     reduction: Literal['mean', 'sum', 'max'] = 'mean') -> np.ndarray:
  """Pools per-wordpiece scores ``(N, S)`` into per-word scores ``(N, W)``.

  ``word_ids`` is :attr:`SstFeatures.word_ids`; tokens with id -1 are ignored. Words
  with no wordpiece (truncated away, or past the sentence) get NaN. ``W`` defaults to
  the largest word id plus one.
  """
  token_scores = np.asarray(token_scores, np.float64)
  word_ids = np.asarray(word_ids)
  if token_scores.shape != word_ids.shape:
    raise ValueError(f'token_scores {token_scores.shape} and word_ids {word_ids.shape} differ')
  if num_words is None:
    num_words = int(word_ids.max()) + 1 if word_ids.size else 0
  rows, cols = np.nonzero((word_ids >= 0) & (word_ids < num_words))
  words = word_ids[rows, cols]
  values = token_scores[rows, cols]
  counts = np.zeros((token_scores.shape[0], num_words))
  np.add.at(counts, (rows, words), 1.0)
  if reduction == 'max':
    pooled = np.full(counts.shape, -np.inf)
    np.maximum.at(pooled, (rows, words), values)
  elif reduction in ('mean', 'sum'):
    pooled = np.zeros(counts.shape)
    np.add.at(pooled, (rows, words), values)
    if reduction == 'mean':
      pooled = pooled / np.maximum(counts, 1.0)
  else:
    raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {reduction!r}")
  return np.where(counts > 0, pooled, np.nan)


def iterate_batches(features: SstFeatures, batch_size: int, rng: np.random.Generator | None = None,
                    drop_remainder: bool = False) -> Iterator[tuple[dict, np.ndarray]]:
  """``(batch_dict, labels)`` pairs, in order or shuffled by ``rng``.

  ``batch_dict`` holds ``input_ids`` ``(B, S)`` int32, ``mask`` ``(B, S)`` bool and
  ``token_type_ids`` ``(B, S)`` int32; ``labels`` is ``(B,)`` int32.
  """
  for indices in batch_indices(len(features), batch_size, rng, drop_remainder):
    batch = features.take(indices)
    yield batch.as_batch(), batch.labels
