"""A thin orbax wrapper: save and restore pytrees of arrays with a JSON sidecar.

A checkpoint is a folder holding orbax's ``state`` directory and a
``metadata.json`` (a config, say) so a later run can check it is restoring the
thing it expects. Saves go to a temporary folder that is renamed into place,
so an interrupted save never destroys the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or not the one expected."""


def save(path: str | os.PathLike, tree, metadata: dict | None = None) -> Path:
  """Writes ``tree`` (arrays) and ``metadata`` to the folder ``path``, atomically."""
  path = Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.with_name(path.name + '.saving')
  if staging.exists():
    shutil.rmtree(staging)
  staging.mkdir()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(staging / 'state', jax.device_get(tree))
    checkpointer.wait_until_finished()
  (staging / 'metadata.json').write_text(json.dumps(metadata or {}, indent=2, sort_keys=True))
  previous = path.with_name(path.name + '.previous')
  if path.exists():
    if previous.exists():
      shutil.rmtree(previous)
    path.rename(previous)
  staging.rename(path)
  if previous.exists():
    shutil.rmtree(previous)
  return path


def _readable(path: str | os.PathLike) -> Path:
  """``path``, or its ``.previous`` copy when a save died between its two renames."""
  path = Path(path).absolute()
  previous = path.with_name(path.name + '.previous')
  if not (path / 'metadata.json').is_file() and (previous / 'metadata.json').is_file():
    return previous
  return path


def exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` holds a checkpoint, whole or not (a half-written save counts).

  A folder that exists and is not empty counts, so that a damaged checkpoint
  is reported by :func:`read_metadata` / :func:`restore` rather than silently
  replaced by a fresh start.
  """
  path = Path(path).absolute()
  previous = path.with_name(path.name + '.previous')
  return (path.is_dir() and any(path.iterdir())) or previous.is_dir()


def read_metadata(path: str | os.PathLike) -> dict:
  """The metadata saved with the checkpoint at ``path``."""
  metadata_file = _readable(path) / 'metadata.json'
  if not metadata_file.is_file():
    raise CheckpointError(f'no checkpoint at {path} (missing metadata.json)')
  try:
    return json.loads(metadata_file.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f'corrupt checkpoint metadata at {metadata_file}: {error}') from error


def restore(path: str | os.PathLike, target):
  """Restores the pytree at ``path`` into the structure and shapes of ``target``."""
  read_metadata(path)
  path = _readable(path)
  abstract = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype), target)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path / 'state', abstract)
  except Exception as error:  # orbax raises many types for bad or mismatched files
    raise CheckpointError(f'cannot restore checkpoint {path}: {error}') from error
  # orbax hands back the saved shape whatever the target asks for: check it here
  leaves, _ = jax.tree_util.tree_flatten_with_path(restored)
  mismatched = [f'{jax.tree_util.keystr(key)}: saved {np.shape(leaf)}, expected {want.shape}'
                for (key, leaf), want in zip(leaves, jax.tree_util.tree_leaves(abstract))
                if np.shape(leaf) != want.shape]
  if mismatched:
    raise CheckpointError(f'checkpoint {path} does not match the target: ' + '; '.join(mismatched))
  return restored
