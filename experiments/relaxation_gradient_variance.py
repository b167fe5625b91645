"""Gradient variance of each gate relaxation at one shared probe, as sequences grow.

``dmx compare relaxations`` measures each relaxation's gradient variance at
its own trained probe. This script holds the probe fixed instead: one hidden-
gate probe on the toy classifier (reused from ``--model``), initialised with
vote logit ``--initial-logit`` (0: every gate open with probability about
1/2, where the estimators differ most), and for toy sequences of exactly each
length in ``--lengths`` (the classifier is a GRU, so any length runs) it
prints, for every relaxation, the variance of the one-sample probe gradient
over ``--draws`` gate-noise draws on ``--batch`` sequences at the
feed-forward state (multiplier 1; REINFORCE with a zero baseline, as at the
start of training), and the variance relative to the squared norm of the mean
gradient. One JSON line per length.

    python experiments/relaxation_gradient_variance.py --model runs/toy_sweep/toy_model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax

from dmx import probes, relaxations, train
from dmx.data.toy import generate_toy_data, split_toy_data
from dmx.pipelines import toy as toy_pipeline
from dmx.pipelines.compare_methods import config_from_model
from dmx.pipelines.compare_relaxations import make_gradient_variance_fn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='runs/toy_sweep/toy_model',
                      help='the toy_model folder of a dmx toy run')
  parser.add_argument('--lengths', type=int, nargs='+', default=[5, 10, 20, 40])
  parser.add_argument('--initial-logit', type=float, default=0.0)
  parser.add_argument('--draws', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0, help='seeds the sequences and the probe')
  args = parser.parse_args()

  toy = config_from_model(args.model)
  data = generate_toy_data(toy.seed, toy.num_examples, toy.max_length)
  train_data, _ = split_toy_data(data, toy.validation_fraction)
  model, frozen, _ = toy_pipeline.load_or_train_model(toy, train_data, Path(args.model),
                                                      progress=False, log=print)
  probe = probes.DiffMaskProbe(gate='hidden', state_dims=model.state_dims, form=toy.probe_form,
                               hidden_size=toy.probe_hidden_size,
                               initial_logit=args.initial_logit)
  layer = toy_pipeline.FEEDFORWARD_STATE
  for length in args.lengths:
    batch = generate_toy_data(1000 + args.seed, args.batch, length, min_length=length).as_batch()
    params = train.init_probe_params(jax.random.key(args.seed), model, probe, frozen, batch)
    result = dict(length=length, initial_logit=args.initial_logit, draws=args.draws,
                  batch=args.batch)
    for name in relaxations.NAMES:
      config = dataclasses.replace(toy_pipeline.toy_diffmask_config('hidden', toy.sparsity),
                                   relaxation=name)
      variance = make_gradient_variance_fn(model, frozen, probe, config, batch, args.draws, layer)
      measured = variance(train.init_state(config, params, len(model.state_dims)),
                          jax.random.key(args.seed + 1))
      result[name] = dict(variance=measured['variance'],
                          relative=measured['variance'] / measured['mean_norm_sq'],
                          quarter_range=measured['quarter_range'])
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
