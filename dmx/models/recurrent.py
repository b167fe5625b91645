"""A small recurrent SST-5 classifier whose forward passes are cheap enough for exact erasure.

``token ids -> embedding (h0) -> (bi)directional GRU or LSTM (h1) -> linear
classifier on the final states``: the forward direction's state at the last
real token and, when bidirectional, the backward direction's state at the
first token (the backward RNN reads only the real tokens, so padding never
reaches the classifier). It serves the per-example mask search of the paper's
sec. 4.2.1 (Table 2): exact erasure tries tens of thousands of subsets per
sentence, which a BERT cannot afford on a CPU and this model can.

Its tokens are either

* words: lower-cased, the vocabulary is the words of the training sentences
  seen at least ``min_count`` times, the rest map to ``<unk>``, embeddings
  trained from scratch; or
* word pieces of a pretrained BERT-family tokenizer, ``[CLS] pieces [SEP]``,
  over that model's word embeddings, frozen: the original's recurrent SST
  classifier (a unidirectional GRU over frozen BERT embeddings).

It implements :class:`dmx.models.base.MaskableModel` over two states, ``h0``
the word embeddings and ``h1`` the RNN outputs per position; batches are dicts
with ``input_ids`` ``(batch, seq)`` int32 and ``mask`` ``(batch, seq)`` bool.
:func:`train_recurrent_classifier` trains it with Adam (dropout on the
embeddings, the best dev epoch kept) and :func:`save_recurrent` /
:func:`load_recurrent` store the parameters with their config and vocabulary
(a :mod:`dmx.checkpoint` folder).

The toy model's GRU (:mod:`dmx.models.toy`) is one flax line,
``nn.RNN(nn.GRUCell)``, reading the padding; this one passes ``seq_lengths``
so that padding is never read, which is what makes an example's outputs
independent of how far its batch is padded.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dmx import checkpoint
from dmx.data.common import batch_indices
from dmx.data.sst import word_piece_ids

PAD, UNK = '<pad>', '<unk>'
PAD_ID, UNK_ID = 0, 1
CELLS = ('gru', 'lstm')
STATE_NAMES = ('embedding', 'recurrent')
MODEL_KIND = 'dmx recurrent classifier'
TOKENIZER_FOLDER = 'tokenizer'  # a word-piece model's tokenizer, inside its checkpoint folder


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Sizes of the recurrent classifier.

  Attributes:
    vocab_size: rows of the embedding table (``<pad>`` and ``<unk>`` included).
    embedding_dim: width of ``h0``.
    hidden_dim: width of each direction's RNN state.
    cell: ``'gru'`` or ``'lstm'``.
    bidirectional: add a backward RNN; ``h1`` is then ``2 * hidden_dim`` wide.
    num_classes: output classes (SST-5: 5).
  """
  vocab_size: int
  embedding_dim: int = 64
  hidden_dim: int = 64
  cell: str = 'gru'
  bidirectional: bool = True
  num_classes: int = 5

  def __post_init__(self):
    if self.cell not in CELLS:
      raise ValueError(f'cell must be one of {CELLS}, got {self.cell!r}')
    if self.vocab_size < 2:
      raise ValueError(f'vocab_size must be >= 2 (<pad> and <unk>), got {self.vocab_size}')
    for name in ('embedding_dim', 'hidden_dim', 'num_classes'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')

  @property
  def recurrent_dim(self) -> int:
    return self.hidden_dim * (2 if self.bidirectional else 1)

  @classmethod
  def tiny(cls, vocab_size: int, **overrides) -> 'RecurrentConfig':
    return cls(vocab_size=vocab_size, **{'embedding_dim': 8, 'hidden_dim': 8, **overrides})


class Vocabulary(NamedTuple):
  """Words by id (``words[0] = '<pad>'``, ``words[1] = '<unk>'``) and the inverse map."""
  words: tuple[str, ...]
  ids: dict

  @classmethod
  def from_words(cls, words: Sequence[str]) -> 'Vocabulary':
    words = tuple(words)
    if words[:2] != (PAD, UNK):
      raise ValueError(f'a vocabulary starts with {PAD!r}, {UNK!r}; got {words[:2]}')
    if len(set(words)) != len(words):
      raise ValueError('a vocabulary lists each word once')
    return cls(words, {word: index for index, word in enumerate(words)})

  def __len__(self) -> int:
    return len(self.words)

  def lookup(self, word: str) -> int:
    return self.ids.get(word.lower(), UNK_ID)


def build_vocabulary(sentences: Sequence[Sequence[str]], min_count: int = 2) -> Vocabulary:
  """The lower-cased words seen at least ``min_count`` times, most frequent first (ties: alphabetical).

  Words seen less often become ``<unk>``, which then has training examples.
  """
  if min_count < 1:
    raise ValueError(f'min_count must be >= 1, got {min_count}')
  counts = collections.Counter(word.lower() for words in sentences for word in words)
  kept = sorted((word for word, count in counts.items() if count >= min_count and
                 word not in (PAD, UNK)), key=lambda word: (-counts[word], word))
  return Vocabulary.from_words((PAD, UNK, *kept))


def encode_words(sentences: Sequence[Sequence[str]], vocabulary: Vocabulary,
                 length: int | None = None) -> dict:
  """The model's batch for tokenised sentences: ``input_ids`` ``(N, S)`` int32, ``mask`` ``(N, S)`` bool.

  ``S`` is ``length``, or the longest sentence when ``None``. Raises ValueError
  for an empty sentence or one longer than ``length``.
  """
  lengths = [len(words) for words in sentences]
  if any(n == 0 for n in lengths):
    raise ValueError(f'sentence {lengths.index(0)} has no words')
  longest = max(lengths, default=1)
  length = longest if length is None else length
  if longest > length:
    raise ValueError(f'a sentence has {longest} words, more than length={length}')
  input_ids = np.full((len(sentences), length), PAD_ID, np.int32)
  for row, words in enumerate(sentences):
    input_ids[row, :len(words)] = [vocabulary.lookup(word) for word in words]
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  return {'input_ids': input_ids, 'mask': mask}


def encode_pieces(sentences: Sequence[Sequence[str]], tokenizer, length: int | None = None
                  ) -> dict:
  """The batch of a word-piece model: ``input_ids`` ``[CLS] pieces [SEP]`` ``(N, S)`` and ``mask``.

  ``S`` is ``length``, or the longest sentence when ``None`` (ValueError if one
  is longer). Padding positions hold id 0 and are never read.
  """
  if any(len(words) == 0 for words in sentences):
    raise ValueError('a sentence has no words')
  pieces = word_piece_ids(sentences, tokenizer)
  lengths = [len(ids) for ids in pieces]
  longest = max(lengths, default=1)
  length = longest if length is None else length
  if longest > length:
    raise ValueError(f'a sentence has {longest} word pieces, more than length={length}')
  input_ids = np.zeros((len(sentences), length), np.int32)
  for row, ids in enumerate(pieces):
    input_ids[row, :len(ids)] = ids
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  return {'input_ids': input_ids, 'mask': mask}


def encode_sentences(sentences: Sequence[Sequence[str]], vocabulary: Vocabulary | None,
                     tokenizer, length: int | None = None) -> dict:
  """:func:`encode_pieces` with ``tokenizer`` when it is given, else :func:`encode_words`."""
  if tokenizer is not None:
    return encode_pieces(sentences, tokenizer, length)
  return encode_words(sentences, vocabulary, length)


def _cell(config: RecurrentConfig):
  if config.cell == 'gru':
    return nn.GRUCell(features=config.hidden_dim)
  return nn.OptimizedLSTMCell(features=config.hidden_dim)


def last_real_state(states: jax.Array, mask: jax.Array) -> jax.Array:
  """``(batch, seq, dim), (batch, seq) -> (batch, dim)``: the state at each row's last real position."""
  last = jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]


