"""Data parallelism: 8 faked CPU devices give the same training as one device.

The comparison runs in a process of its own (``parallel_worker.py``), because
the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dmx import parallel

WORKER = Path(__file__).with_name('parallel_worker.py')
CASES = ['toy:hidden', 'toy:input', 'bert:hidden', 'bert:input', 'toy:hidden:tail']


@pytest.fixture(scope='module')
def comparisons():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(WORKER.parents[1])] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
             JAX_PLATFORMS='cpu')
  process = subprocess.run([sys.executable, str(WORKER), *CASES], env=env, capture_output=True,
                           text=True, timeout=900)
  assert process.returncode == 0, process.stderr[-3000:]
  results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith('{')]
  assert len(results) == len(CASES)
  return {f"{result['kind']}:{result['gate']}" + (':tail' if result['divergence_tail'] < 1 else ''):
          result for result in results}


@pytest.mark.parametrize('case', CASES)
def test_eight_devices_train_like_one(comparisons, case):
  result = comparisons[case]
  assert result['num_devices'] == 8
  assert result['layers_equal']  # the depth comes from the shared key
  assert result['multipliers_moved'] > 1e-3  # lambda really trained, so its equality means something
  # differences are |a - b| / max(1, |b|): float32 summation-order noise after
  # 20 steps is ~1e-6 (RMSprop's second moments ~1e-5); one different gate
  # sample or a missing pmean moves things by 1e-2 or more
  assert result['probe_params'] < 1e-5, result
  assert result['multipliers'] < 1e-5, result
  assert result['metrics'] < 1e-5, result
  assert result['whole_state'] < 1e-4, result


@pytest.mark.parametrize('case', CASES)
def test_batch_is_sharded_and_state_replicated(comparisons, case):
  result = comparisons[case]
  assert result['batch_shard_devices'] == 8
  assert all(shape[0] == 2 for shape in result['batch_shards'])  # 16 rows / 8 devices
  assert result['state_replicated'] and result['state_devices'] == 8


def test_single_device_mesh_and_errors():
  mesh = parallel.data_mesh(jax.devices()[:1])
  assert mesh.shape == {parallel.DATA_AXIS: 1}
  batch = parallel.shard_batch({'mask': np.ones((3, 4), np.int32)}, mesh)
  assert batch['mask'].shape == (3, 4)
  with pytest.raises(ValueError, match='at least one device'):
    parallel.data_mesh([])
