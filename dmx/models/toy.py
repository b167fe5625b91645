"""The paper's toy classifier (sec. 4.1) and its DiffMask interface.

``digits -> embedding (h0) -> feed-forward network on [q(n); q(m); h0_i]
(h1) -> one-layer unidirectional GRU (h2) -> linear classifier on the last
real position``. The query has its own embedding table. The feed-forward
network is ``Dense -> activation -> Dense(feedforward_dim)``; its output, 2-d by
default, is the bottleneck whose states the paper plots (Fig. 12). It sees the
query and the GRU cannot count before it (paper footnote 7), so after ``h1``
only "is x_i n, m or neither" matters: the ground truth for attributions to
``h1``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dmx.data.toy import NUM_DIGITS, ToyData, iterate_batches

STATE_NAMES = ('embedding', 'feedforward', 'gru')
ACTIVATIONS = {'relu': jax.nn.relu, 'tanh': jnp.tanh}


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
  """Sizes of the toy classifier; ``feedforward_dim=2`` is the paper's bottleneck."""
  embedding_dim: int = 64
  feedforward_hidden_dim: int = 64
  feedforward_dim: int = 2
  gru_dim: int = 64
  feedforward_activation: str = 'tanh'

  def __post_init__(self):
    if self.feedforward_activation not in ACTIVATIONS:
      raise ValueError(f'feedforward_activation must be one of {tuple(ACTIVATIONS)}, '
                       f'got {self.feedforward_activation!r}')
    for field in dataclasses.fields(self):
      if field.type == 'int' and getattr(self, field.name) < 1:
        raise ValueError(f'{field.name} must be >= 1, got {getattr(self, field.name)}')

  @classmethod
  def tiny(cls) -> 'ToyModelConfig':
    return cls(embedding_dim=8, feedforward_hidden_dim=8, gru_dim=8)


class ToyClassifier(nn.Module):
  """Flax module; its methods are the stages between the states ``h0, h1, h2``."""
  config: ToyModelConfig

  def setup(self):
    self.embedding = nn.Embed(NUM_DIGITS, self.config.embedding_dim)
    self.query_embedding = nn.Embed(NUM_DIGITS, self.config.embedding_dim)
    self.feedforward_hidden = nn.Dense(self.config.feedforward_hidden_dim)
    self.feedforward_out = nn.Dense(self.config.feedforward_dim)
    self.gru = nn.RNN(nn.GRUCell(features=self.config.gru_dim))
    self.classifier = nn.Dense(2)  # the toy task is binary: count(n) > count(m)

  def embed(self, digits):
    """``(batch, seq) int -> h0 (batch, seq, embedding_dim)``."""
    return self.embedding(digits)

  def feedforward(self, query, embedded):
    """``query (batch, 2), h0 (batch, seq, e) -> h1 (batch, seq, feedforward_dim)``."""
    query_embedded = self.query_embedding(query).reshape(query.shape[0], 1, -1)
    query_embedded = jnp.broadcast_to(query_embedded, embedded.shape[:2] + query_embedded.shape[-1:])
    activation = ACTIVATIONS[self.config.feedforward_activation]
    hidden = activation(self.feedforward_hidden(jnp.concatenate([query_embedded, embedded], -1)))
    return self.feedforward_out(hidden)

  def recurrent(self, hidden):
    """``h1 (batch, seq, f) -> h2 (batch, seq, gru_dim)``."""
    return self.gru(hidden)

  def classify(self, recurrent_states, mask):
    """Logits from the GRU state at the last real position: ``(batch, 2)``."""
    last = jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.int32) - 1, 0)
    final = jnp.take_along_axis(recurrent_states, last[:, None, None], axis=1)[:, 0]
    return self.classifier(final)

  def __call__(self, digits, query, mask):
    h0 = self.embed(digits)
    h1 = self.feedforward(query, h0)
    h2 = self.recurrent(h1)
    return self.classify(h2, mask), (h0, h1, h2)


