"""Tests for dmx.checkpoint: round trips, errors, and atomic replacement."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dmx import checkpoint


def example_tree(offset=0.0):
  return {
      'params': {
          'vote_0': {'kernel': jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) + offset,
                     'bias': jnp.asarray([1.5, -2.0], jnp.float32) - offset},
          'baseline_0': jnp.asarray([0.25, 0.5, 0.75], jnp.bfloat16) + offset,
      },
      'step': jnp.asarray(7 + int(offset), jnp.int32),
      'mask': jnp.asarray([True, False, True]),
      'half': np.asarray([1.0, 2.5], np.float16) + offset,
      'counts': np.asarray([1, 2, 3], np.uint8),
  }


def assert_trees_equal(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    want = np.asarray(want)
    got = np.asarray(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_round_trip_of_nested_tree_with_several_dtypes(tmp_path):
  tree = example_tree()
  path = checkpoint.save(tmp_path / 'run' / 'checkpoint', tree)
  assert path == (tmp_path / 'run' / 'checkpoint').absolute()
  restored = checkpoint.restore(path, example_tree(offset=1.0))
  assert_trees_equal(restored, tree)
  assert np.asarray(restored['params']['baseline_0']).dtype == ml_dtypes.bfloat16


def test_metadata_round_trip(tmp_path):
  metadata = {'gate': 'input', 'stretch': [-0.2, 1.0], 'nested': {'layers': 3, 'ok': True}}
  checkpoint.save(tmp_path / 'ckpt', example_tree(), metadata)
  assert checkpoint.read_metadata(tmp_path / 'ckpt') == metadata
  assert checkpoint.read_metadata(str(tmp_path / 'ckpt')) == metadata


def test_missing_metadata_defaults_to_empty_dict(tmp_path):
  checkpoint.save(tmp_path / 'ckpt', example_tree())
  assert checkpoint.read_metadata(tmp_path / 'ckpt') == {}


def test_restoring_missing_path_raises(tmp_path):
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(tmp_path / 'nowhere', example_tree())
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.read_metadata(tmp_path / 'nowhere')


def test_restoring_corrupt_metadata_raises(tmp_path):
  checkpoint.save(tmp_path / 'ckpt', example_tree(), {'a': 1})
  (tmp_path / 'ckpt' / 'metadata.json').write_text('{"a": 1,')
  with pytest.raises(checkpoint.CheckpointError, match='corrupt'):
    checkpoint.read_metadata(tmp_path / 'ckpt')
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(tmp_path / 'ckpt', example_tree())


def test_restoring_into_different_structure_raises(tmp_path):
  checkpoint.save(tmp_path / 'ckpt', example_tree())
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(tmp_path / 'ckpt', {'params': {'other': jnp.zeros(3)}})


@pytest.mark.parametrize('shape', [(3, 3), (1, 3), (6,)])
def test_restoring_into_mismatched_shapes_raises(tmp_path, shape):
  checkpoint.save(tmp_path / 'ckpt', example_tree())
  target = example_tree()
  target['params']['vote_0']['kernel'] = jnp.zeros(shape, jnp.float32)
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore(tmp_path / 'ckpt', target)


def test_saving_twice_replaces_content_and_cleans_up(tmp_path):
  path = tmp_path / 'ckpt'
  checkpoint.save(path, example_tree(), {'version': 1})
  checkpoint.save(path, example_tree(offset=2.0), {'version': 2})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert checkpoint.read_metadata(path) == {'version': 2}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree(offset=2.0))


def test_leftover_staging_folder_does_not_break_saving(tmp_path):
  path = tmp_path / 'ckpt'
  checkpoint.save(path, example_tree(), {'version': 1})
  staging = tmp_path / 'ckpt.saving'
  (staging / 'state').mkdir(parents=True)
  (staging / 'state' / 'garbage').write_text('half written')
  (staging / 'metadata.json').write_text('{"version": 99')
  # the last good checkpoint is still readable while a staging folder exists
  assert checkpoint.read_metadata(path) == {'version': 1}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree())
  checkpoint.save(path, example_tree(offset=3.0), {'version': 2})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert checkpoint.read_metadata(path) == {'version': 2}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree(offset=3.0))


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path):
  """A save that fails after writing the arrays (metadata not JSON) leaves the old one."""
  path = tmp_path / 'ckpt'
  checkpoint.save(path, example_tree(), {'version': 1})
  with pytest.raises(TypeError):
    checkpoint.save(path, example_tree(offset=5.0), {'not json': object()})
  assert checkpoint.read_metadata(path) == {'version': 1}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree())
  checkpoint.save(path, example_tree(offset=1.0), {'version': 3})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree(offset=1.0))


def test_crash_between_renames_keeps_last_good_checkpoint_restorable(tmp_path, monkeypatch):
  """Simulates a crash after the old folder was moved aside but before the new
  one was renamed into place: the last good checkpoint must stay restorable
  from ``path`` (the module promises an interrupted save never loses it)."""
  path = tmp_path / 'ckpt'
  checkpoint.save(path, example_tree(), {'version': 1})
  original_rename = pathlib.Path.rename

  def crashing_rename(self, target):
    if self.name.endswith('.saving'):
      raise OSError('simulated crash before the new checkpoint is in place')
    return original_rename(self, target)

  monkeypatch.setattr(pathlib.Path, 'rename', crashing_rename)
  with pytest.raises(OSError, match='simulated crash'):
    checkpoint.save(path, example_tree(offset=4.0), {'version': 2})
  monkeypatch.undo()
  assert checkpoint.read_metadata(path) == {'version': 1}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree())


def test_next_save_recovers_after_crash_between_renames(tmp_path, monkeypatch):
  path = tmp_path / 'ckpt'
  checkpoint.save(path, example_tree(), {'version': 1})
  original_rename = pathlib.Path.rename

  def crashing_rename(self, target):
    if self.name.endswith('.saving'):
      raise OSError('simulated crash')
    return original_rename(self, target)

  monkeypatch.setattr(pathlib.Path, 'rename', crashing_rename)
  with pytest.raises(OSError):
    checkpoint.save(path, example_tree(offset=4.0), {'version': 2})
  monkeypatch.undo()
  checkpoint.save(path, example_tree(offset=6.0), {'version': 3})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert checkpoint.read_metadata(path) == {'version': 3}
  assert_trees_equal(checkpoint.restore(path, example_tree()), example_tree(offset=6.0))


def test_metadata_file_is_plain_json(tmp_path):
  checkpoint.save(tmp_path / 'ckpt', example_tree(), {'b': 2, 'a': [1, 2]})
  assert json.loads((tmp_path / 'ckpt' / 'metadata.json').read_text()) == {'a': [1, 2], 'b': 2}
