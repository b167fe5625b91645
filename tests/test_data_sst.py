"""Tests for dmx.data.sst on the shared SST-5 trees and the MiniLM WordPiece minilm_tokenizer."""

import collections
import sys

import numpy as np
import pytest

from dmx.data import sst


@pytest.fixture(scope='module')
def train():
  return sst.load_sst('train')


@pytest.fixture(scope='module')
def dev():
  return sst.load_sst('dev')


@pytest.fixture(scope='module')
def dev_features(dev, minilm_tokenizer):
  return sst.encode_sst(dev, minilm_tokenizer, max_length=84)


def test_shared_files_have_the_verified_counts(train, dev):
  assert len(train) == 8544
  assert len(dev) == 1101
  train_counts = collections.Counter(example.label for example in train)
  dev_counts = collections.Counter(example.label for example in dev)
  assert [train_counts[label] for label in range(5)] == [1092, 2218, 1624, 2322, 1288]
  assert [dev_counts[label] for label in range(5)] == [139, 289, 229, 279, 165]
  for example in train[:200] + dev:
    assert len(example.words) == len(example.word_labels) >= 1
    assert example.text == ' '.join(example.words)
    assert all(0 <= label <= 4 for label in example.word_labels)


def test_first_dev_sentence(dev):
  example = dev[0]
  assert example.text == "It 's a lovely film with lovely performances by Buy and Accorsi ."
  assert example.label == 3
  assert example.word_labels == (2, 2, 2, 3, 2, 2, 3, 2, 2, 2, 2, 2, 2)


def test_hand_written_tree():
  line = r'(1 (2 -LRB-) (0 (3 (2 a\/b) (4 good)) (0 bad)) (2 -RRB-))'
  tree = sst.parse_tree(line)
  assert tree.label == 1
  assert not tree.is_leaf and len(tree.children) == 3
  assert tree.leaves == ['-LRB-', r'a\/b', 'good', 'bad', '-RRB-']
  assert tree.leaf_labels == [2, 2, 4, 0, 2]
  assert tree.children[1] == sst.Tree(0, (sst.Tree(3, (sst.Tree(2, (), r'a\/b'),
                                                       sst.Tree(4, (), 'good'))),
                                          sst.Tree(0, (), 'bad')))
  example = sst.example_from_tree(tree)
  assert example.words == ('(', 'a/b', 'good', 'bad', ')')
  assert example.text == '( a/b good bad )'
  assert example.label == 1
  assert example.word_labels == (2, 2, 4, 0, 2)
  phrases = example.phrases()
  assert phrases[0] == ('( a/b good bad )', 1)
  assert ('a/b good bad', 0) in phrases and ('a/b good', 3) in phrases and ('good', 4) in phrases
  assert len(phrases) == sum(1 for _ in tree.subtrees()) == 8
  # the original DiffMask removed backslashes only
  assert sst.example_from_tree(tree, 'backslash').words == ('-LRB-', 'a/b', 'good', 'bad', '-RRB-')
  assert sst.example_from_tree(tree, 'none').words == tuple(tree.leaves)


def test_a_no_break_space_stays_inside_its_leaf():
  tree = sst.parse_tree('(2 (2 rated) (3 2\xa01\\/2))')
  assert tree.leaves == ['rated', '2\xa01\\/2']
  assert sst.example_from_tree(tree).words == ('rated', '2\xa01/2')


