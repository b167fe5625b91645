"""Length buckets and bucketed batches (dmx.data.common)."""

import numpy as np
import pytest

from dmx.data.common import bucketed_batches, length_buckets, length_sorted_index_batches


def test_length_buckets_cover_every_example_once_and_fit_its_length():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 67, 500)
  buckets = length_buckets(lengths, batch_size=32, width=16, max_length=66)
  indices = np.concatenate([rows for _, rows in buckets])
  assert sorted(indices.tolist()) == list(range(500))
  padded = [length for length, _ in buckets]
  assert padded == sorted(padded) and padded[-1] <= 66
  for length, rows in buckets:
    assert lengths[rows].max() <= length
    assert len(rows) >= 32


def test_small_buckets_join_a_longer_one():
  lengths = np.array([3] * 5 + [20] * 40 + [60] * 3)
  buckets = length_buckets(lengths, batch_size=32, width=16, max_length=64)
  # 5 short ones ride with the 40 of length 20 (bucket 32); the 3 longest join them
  assert [length for length, _ in buckets] == [64]
  assert len(buckets[0][1]) == 48


def test_fewer_examples_than_a_batch_give_one_bucket():
  buckets = length_buckets(np.array([4, 9]), batch_size=32, width=8, max_length=16)
  assert [(length, sorted(rows.tolist())) for length, rows in buckets] == [(16, [0, 1])]


def test_bucketed_batches_visit_every_full_batch_each_pass():
  buckets = [{'x': np.arange(10)}, {'x': np.arange(100, 107)}]
  stream = bucketed_batches(buckets, batch_size=3, seed=0)
  first_pass = [next(stream)['x'] for _ in range(3 + 2)]
  assert all(len(batch) == 3 for batch in first_pass)
  seen = np.concatenate(first_pass)
  assert len(set(seen.tolist())) == len(seen) == 15  # no repeats within a pass
  assert sum(value < 100 for value in seen) == 9 and sum(value >= 100 for value in seen) == 6
  # a bucket smaller than a batch gives one short batch per pass
  small = bucketed_batches([{'x': np.arange(2)}], batch_size=3, seed=0)
  assert sorted(next(small)['x'].tolist()) == [0, 1]


def test_bucket_errors():
  with pytest.raises(ValueError, match='width'):
    length_buckets(np.array([3]), 4, 0, 8)
  with pytest.raises(ValueError, match='no examples'):
    next(bucketed_batches([], 4, 0))


def test_length_sorted_index_batches_cover_every_example_once_in_length_order():
  lengths = np.array([9, 3, 17, 3, 0, 40, 12])
  batches = list(length_sorted_index_batches(lengths, 3, width=8, max_length=32))
  assert [list(rows) for rows, _ in batches] == [[4, 1, 3], [0, 6, 2], [5]]
  # the longest of each batch, rounded up to the width and capped at the padded length
  assert [padded for _, padded in batches] == [8, 24, 32]
  with pytest.raises(ValueError, match='width'):
    next(length_sorted_index_batches(lengths, 3, width=0, max_length=32))
