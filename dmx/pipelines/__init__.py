"""End-to-end experiments behind the ``dmx`` commands, and what they share."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def checked_output_folder(value: str | os.PathLike) -> Path:
  """``value`` as a folder the run can write into; a one-line ``ValueError`` if it cannot.

  The folder may not exist yet (it is created later); its nearest existing
  ancestor must then be writable.
  """
  path = Path(value)
  if path.exists() and not path.is_dir():
    raise ValueError(f'--out {value}: exists and is not a folder')
  parent = path if path.exists() else path.parent
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--out {value}: folder {parent} is not writable')
  return path


def jsonable(value: Any) -> Any:
  """Tuples to lists, non-finite floats to None (strict JSON), numpy scalars to Python."""
  if isinstance(value, dict):
    return {str(key): jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(item) for item in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value
