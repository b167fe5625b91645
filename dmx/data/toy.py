"""The toy task of the paper (sec. 4.1): are there more n than m in a digit string?

Each example is a sequence ``x`` of 1..max_length digits and a query ``<n, m>``
of two distinct digits. Every position is, with probability 1/2, drawn
uniformly from ``{n, m}`` and otherwise uniformly from the other eight digits.
The label is 1 when ``x`` holds strictly more ``n`` than ``m``. The answer can
only depend on the positions holding ``n`` or ``m``, so the ground-truth
attribution is uniform over them.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from dmx.data.common import batch_indices

NUM_DIGITS = 10


class ToyData(NamedTuple):
  """A set of toy examples, padded to ``max_length``.

  Attributes:
    digits: ``(num_examples, max_length)`` int32, padding is 0.
    mask: ``(num_examples, max_length)`` bool, true on real positions.
    query: ``(num_examples, 2)`` int32, the digits ``n`` and ``m``.
    labels: ``(num_examples,)`` int32, 1 when ``count(n) > count(m)``.
  """
  digits: np.ndarray
  mask: np.ndarray
  query: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices) -> 'ToyData':
    return ToyData(*(field[indices] for field in self))

  def as_batch(self) -> dict:
    """The dict a :class:`dmx.models.toy.ToyModel` reads."""
    return {'digits': self.digits, 'mask': self.mask, 'query': self.query}


def generate_toy_data(seed: int, num_examples: int = 10_000, max_length: int = 10,
                      min_length: int = 1) -> ToyData:
  """Draws ``num_examples`` examples with a seeded numpy generator."""
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1, got {num_examples}')
  if not 1 <= min_length <= max_length:
    raise ValueError(f'need 1 <= min_length <= max_length, got {min_length}, {max_length}')
  rng = np.random.default_rng(seed)
  query = np.stack([rng.choice(NUM_DIGITS, size=2, replace=False) for _ in range(num_examples)])
  lengths = rng.integers(min_length, max_length + 1, size=num_examples)
  from_query = rng.random((num_examples, max_length)) < 0.5
  which_query = rng.integers(0, 2, size=(num_examples, max_length))
  query_digits = np.take_along_axis(query, which_query, axis=1)
  # the other eight digits: draw 0..7 and skip over n and m in ascending order
  other = rng.integers(0, NUM_DIGITS - 2, size=(num_examples, max_length))
  low_q, high_q = np.sort(query, axis=1).T
  other = other + (other >= low_q[:, None])
  other = other + (other >= high_q[:, None])
  mask = np.arange(max_length)[None, :] < lengths[:, None]
  digits = np.where(mask, np.where(from_query, query_digits, other), 0).astype(np.int32)
  count_n = np.sum((digits == query[:, :1]) & mask, axis=1)
  count_m = np.sum((digits == query[:, 1:]) & mask, axis=1)
  labels = (count_n > count_m).astype(np.int32)
  return ToyData(digits, mask, query.astype(np.int32), labels)


def split_toy_data(data: ToyData, validation_fraction: float = 0.1) -> tuple[ToyData, ToyData]:
  """First ``1 - validation_fraction`` for training, the rest for validation."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f'validation_fraction must be in (0, 1), got {validation_fraction}')
  num_train = int(round(len(data) * (1 - validation_fraction)))
  return data.take(slice(0, num_train)), data.take(slice(num_train, None))


def ground_truth_attribution(data: ToyData) -> np.ndarray:
  """Uniform over the positions holding ``n`` or ``m``: ``(num_examples, max_length)``.

  A row with no such position is all zeros (no attribution is defined).
  """
  relevant = ((data.digits == data.query[:, :1]) | (data.digits == data.query[:, 1:])) & data.mask
  relevant = relevant.astype(np.float64)
  return relevant / np.maximum(relevant.sum(axis=1, keepdims=True), 1.0)


def iterate_batches(data: ToyData, batch_size: int, rng: np.random.Generator | None = None,
                    drop_remainder: bool = False) -> Iterator[ToyData]:
  """Batches in order, or shuffled when ``rng`` is given."""
  for indices in batch_indices(len(data), batch_size, rng, drop_remainder):
    yield data.take(indices)
