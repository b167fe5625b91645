"""Helpers the SST and SQuAD readers share: batching, tokenizer checks, the optional TFDS import."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def batch_indices(num_examples: int, batch_size: int, rng: np.random.Generator | None = None,
                  drop_remainder: bool = False) -> Iterator[np.ndarray]:
  """Index arrays of successive batches, in order or shuffled by ``rng``."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  order = np.arange(num_examples) if rng is None else rng.permutation(num_examples)
  stop = num_examples - (num_examples % batch_size if drop_remainder else 0)
  for start in range(0, stop, batch_size):
    yield order[start:start + batch_size]


def endless_batches(features, batch_size: int, seed: int) -> Iterator[dict]:
  """Model-ready batch dicts, reshuffled every pass, forever (for ``dmx.train.fit``).

  Every pass is a new permutation; a pass's remainder is dropped (when the data
  holds at least one full batch) so all batches share one shape. ``features``
  needs ``len``, ``take(indices)`` and ``as_batch()``.
  """
  rng = np.random.default_rng(seed)
  while True:
    for indices in batch_indices(len(features), batch_size, rng,
                                 drop_remainder=len(features) >= batch_size):
      yield features.take(indices).as_batch()


def padded_batches(features, batch_size: int) -> Iterator[tuple[dict, int]]:
  """In-order model batches of exactly ``batch_size`` rows, and how many rows are real.

  The last batch repeats its last row, so every batch has one shape and a
  jitted function compiles once. ``features`` needs ``len``, ``take(indices)``
  and ``as_batch()`` (SST and SQuAD features have them).
  """
  for indices in batch_indices(len(features), batch_size):
    count = len(indices)
    indices = np.concatenate([indices, np.full(batch_size - count, indices[-1])])
    yield features.take(indices).as_batch(), count


def require_fast_tokenizer(tokenizer, purpose: str) -> None:
  """Raises a one-line ``TypeError`` unless ``tokenizer`` is a fast (Rust) tokenizer.

  ``purpose`` says what needs it (word ids, offsets, overflowing windows).
  """
  if not getattr(tokenizer, 'is_fast', False):
    raise TypeError(f'a fast (Rust tokenizers) tokenizer is needed for {purpose}, got '
                    f'{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(...)')


def import_tfds(loader: str, alternative: str):
  """``tensorflow_datasets``, imported lazily: it is never a dependency of dmx.

  Raises an ``ImportError`` naming ``loader`` and the offline ``alternative``.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f'{loader} needs tensorflow_datasets (pip install tensorflow '
                      f'tensorflow-datasets); or {alternative}') from error
  return tfds