class RecurrentClassifier(nn.Module):
  """Flax module; its methods are the stages between the states ``h0`` and ``h1``."""
  config: RecurrentConfig

  def setup(self):
    c = self.config
    self.embedding = nn.Embed(c.vocab_size, c.embedding_dim)
    self.forward_rnn = nn.RNN(_cell(c))
    if c.bidirectional:
      # keep_order: outputs stay aligned with the input, so the backward final
      # state sits at position 0; seq_lengths makes it read only real words
      self.backward_rnn = nn.RNN(_cell(c), reverse=True, keep_order=True)
    self.classifier = nn.Dense(c.num_classes)

  def embed(self, input_ids):
    """``(batch, seq) int -> h0 (batch, seq, embedding_dim)``."""
    return self.embedding(input_ids)

  def recurrent(self, embedded, mask):
    """``h0 (batch, seq, e), mask (batch, seq) -> h1 (batch, seq, recurrent_dim)``."""
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
    outputs = self.forward_rnn(embedded, seq_lengths=lengths)
    if self.config.bidirectional:
      outputs = jnp.concatenate([outputs, self.backward_rnn(embedded, seq_lengths=lengths)], -1)
    return outputs

  def classify(self, recurrent_states, mask):
    """Logits ``(batch, num_classes)`` from the final state(s) of ``h1``."""
    hidden = self.config.hidden_dim
    final = last_real_state(recurrent_states[..., :hidden], mask)
    if self.config.bidirectional:
      final = jnp.concatenate([final, recurrent_states[:, 0, hidden:]], axis=-1)
    return self.classifier(final)

  def __call__(self, input_ids, mask):
    h0 = self.embed(input_ids)
    h1 = self.recurrent(h0, mask)
    return self.classify(h1, mask), (h0, h1)


