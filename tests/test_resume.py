"""Checkpoint and resume of DiffMask training (``dmx.train.fit(checkpoint_dir=...)``).

A run killed mid-way and started again must end bit-for-bit where the
uninterrupted run ends; a checkpoint of another run, or a damaged one, must
stop with a clear error instead of starting afresh.
"""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from dmx import checkpoint, probes, train
from dmx.data.toy import generate_toy_data
from dmx.models.toy import ToyModel, ToyModelConfig

NUM_STEPS = 20
BATCH = 16


class Killed(Exception):
  """Stands for the process dying between two steps."""


def toy_batches(seed: int, kill_at: int | None = None):
  """A reproducible endless batch stream over 64 toy examples; raises ``Killed`` at batch ``kill_at``."""
  batch = generate_toy_data(0, num_examples=64).as_batch()
  rng = np.random.default_rng(seed)
  count = 0
  while True:
    if kill_at is not None and count == kill_at:
      raise Killed()
    rows = rng.choice(64, BATCH, replace=False)
    count += 1
    yield {name: value[rows] for name, value in batch.items()}


def setup(gate='hidden', **overrides):
  model = ToyModel(ToyModelConfig.tiny())
  frozen = model.init(jax.random.key(0))
  config = train.DiffMaskConfig(gate=gate, warmup_steps=3, **overrides)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, hidden_size=8)
  first = next(toy_batches(0))
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, first)
  state = train.init_state(config, params, len(model.state_dims))
  return model, frozen, probe, config, state


def run(checkpoint_dir=None, kill_at=None, gate='hidden', key_seed=7, num_steps=NUM_STEPS,
        depth_seed=None, **overrides):
  model, frozen, probe, config, state = setup(gate, **overrides)
  depth_key = None if depth_seed is None else jax.random.key(depth_seed)
  return train.fit(model, frozen, probe, config, state, toy_batches(0, kill_at), num_steps,
                   jax.random.key(key_seed), progress=False, log_every=4,
                   checkpoint_dir=checkpoint_dir, checkpoint_every=5, depth_key=depth_key)