class ToyModel:
  """A :class:`dmx.models.base.MaskableModel` over :class:`ToyClassifier`.

  States: ``h0`` the digit embeddings, ``h1`` the feed-forward states, ``h2``
  the GRU states. Batches are dicts with ``digits``, ``query`` and ``mask``.
  """

  def __init__(self, config: ToyModelConfig = ToyModelConfig()):
    self.config = config
    self.module = ToyClassifier(config)

  @property
  def state_dims(self) -> tuple[int, ...]:
    c = self.config
    return (c.embedding_dim, c.feedforward_dim, c.gru_dim)

  def init(self, key: jax.Array, max_length: int = 10):
    digits = jnp.zeros((1, max_length), jnp.int32)
    return self.module.init(key, digits, jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, max_length), bool))

  def forward(self, params, batch):
    """Clean pass: ``(logits (batch, 2), (h0, h1, h2))``."""
    return self.module.apply(params, batch['digits'], batch['query'], batch['mask'])

  def forward_from(self, params, batch, states, layer_index, intervention):
    """Masked pass from state ``layer_index`` (traced is fine: ``lax.switch``)."""
    query, mask = batch['query'], batch['mask']

    def from_embedding(params, states):
      h0 = intervention(0, states[0])
      h1 = self.module.apply(params, query, h0, method=ToyClassifier.feedforward)
      return from_feedforward(params, (h0, h1, states[2]), replace=False)

    def from_feedforward(params, states, replace=True):
      h1 = intervention(1, states[1]) if replace else states[1]
      h2 = self.module.apply(params, h1, method=ToyClassifier.recurrent)
      return from_gru(params, (states[0], h1, h2), replace=False)

    def from_gru(params, states, replace=True):
      h2 = intervention(2, states[2]) if replace else states[2]
      return self.module.apply(params, h2, mask, method=ToyClassifier.classify)

    if isinstance(layer_index, int):
      return (from_embedding, from_feedforward, from_gru)[layer_index](params, states)
    return jax.lax.switch(layer_index, (from_embedding, from_feedforward, from_gru),
                          params, tuple(states))


def accuracy(model: ToyModel, params, data: ToyData, batch_size: int = 1000) -> float:
  """Fraction of ``data`` the classifier gets right."""
  forward = jax.jit(lambda p, b: jnp.argmax(model.forward(p, b)[0], axis=-1))
  correct = 0
  for batch in iterate_batches(data, batch_size):
    correct += int(np.sum(np.asarray(forward(params, batch.as_batch())) == batch.labels))
  return correct / len(data)


def classifier_loss(logits: jax.Array, labels: jax.Array, confidence_penalty: float) -> jax.Array:
  """Mean cross-entropy minus ``confidence_penalty`` times the batch-margin entropy.

  ``logits (batch, 2), labels (batch,) int -> scalar``. The entropy is the
  original code's: of a softmax taken over the batch axis (not over classes)
  of the margins ``logit_1 - logit_0``; it is largest when all margins of the
  batch are equal.
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  log_probs = jax.nn.log_softmax(logits[:, 1] - logits[:, 0])
  batch_entropy = -jnp.sum(jnp.exp(log_probs) * log_probs)
  return jnp.mean(cross_entropy) - confidence_penalty * batch_entropy


def train_toy_model(model: ToyModel, train: ToyData, *, seed: int = 0, epochs: int = 50,
                    batch_size: int = 128, learning_rate: float = 3e-3,
                    confidence_penalty: float = 0.0,
                    progress: bool = True, on_epoch: Callable[[int, float], None] | None = None):
  """Trains the toy classifier with Adam and cross-entropy; returns its params.

  The loss is :func:`classifier_loss`: its ``confidence_penalty`` term
  keeps the margins of a batch from drifting apart, so the classifier does
  not become arbitrarily confident, and it leaves the feed-forward states of
  "neither n nor m" positions in one region (paper Fig. 12) that a single
  baseline can stand in for. ``on_epoch(epoch, mean_loss)`` is called after
  every epoch.
  """
  if epochs < 1 or batch_size < 1:
    raise ValueError(f'epochs and batch_size must be >= 1, got {epochs}, {batch_size}')
  init_key = jax.random.key(seed)
  params = model.init(init_key, train.digits.shape[1])
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * (len(train) // batch_size))
  optimizer = optax.adam(schedule)
  opt_state = optimizer.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, labels):
    def loss_fn(params):
      return classifier_loss(model.forward(params, batch)[0], labels, confidence_penalty)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for epoch in tqdm(range(epochs), desc='toy model', disable=not progress, unit='epoch'):
    losses = []
    for batch in iterate_batches(train, batch_size, rng, drop_remainder=True):
      params, opt_state, loss = train_step(params, opt_state, batch.as_batch(), batch.labels)
      losses.append(loss)
    if on_epoch is not None:
      on_epoch(epoch, float(np.mean(jax.device_get(losses))))
  return params