class RecurrentModel:
  """A :class:`dmx.models.base.MaskableModel` over :class:`RecurrentClassifier`.

  States: ``h0`` the word embeddings, ``h1`` the RNN outputs. Batches are
  dicts with ``input_ids`` and ``mask`` (see :func:`encode_words`).
  """

  def __init__(self, config: RecurrentConfig):
    self.config = config
    self.module = RecurrentClassifier(config)

  @property
  def state_dims(self) -> tuple[int, ...]:
    return (self.config.embedding_dim, self.config.recurrent_dim)

  def init(self, key: jax.Array, length: int = 8):
    return self.module.init(key, jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool))

  def forward(self, params, batch):
    """Clean pass: ``(logits (batch, num_classes), (h0, h1))``."""
    return self.module.apply(params, batch['input_ids'], batch['mask'])

  def forward_from(self, params, batch, states, layer_index, intervention):
    """Masked pass from state ``layer_index`` (traced is fine: ``lax.switch``)."""
    mask = batch['mask']

    def from_embedding(params, states):
      h0 = intervention(0, states[0])
      h1 = self.module.apply(params, h0, mask, method=RecurrentClassifier.recurrent)
      return self.module.apply(params, h1, mask, method=RecurrentClassifier.classify)

    def from_recurrent(params, states):
      h1 = intervention(1, states[1])
      return self.module.apply(params, h1, mask, method=RecurrentClassifier.classify)

    if isinstance(layer_index, int):
      return (from_embedding, from_recurrent)[layer_index](params, states)
    return jax.lax.switch(layer_index, (from_embedding, from_recurrent), params, tuple(states))