@pytest.mark.parametrize('bad, message', [
    ('(2 (2 a) (2 b)', 'unbalanced'),
    ('(2 (2 a) (2 b)))', 'unbalanced'),
    ('(7 (2 a) (2 b))', 'bad label'),
    ('(2 (x a) (2 b))', 'bad label'),
    ('((2 a) (2 b))', 'missing label'),
    ('(2 a (2 b))', 'mixes words'),
    ('(2 (2 a b) (2 c))', 'several words'),
    ('(2 (2 ) (2 c))', 'missing label|empty node'),
    ('(2)', 'empty node'),
    ('word (2 a)', "must start with '\\('"),
])
def test_malformed_trees_raise_with_the_line_number(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    sst.parse_tree(bad)
  path = tmp_path / 'trees.txt'
  path.write_text('(3 (2 fine) (3 tree))\n(2 (2 another) (2 one))\n' + bad + '\n', encoding='utf-8')
  with pytest.raises(ValueError, match=rf'trees.txt: line 3.*({message})'):
    sst.read_sst(path)


def test_blank_lines_are_skipped(tmp_path):
  path = tmp_path / 'trees.txt'
  path.write_text('(3 (2 fine) (3 tree))\n\n(1 (2 a) (1 (2 b) (2 c)))\n', encoding='utf-8')
  examples = sst.read_sst(path)
  assert [example.label for example in examples] == [3, 1]


def test_missing_file_is_one_clear_line(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sst.read_sst(tmp_path / 'nope.txt')
  assert 'nope.txt' in str(info.value) and '\n' not in str(info.value)


def test_split_paths(tmp_path, monkeypatch):
  (tmp_path / 'sst').mkdir()
  (tmp_path / 'sst' / 'dev.txt').write_text('(4 (4 great) (2 .))\n', encoding='utf-8')
  assert sst.sst_split_path('dev', tmp_path) == tmp_path / 'sst' / 'dev.txt'
  monkeypatch.setenv('DMX_DATA_DIR', str(tmp_path))
  assert sst.default_data_dir() == tmp_path
  assert [example.text for example in sst.load_sst('dev')] == ['great .']
  with pytest.raises(FileNotFoundError, match='DMX_DATA_DIR'):
    sst.sst_split_path('train')
  with pytest.raises(ValueError, match='split'):
    sst.sst_split_path('validation')


def test_encode_shapes_and_special_tokens(dev, dev_features, minilm_tokenizer):
  features = dev_features
  num = len(dev)
  assert len(features) == num
  for name in ('input_ids', 'mask', 'token_type_ids', 'word_ids'):
    assert getattr(features, name).shape == (num, 84), name
  assert features.input_ids.dtype == np.int32 and features.token_type_ids.dtype == np.int32
  assert features.mask.dtype == bool and features.word_ids.dtype == np.int32
  assert features.labels.shape == (num,) and features.labels.dtype == np.int32
  np.testing.assert_array_equal(features.labels, [example.label for example in dev])
  assert features.num_truncated == 0
  lengths = features.mask.sum(axis=1)
  np.testing.assert_array_equal(lengths, features.lengths)
  assert np.all(features.input_ids[:, 0] == minilm_tokenizer.cls_token_id)
  assert np.all(features.input_ids[np.arange(num), lengths - 1] == minilm_tokenizer.sep_token_id)
  assert np.all(features.input_ids[~features.mask] == minilm_tokenizer.pad_token_id)
  assert np.all(features.token_type_ids == 0)
  # masks are prefixes
  assert np.all(features.mask == (np.arange(84)[None] < lengths[:, None]))
  assert np.all(features.word_ids[:, 0] == -1)
  assert np.all(features.word_ids[np.arange(num), lengths - 1] == -1)
  assert np.all(features.word_ids[~features.mask] == -1)
  assert features.word_labels.shape == (num, features.num_words.max())


def test_word_ids_round_trip(dev, dev_features, minilm_tokenizer):
  normalizer = minilm_tokenizer.backend_tokenizer.normalizer  # lowercase, strip accents
  for i, example in enumerate(dev):
    word_ids = dev_features.word_ids[i]
    real = word_ids[dev_features.mask[i]]
    # every word has wordpieces, in order, contiguous
    assert np.all(np.diff(real[1:-1]) >= 0)
    assert set(real[1:-1].tolist()) == set(range(len(example.words)))
    for k, word in enumerate(example.words):
      pieces = minilm_tokenizer.convert_ids_to_tokens(dev_features.input_ids[i][word_ids == k].tolist())
      decoded = ''.join(piece.removeprefix('##') for piece in pieces)
      assert decoded == ''.join(normalizer.normalize_str(word).split()), (i, k, word, pieces)
    labels = dev_features.word_labels[i]
    assert tuple(labels[:len(example.words)]) == example.word_labels
    assert np.all(labels[len(example.words):] == -1)


def test_truncation_is_counted_and_strict_raises(dev, minilm_tokenizer):
  features = sst.encode_sst(dev, minilm_tokenizer, max_length=16)
  expected = int(np.sum(features.lengths > 16))
  assert 0 < features.num_truncated == expected < len(dev)
  rows = np.flatnonzero(features.truncated)
  assert np.all(features.mask[rows].all(axis=1))
  assert np.all(features.input_ids[rows, -1] == minilm_tokenizer.sep_token_id)
  first = int(rows[0])
  with pytest.raises(ValueError, match=rf'sentence {first} has {features.lengths[first]} tokens'):
    sst.encode_sst(dev, minilm_tokenizer, max_length=16, strict=True)
  with pytest.raises(ValueError, match=rf'sentence {first} '):
    sst.check_fits(dev, minilm_tokenizer, max_length=16)
  lengths = sst.check_fits(dev[:50], minilm_tokenizer, max_length=84)
  np.testing.assert_array_equal(lengths, sst.encode_sst(dev[:50], minilm_tokenizer).lengths)


def test_pool_word_scores(dev_features):
  features = dev_features.take(slice(0, 32))
  scores = np.where(features.word_ids >= 0, features.word_ids, 1000).astype(float)
  width = int(features.num_words.max())
  for reduction in ('mean', 'max'):
    pooled = sst.pool_word_scores(scores, features.word_ids, width, reduction)
    assert pooled.shape == (32, width)
    real = np.arange(width)[None] < features.num_words[:, None]
    expected = np.broadcast_to(np.arange(width), pooled.shape)
    np.testing.assert_array_equal(pooled[real], expected[real])
    assert np.all(np.isnan(pooled[~real]))
  summed = sst.pool_word_scores(np.ones(scores.shape), features.word_ids, width, 'sum')
  pieces = np.array([[np.sum(row == k) for k in range(width)] for row in features.word_ids])
  np.testing.assert_array_equal(np.nan_to_num(summed), pieces)


def test_iterate_batches(dev_features):
  batches = list(sst.iterate_batches(dev_features, 64, rng=np.random.default_rng(0)))
  assert len(batches) == -(-len(dev_features) // 64)
  batch, labels = batches[0]
  assert set(batch) == {'input_ids', 'mask', 'token_type_ids'}
  assert batch['input_ids'].shape == (64, 84) and batch['mask'].dtype == bool
  assert labels.shape == (64,) and labels.dtype == np.int32
  all_ids = np.concatenate([b['input_ids'] for b, _ in batches])
  assert not np.array_equal(all_ids, dev_features.input_ids)  # shuffled
  assert sorted(map(bytes, all_ids)) == sorted(map(bytes, dev_features.input_ids))
  in_order = list(sst.iterate_batches(dev_features, 100, drop_remainder=True))
  assert len(in_order) == len(dev_features) // 100
  np.testing.assert_array_equal(in_order[1][1], dev_features.labels[100:200])


def test_tfds_loader_is_optional(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match='tensorflow_datasets'):
    sst.load_sst_tfds('dev')
