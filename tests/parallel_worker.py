"""Run in a process of its own with 8 faked CPU devices (see test_parallel.py).

Trains DiffMask for 20 steps on one device and on an 8-device ``data`` mesh
with the same global batches and key, and prints one JSON line comparing
them: the largest differences of the probe parameters, the multipliers, the
rest of the state and the metrics, and how the batch and state were laid out.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402  (the flag must be set before jax starts)
import numpy as np  # noqa: E402

from dmx import parallel, probes, train  # noqa: E402
from dmx.data.toy import generate_toy_data  # noqa: E402
from dmx.models.bert import BertConfig, BertModel  # noqa: E402
from dmx.models.toy import ToyModel, ToyModelConfig  # noqa: E402

NUM_STEPS = 20
GLOBAL_BATCH = 16


def model_and_batches(kind: str):
  """A tiny frozen model and 20 global batches of 16 rows."""
  rng = np.random.default_rng(0)
  if kind == 'toy':
    model = ToyModel(ToyModelConfig.tiny())
    frozen = model.init(jax.random.key(0))
    data = generate_toy_data(0, num_examples=128).as_batch()
    batches = [{name: value[rows] for name, value in data.items()}
                for rows in (rng.choice(128, GLOBAL_BATCH, replace=False)
                             for _ in range(NUM_STEPS))]
  else:
    model = BertModel(BertConfig.tiny(head='classification', num_labels=5))
    frozen = model.init(jax.random.key(0), 8)
    # a random head is nearly uniform, so every divergence would sit at
    # float32 noise; scaled up, masking moves the output by a measurable amount
    head = frozen['head']
    frozen['head'] = {**head, 'classifier': {**head['classifier'],
                                             'kernel': 200.0 * head['classifier']['kernel']}}
    batches = []
    for _ in range(NUM_STEPS):
      lengths = rng.integers(3, 13, GLOBAL_BATCH)
      mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
      ids = rng.integers(5, 128, (GLOBAL_BATCH, 12)) * mask
      batches.append({'input_ids': ids.astype(np.int32), 'mask': mask,
                      'token_type_ids': np.zeros_like(mask)})
  return model, frozen, batches


def max_difference(first, second) -> float:
  """Largest ``|a - b| / max(1, |b|)`` over all leaves: absolute near 0, relative for big values
  (RMSprop's second moments of the baselines reach 1e9)."""
  leaves = zip(jax.tree_util.tree_leaves(jax.device_get(first)),
               jax.tree_util.tree_leaves(jax.device_get(second)))
  differences = []
  for a, b in leaves:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size:
      differences.append(float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))))
  return max(differences, default=0.0)


def compare(kind: str, gate: str, divergence_tail: float = 1.0) -> dict:
  model, frozen, batches = model_and_batches(kind)
  # gates start half open (logit 0) so the divergence is well above float32
  # noise: on a divergence of ~1e-9 RMSprop would turn rounding into full steps of lambda
  # a tail of 1/4 of the 16 rows spans shards of 2: it must be the global batch's
  config = train.DiffMaskConfig(gate=gate, warmup_steps=2, margin=0.0, probe_learning_rate=1e-2,
                                baseline_learning_rate=1e-2, divergence_tail=divergence_tail)
  probe = probes.DiffMaskProbe(gate=gate, state_dims=tuple(model.state_dims), hidden_size=8,
                               initial_logit=0.0)
  params = train.init_probe_params(jax.random.key(1), model, probe, frozen, batches[0])
  key = jax.random.key(3)
  results = {}
  for name, mesh in (('one', None), ('eight', parallel.data_mesh())):
    state = train.init_state(config, params, len(model.state_dims))
    if mesh is None:
      step = jax.jit(train.make_train_step(model, probe, config), donate_argnums=0)
      put = lambda batch: batch
    else:
      step = parallel.make_parallel_train_step(model, probe, config, mesh)
      state, frozen = parallel.replicate((state, frozen), mesh)
      put = lambda batch: parallel.shard_batch(batch, mesh)
    metrics = []
    for index, batch in enumerate(batches):
      placed = put(batch)
      state, step_metrics = step(state, frozen, placed, jax.random.fold_in(key, index))
      metrics.append(step_metrics)
    results[name] = (state, metrics, placed)
  (one, one_metrics, _), (eight, eight_metrics, placed) = results['one'], results['eight']
  mask = placed['mask']
  return dict(
      kind=kind, gate=gate, divergence_tail=divergence_tail,
      probe_params=max_difference(one.params, eight.params),
      multipliers=max_difference(one.multipliers, eight.multipliers),
      whole_state=max_difference(one, eight),
      metrics=max_difference(one_metrics, eight_metrics),
      layers_equal=[int(m['layer_index']) for m in one_metrics] ==
                   [int(m['layer_index']) for m in eight_metrics],
      multipliers_moved=max_difference(one.multipliers.fast,
                                       np.ones_like(np.asarray(one.multipliers.fast))),
      num_devices=len(jax.devices()),
      batch_shards=[list(shard.data.shape) for shard in mask.addressable_shards],
      batch_shard_devices=len({shard.device for shard in mask.addressable_shards}),
      state_replicated=all(leaf.sharding.is_fully_replicated
                           for leaf in jax.tree_util.tree_leaves(eight)),
      state_devices=len(jax.tree_util.tree_leaves(eight)[0].sharding.device_set),
  )


if __name__ == '__main__':
  kinds = sys.argv[1:] or ['toy:hidden', 'toy:input', 'bert:hidden', 'bert:input']
  for item in kinds:  # kind:gate, or kind:gate:tail for a divergence tail of 1/4
    kind, gate, *tail = item.split(':')
    print(json.dumps(compare(kind, gate, 0.25 if tail == ['tail'] else 1.0)), flush=True)