def assert_trees_identical(first, second):
  first_leaves, first_tree = jax.tree_util.tree_flatten(jax.device_get(first))
  second_leaves, second_tree = jax.tree_util.tree_flatten(jax.device_get(second))
  assert first_tree == second_tree
  for a, b in zip(first_leaves, second_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted hidden-gate run, checkpointing like the others (so histories match)."""
  return run(tmp_path_factory.mktemp('reference') / 'checkpoint')


@pytest.fixture(scope='module')
def partial_checkpoint(tmp_path_factory):
  """A checkpoint left at step 5 by a run killed before step 8."""
  folder = tmp_path_factory.mktemp('partial') / 'checkpoint'
  with pytest.raises(Killed):
    run(folder, kill_at=7)
  return folder


@pytest.fixture
def partial(partial_checkpoint, tmp_path):
  """A private copy of the partial checkpoint, free to damage."""
  folder = tmp_path / 'checkpoint'
  shutil.copytree(partial_checkpoint, folder)
  return folder


def test_killed_and_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, reference,
                                                                     monkeypatch):
  reference_state, reference_history = reference
  clock = itertools.count()  # a fake clock: one second per reading
  monkeypatch.setattr(train, '_clock', lambda: float(next(clock)))
  folder = tmp_path / 'checkpoint'
  with pytest.raises(Killed):
    run(folder, kill_at=13)
  assert int(checkpoint.read_metadata(folder)['step']) == 10  # last save before the kill
  state, history = run(folder)
  assert int(state.step) == NUM_STEPS
  # the whole state: probe, baselines, both optimisers (Lookahead slow weights
  # included), multipliers, running statistics, step
  assert_trees_identical(state, reference_state)
  assert [entry['step'] for entry in history] == [4, 5, 8, 10, 12, 15, 16, 20]
  # everything but the wall time: the same
  without_seconds = lambda entries: [{k: v for k, v in entry.items() if k != 'seconds'}
                                     for entry in entries]
  assert without_seconds(history) == without_seconds(reference_history)
  seconds = [entry['seconds'] for entry in history]
  # the resumed invocation's clock starts from the checkpoint's (step 10), not from zero
  assert all(earlier < later for earlier, later in zip(seconds, seconds[1:])), seconds


def test_input_gate_run_resumes_bit_for_bit(tmp_path):
  folder = tmp_path / 'checkpoint'
  with pytest.raises(Killed):
    run(folder, kill_at=6, gate='input', num_steps=10)
  state, _ = run(folder, gate='input', num_steps=10)
  uninterrupted, _ = run(gate='input', num_steps=10)
  assert_trees_identical(state, uninterrupted)


def test_finished_run_is_not_trained_again(partial, reference):
  finished, _ = run(partial)
  assert_trees_identical(finished, reference[0])
  # an endless stream that fails on first use: a finished run must not draw from it
  again, history = run(partial, kill_at=0)
  assert_trees_identical(again, reference[0])
  assert history[-1]['step'] == NUM_STEPS


def test_process_killed_by_sigkill_resumes_bit_for_bit(tmp_path, reference):
  """A real kill -9 of the training process between two steps."""
  folder = tmp_path / 'checkpoint'
  script = textwrap.dedent(f'''
      import os, signal, sys
      sys.path.insert(0, {str(Path(__file__).parent)!r})
      import test_resume as t
      original = t.toy_batches
      def dying(seed, kill_at=None):
        for index, batch in enumerate(original(seed)):
          if index == 13:
            os.kill(os.getpid(), signal.SIGKILL)
          yield batch
      t.toy_batches = dying
      t.run({str(folder)!r})
  ''')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(Path(__file__).parents[1])] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  process = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
  assert int(checkpoint.read_metadata(folder)['step']) == 10
  resumed, _ = run(folder)
  assert_trees_identical(resumed, reference[0])


def test_more_steps_continue_a_finished_run_bit_for_bit(tmp_path):
  folder = tmp_path / 'checkpoint'
  run(folder, num_steps=12)
  assert int(checkpoint.read_metadata(folder)['step']) == 12
  # an endless stream that fails after 17 batches: only the 12 replayed and 5 new are drawn
  continued, history = run(folder, num_steps=17, kill_at=17)
  uninterrupted, uninterrupted_history = run(num_steps=17)
  assert int(continued.step) == 17
  assert_trees_identical(continued, uninterrupted)
  assert history[-1]['step'] == 17 and history[-1]['divergence'] == pytest.approx(
      uninterrupted_history[-1]['divergence'])
  assert int(checkpoint.read_metadata(folder)['last_step']) == 17


def test_checkpoint_of_another_run_is_refused(partial):
  with pytest.raises(checkpoint.CheckpointError, match=r'another run.*margin'):
    run(partial, margin=0.5)
  with pytest.raises(checkpoint.CheckpointError, match='different key'):
    run(partial, key_seed=8)
  with pytest.raises(checkpoint.CheckpointError, match=r'at step 5, past this run.s last step 4'):
    run(partial, num_steps=4)  # fewer steps than the checkpoint already took
  with pytest.raises(checkpoint.CheckpointError, match='different depth key'):
    run(partial, depth_seed=3)  # a shared depth schedule (dmx.sweep) the checkpoint did not have


def test_run_with_a_depth_key_resumes_bit_for_bit_and_only_with_that_key(tmp_path):
  uninterrupted, _ = run(depth_seed=3)
  folder = tmp_path / 'checkpoint'
  with pytest.raises(Killed):
    run(folder, kill_at=12, depth_seed=3)
  for depth_seed in (None, 4):
    with pytest.raises(checkpoint.CheckpointError, match='different depth key'):
      run(folder, depth_seed=depth_seed)
  resumed, _ = run(folder, depth_seed=3)
  assert_trees_identical(resumed, uninterrupted)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(partial):
  (partial / 'metadata.json').write_text('{not json')
  with pytest.raises(checkpoint.CheckpointError, match='corrupt'):
    run(partial)
  (partial / 'metadata.json').unlink()
  with pytest.raises(checkpoint.CheckpointError, match='missing metadata'):
    run(partial)


def test_damaged_state_files_are_an_error(partial):
  shutil.rmtree(partial / 'state')
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore'):
    run(partial)


def test_save_interrupted_between_renames_keeps_last_good_checkpoint(partial, reference):
  # what a save that died after moving the good checkpoint aside leaves behind
  partial.rename(partial.with_name('checkpoint.previous'))
  partial.with_name('checkpoint.saving').mkdir()
  state, _ = run(partial)
  assert_trees_identical(state, reference[0])


def test_resume_onto_a_one_device_mesh(partial, reference):
  """The checkpoint restores onto the current mesh (here the one CPU device)."""
  from dmx import parallel
  model, frozen, probe, config, state = setup()
  resumed, _ = train.fit(model, frozen, probe, config, state, toy_batches(0), NUM_STEPS,
                         jax.random.key(7), progress=False, log_every=4, checkpoint_dir=partial,
                         checkpoint_every=5, mesh=parallel.data_mesh(jax.devices()[:1]))
  # shard_map compiles another program: equal up to float rounding, not bit for bit
  for got, want in zip(jax.tree_util.tree_leaves(resumed),
                       jax.tree_util.tree_leaves(reference[0])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_checkpoint_that_fingerprinted_its_step_count_can_be_continued(tmp_path):
  """Pipelines once put their ``steps`` into ``run_info``; such a checkpoint still continues."""
  folder = tmp_path / 'checkpoint'

  def fit(steps, info, retired=('steps',)):
    model, frozen, probe, config, state = setup()  # a fresh state: fit donates the one it gets
    return train.fit(model, frozen, probe, config, state, toy_batches(0), steps,
                     jax.random.key(7), progress=False, log_every=4, checkpoint_dir=folder,
                     checkpoint_every=5, run_info=info, retired_run_info=retired)

  fit(10, {'data': 'toy', 'steps': 10}, retired=())
  # a caller that has not retired the field still refuses it: nothing is ignored by default
  with pytest.raises(checkpoint.CheckpointError, match=r'different run \(steps\)'):
    fit(15, {'data': 'toy'}, retired=())
  continued, _ = fit(15, {'data': 'toy'})
  assert_trees_identical(continued, run(num_steps=15)[0])
  with pytest.raises(checkpoint.CheckpointError, match=r'different run \(data\)'):
    fit(20, {'data': 'other'})
