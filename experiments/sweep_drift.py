"""How far a sweep member drifts from the same probe trained on its own, step by step.

Trains the hidden-gate probes of seeds 0 and 1 on the toy classifier of
``dmx toy`` (reused from ``--run``'s ``toy_model/`` or trained) with
:func:`dmx.sweep.fit_sweep`, and seed 0 alone with :func:`dmx.train.fit` on
the same batches and key stream, for each step count given; prints the
largest probe-parameter difference between member 0 and the single run.

    python experiments/sweep_drift.py --run runs/toy_sweep --steps 10 100 1000 3000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from dmx import probes, sweep, train
from dmx.data.common import endless_batches
from dmx.data.toy import generate_toy_data, split_toy_data
from dmx.pipelines import toy as toy_pipeline


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--run', default='runs/toy_sweep', help='a dmx toy / dmx sweep toy folder')
  parser.add_argument('--steps', type=int, nargs='+', default=[10, 100, 1000, 3000])
  parser.add_argument('--gate', choices=probes.GATES, default='hidden')
  args = parser.parse_args()

  config = toy_pipeline.ToyExperimentConfig()
  data = generate_toy_data(config.seed, config.num_examples, config.max_length)
  train_data, _ = split_toy_data(data, config.validation_fraction)
  model, frozen, _ = toy_pipeline.load_or_train_model(
      config, train_data, Path(args.run) / 'toy_model', progress=False, log=print)
  dm_config = toy_pipeline.toy_diffmask_config(args.gate, config.sparsity)
  probe = probes.DiffMaskProbe(gate=args.gate, state_dims=model.state_dims,
                               form=config.probe_form, hidden_size=config.probe_hidden_size)
  batches = lambda: endless_batches(train_data, config.diffmask_batch_size, 1)
  first = next(batches())
  seeds = [0, 1]
  for steps in args.steps:
    members = sweep.init_sweep(model, frozen, probe, dm_config, first, seeds)
    members, _ = sweep.fit_sweep(model, frozen, probe, dm_config, members, batches(), steps,
                                 seeds, progress=False)
    probe_key, run_key = sweep.member_keys(seeds[0])
    single = train.init_state(dm_config, train.init_probe_params(probe_key, model, probe, frozen,
                                                                 first), len(model.state_dims))
    single, _ = train.fit(model, frozen, probe, dm_config, single, batches(), steps, run_key,
                          progress=False)
    difference = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(sweep.member(members, 0).params.fast),
        jax.tree_util.tree_leaves(single.params.fast)))
    print(f'{args.gate} gates, {steps} steps: largest |probe parameter difference| '
          f'member 0 vs its single run {difference:.3g}', flush=True)


if __name__ == '__main__':
  main()
