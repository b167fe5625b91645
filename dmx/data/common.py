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


def length_buckets(lengths: np.ndarray, batch_size: int, width: int,
                   max_length: int) -> list[tuple[int, np.ndarray]]:
  """Groups examples by length so a batch pads only to its own bucket's length.

  An example of ``n`` real tokens goes to the bucket of length
  ``min(ceil(n / width) * width, max_length)``; a bucket with fewer than
  ``batch_size`` examples joins the next longer one (the last one joins the
  one before), so every bucket fills at least one batch when the data does.

  Args:
    lengths: ``(N,)`` real tokens per example.
    batch_size: examples per batch.
    width: bucket granularity in tokens (one compilation per bucket length).
    max_length: the padded length of the features; no bucket is longer.

  Returns:
    ``[(padded_length, example_indices), ...]``, shortest first.
  """
  if width < 1:
    raise ValueError(f'bucket width must be >= 1, got {width}')
  lengths = np.asarray(lengths)
  padded = np.minimum(np.ceil(np.maximum(lengths, 1) / width).astype(int) * width, max_length)
  buckets: list[tuple[int, np.ndarray]] = []
  pending = np.zeros((0,), np.int64)
  for length in np.unique(padded):
    pending = np.concatenate([pending, np.flatnonzero(padded == length)])
    if len(pending) >= batch_size:
      buckets.append((int(length), pending))
      pending = np.zeros((0,), np.int64)
  if len(pending):
    if buckets:
      buckets[-1] = (int(padded[pending].max()), np.concatenate([buckets[-1][1], pending]))
    else:
      buckets.append((int(padded[pending].max()), pending))
  return buckets


def bucketed_batches(buckets: list[dict], batch_size: int, seed: int) -> Iterator[dict]:
  """Batches drawn within buckets, reshuffled every pass, forever.

  ``buckets`` are pytrees (dicts) of arrays whose leading axis is the example
  axis and whose examples share one padded length (see :func:`length_buckets`).
  Each pass permutes every bucket, cuts it into full batches (a remainder
  waits for a later pass's permutation; a bucket smaller than a batch gives
  one short batch) and visits the batches of all buckets in random order.
  """
  import jax  # pylint: disable=import-outside-toplevel  (the data readers stay numpy-only)
  rng = np.random.default_rng(seed)
  sizes = [len(jax.tree_util.tree_leaves(bucket)[0]) for bucket in buckets]
  if not sizes or not any(sizes):
    raise ValueError('no examples to batch')
  while True:
    plan = []
    for bucket_index, size in enumerate(sizes):
      for rows in batch_indices(size, batch_size, rng, drop_remainder=size >= batch_size):
        plan.append((bucket_index, rows))
    for order in rng.permutation(len(plan)):
      bucket_index, rows = plan[order]
      yield jax.tree_util.tree_map(lambda array, rows=rows: array[rows], buckets[bucket_index])


def padded_index_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """In-order index arrays of exactly ``batch_size`` rows, and how many rows are real.

  The last one repeats its last index, so every batch has one shape and a
  jitted function compiles once.
  """
  for indices in batch_indices(num_examples, batch_size):
    count = len(indices)
    yield np.concatenate([indices, np.full(batch_size - count, indices[-1])]), count


def length_sorted_index_batches(lengths: np.ndarray, batch_size: int, width: int,
                                max_length: int) -> Iterator[tuple[np.ndarray, int]]:
  """Index arrays of up to ``batch_size`` examples in order of length, and the length to pad to.

  For evaluation over a fixed set: neighbours in length share a batch, and
  each batch pads to ``min(ceil(longest / width) * width, max_length)``, so
  short sentences do not pay for long ones and few shapes are compiled.
  Sorting is stable (equal lengths keep their order); the last batch may be short.
  """
  if width < 1:
    raise ValueError(f'length width must be >= 1, got {width}')
  lengths = np.asarray(lengths)
  order = np.argsort(lengths, kind='stable')
  for start in range(0, len(order), batch_size):
    indices = order[start:start + batch_size]
    longest = max(int(lengths[indices].max()), 1)
    yield indices, min(-(-longest // width) * width, max_length)


def padded_batches(features, batch_size: int) -> Iterator[tuple[dict, int]]:
  """In-order model batches of exactly ``batch_size`` rows (:func:`padded_index_batches`).

  ``features`` needs ``len``, ``take(indices)`` and ``as_batch()`` (SST and
  SQuAD features have them).
  """
  for indices, count in padded_index_batches(len(features), batch_size):
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