class TrainedRecurrent(NamedTuple):
  """A trained classifier: the model, its parameters, tokenisation and training record.

  ``vocabulary`` is the word vocabulary, or ``None`` for a word-piece model,
  whose ``tokenizer`` (a fast Hugging Face tokenizer) encodes its inputs (see
  :func:`encode`). ``history`` holds one dict per epoch (``epoch``, ``loss``,
  ``dev_accuracy``); ``dev_accuracy`` is the kept epoch's.
  """
  model: RecurrentModel
  params: dict
  vocabulary: Vocabulary | None
  dev_accuracy: float
  history: list
  tokenizer: object = None

  def encode(self, sentences: Sequence[Sequence[str]], length: int | None = None) -> dict:
    """The model's batch for sentences given as words (see :func:`encode_sentences`)."""
    return encode_sentences(sentences, self.vocabulary, self.tokenizer, length)

  def token_counts(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
    """``(N,)`` tokens per sentence, the rows of its ``h0``."""
    if self.tokenizer is not None:
      return np.array([len(ids) for ids in word_piece_ids(sentences, self.tokenizer)])
    return np.array([len(words) for words in sentences])


def make_predictor(model: RecurrentModel) -> Callable:
  """A jitted ``(params, batch) -> (batch,)`` argmax of the logits (build once, call often)."""
  return jax.jit(lambda params, batch: jnp.argmax(model.forward(params, batch)[0], axis=-1))


def accuracy(model: RecurrentModel, params, batch: dict, labels: np.ndarray,
             batch_size: int = 256, predict: Callable | None = None) -> float:
  """Fraction of the rows of ``batch`` (numpy arrays) whose argmax equals ``labels``.

  ``predict`` is a :func:`make_predictor` to reuse (one compilation across calls).
  """
  predict = make_predictor(model) if predict is None else predict
  labels = np.asarray(labels)
  correct = 0
  for indices in batch_indices(len(labels), batch_size):
    rows = {name: value[indices] for name, value in batch.items()}
    correct += int(np.sum(np.asarray(predict(params, rows)) == labels[indices]))
  return correct / max(len(labels), 1)


def train_recurrent_classifier(train_sentences: Sequence[Sequence[str]], train_labels,
                               dev_sentences: Sequence[Sequence[str]], dev_labels, *,
                               config_overrides: dict | None = None, min_count: int = 2,
                               seed: int = 0, epochs: int = 10, batch_size: int = 32,
                               learning_rate: float = 2e-3, weight_decay: float = 1e-4,
                               embedding_dropout: float = 0.3, progress: bool = True,
                               log: Callable[[str], None] | None = None,
                               tokenizer=None, frozen_embeddings: np.ndarray | None = None
                               ) -> TrainedRecurrent:
  """Trains a :class:`RecurrentModel` with AdamW and cross-entropy; keeps the best dev epoch.

  Without ``tokenizer`` the tokens are words and the vocabulary is built from
  ``train_sentences`` (:func:`build_vocabulary`); with it they are its word
  pieces (:func:`encode_pieces`). Dropout (rate ``embedding_dropout``) is
  applied to ``h0`` through ``forward_from``, so training and masking share one
  code path. Batches are padded to the longest training sentence (one
  compiled step).

  Args:
    train_sentences, dev_sentences: lists of words per sentence.
    train_labels, dev_labels: ``(N,)`` ints in ``[0, num_classes)``.
    config_overrides: fields of :class:`RecurrentConfig` besides ``vocab_size``
      (and ``embedding_dim`` with ``frozen_embeddings``).
    tokenizer: a fast Hugging Face tokenizer: the model reads its word pieces.
    frozen_embeddings: ``(vocab_size, embedding_dim)`` the embedding table,
      kept fixed (only the RNN and the classifier train); needs ``tokenizer``.
  """
  if epochs < 1 or batch_size < 1:
    raise ValueError(f'epochs and batch_size must be >= 1, got {epochs}, {batch_size}')
  if not 0.0 <= embedding_dropout < 1.0:
    raise ValueError(f'embedding_dropout must lie in [0, 1), got {embedding_dropout}')
  overrides = dict(config_overrides or {})
  if tokenizer is None:
    if frozen_embeddings is not None:
      raise ValueError('frozen_embeddings index a tokenizer\'s word pieces: pass the tokenizer')
    vocabulary = build_vocabulary(train_sentences, min_count)
    vocab_size = len(vocabulary)
  else:
    vocabulary, vocab_size = None, len(tokenizer)
  if frozen_embeddings is not None:
    frozen_embeddings = np.asarray(frozen_embeddings, np.float32)
    if frozen_embeddings.ndim != 2 or frozen_embeddings.shape[0] != vocab_size:
      raise ValueError(f'frozen_embeddings must be ({vocab_size}, width), the tokenizer\'s '
                       f'vocabulary; got {frozen_embeddings.shape}')
    overrides['embedding_dim'] = frozen_embeddings.shape[1]
  config = RecurrentConfig(vocab_size=vocab_size, **overrides)
  model = RecurrentModel(config)
  train = encode_sentences(train_sentences, vocabulary, tokenizer)
  dev = encode_sentences(dev_sentences, vocabulary, tokenizer)
  train_labels = np.asarray(train_labels, np.int32)
  dev_labels = np.asarray(dev_labels, np.int32)
  if train_labels.min() < 0 or train_labels.max() >= config.num_classes:
    raise ValueError(f'labels must lie in [0, {config.num_classes})')
  key = jax.random.key(seed)
  params = model.init(key)
  table = None
  if frozen_embeddings is not None:
    # the frozen table is an argument of the step, not a trained parameter: no
    # gradient is formed for its rows and the optimiser never holds it
    table = jnp.asarray(frozen_embeddings)
    del params['params']['embedding']
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = optimizer.init(params)

  def with_table(trainable, table):
    if table is None:
      return trainable
    return {'params': {**trainable['params'], 'embedding': {'embedding': table}}}

  @jax.jit
  def train_step(params, opt_state, batch, labels, key, table):
    def loss_fn(params):
      full = with_table(params, table)
      _, states = model.forward(full, batch)
      keep = jax.random.bernoulli(key, 1.0 - embedding_dropout, states[0].shape)
      dropped = lambda index, h0: jnp.where(keep, h0 / (1.0 - embedding_dropout), 0.0)
      logits = model.forward_from(full, batch, states, 0, dropped)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = make_predictor(model)
  rng = np.random.default_rng(seed)
  best_params, best_accuracy, history = with_table(params, table), -1.0, []
  bar = tqdm(range(epochs), desc='recurrent classifier', unit='epoch', disable=not progress)
  for epoch in bar:
    losses = []
    for indices in batch_indices(len(train_labels), batch_size, rng, drop_remainder=True):
      key, step_key = jax.random.split(key)
      batch = {name: value[indices] for name, value in train.items()}
      params, opt_state, loss = train_step(params, opt_state, batch, train_labels[indices],
                                           step_key, table)
      losses.append(loss)
    dev_accuracy = accuracy(model, with_table(params, table), dev, dev_labels, predict=predict)
    history.append(dict(epoch=epoch, loss=float(np.mean(jax.device_get(losses))),
                        dev_accuracy=dev_accuracy))
    bar.set_postfix(loss=f'{history[-1]["loss"]:.3f}', dev=f'{dev_accuracy:.3f}')
    if log is not None:
      log(f'epoch {epoch}: loss {history[-1]["loss"]:.4f}, dev accuracy {dev_accuracy:.4f}')
    if dev_accuracy > best_accuracy:
      best_params = jax.tree_util.tree_map(jnp.array, with_table(params, table))
      best_accuracy = dev_accuracy
  return TrainedRecurrent(model, best_params, vocabulary, best_accuracy, history, tokenizer)


def save_recurrent(path: str | os.PathLike, trained: TrainedRecurrent,
                   extra_metadata: dict | None = None) -> Path:
  """Writes the parameters, config, tokenisation and history to the checkpoint folder ``path``.

  A word-piece model's tokenizer is saved in ``path/tokenizer``, so the
  folder stands alone.
  """
  metadata = dict(kind=MODEL_KIND, config=dataclasses.asdict(trained.model.config),
                  vocabulary=None if trained.vocabulary is None else list(trained.vocabulary.words),
                  tokens='words' if trained.tokenizer is None else 'word pieces',
                  dev_accuracy=trained.dev_accuracy, history=trained.history,
                  **(extra_metadata or {}))
  path = checkpoint.save(path, trained.params, metadata)
  if trained.tokenizer is not None:
    trained.tokenizer.save_pretrained(str(path / TOKENIZER_FOLDER))
  return path


def load_recurrent(path: str | os.PathLike) -> tuple[TrainedRecurrent, dict]:
  """The classifier :func:`save_recurrent` wrote, and its full metadata.

  Raises :class:`dmx.checkpoint.CheckpointError` when ``path`` holds no
  recurrent classifier.
  """
  metadata = checkpoint.read_metadata(path)
  if metadata.get('kind') != MODEL_KIND:
    raise checkpoint.CheckpointError(f'{path}: not a {MODEL_KIND} (kind {metadata.get("kind")!r})')
  model = RecurrentModel(RecurrentConfig(**metadata['config']))
  target = model.init(jax.random.key(0))
  params = checkpoint.restore(path, target)
  if metadata.get('tokens', 'words') == 'words':
    vocabulary, tokenizer = Vocabulary.from_words(metadata['vocabulary']), None
  else:
    folder = Path(path).absolute() / TOKENIZER_FOLDER
    if not folder.is_dir():
      raise checkpoint.CheckpointError(f'{path}: a word-piece classifier without its tokenizer '
                                       f'({folder} is missing)')
    import transformers  # pylint: disable=import-outside-toplevel
    vocabulary, tokenizer = None, transformers.AutoTokenizer.from_pretrained(str(folder))
  return TrainedRecurrent(model, params, vocabulary, metadata['dev_accuracy'],
                          metadata['history'], tokenizer), metadata
