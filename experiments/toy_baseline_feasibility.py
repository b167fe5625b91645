"""Is the ground-truth mask reachable on the toy model? (diagnosis for docs/RESULTS.md)

Loads the toy classifier that ``dmx toy --out RUN`` trained, replaces the
feed-forward state of every position that holds neither n nor m by one fixed
vector, and reports the masked pass's mean KL and agreement on the validation
set, for the mean of those states and for states drawn from the data.

    python experiments/toy_baseline_feasibility.py --run runs/toy [--candidates 30]
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dmx import checkpoint, objective
from dmx.data.toy import generate_toy_data, split_toy_data
from dmx.models.toy import ToyModel, ToyModelConfig
from dmx.pipelines.toy import FEEDFORWARD_STATE, ToyExperimentConfig


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--run', required=True, help='a folder written by dmx toy')
  parser.add_argument('--candidates', type=int, default=30)
  args = parser.parse_args()
  run = Path(args.run)
  saved = json.loads((run / 'report.json').read_text())['config']
  config = ToyExperimentConfig(**{**saved, 'model': ToyModelConfig(**saved['model'])})
  model = ToyModel(config.model)
  params = checkpoint.restore(run / 'toy_model', model.init(jax.random.key(0), config.max_length))
  _, validation = split_toy_data(generate_toy_data(config.seed, config.num_examples,
                                                   config.max_length), config.validation_fraction)
  batch = validation.as_batch()
  logits, states = model.forward(params, batch)
  relevant = ((validation.digits == validation.query[:, :1])
              | (validation.digits == validation.query[:, 1:])) & validation.mask
  other_states = np.asarray(states[FEEDFORWARD_STATE])[(~relevant) & validation.mask]
  keep = jnp.asarray(relevant)[..., None]

  def score(vector):
    masked = model.forward_from(params, batch, states, FEEDFORWARD_STATE,
                                lambda k, h: jnp.where(keep, h, jnp.asarray(vector, h.dtype)))
    kl = objective.kl_divergence(logits, masked)
    return float(kl.mean()), float(jnp.mean(masked.argmax(-1) == logits.argmax(-1)))

  print(f'{len(other_states)} non-query states; replacing all of them by one vector:')
  print('mean of those states: KL %.4f, agreement %.3f' % score(other_states.mean(axis=0)))
  rng = np.random.default_rng(0)
  results = sorted(score(other_states[i]) + (i,) for i in
                   rng.choice(len(other_states), min(args.candidates, len(other_states)), replace=False))
  for kl, agree, index in results[:3]:
    print(f'best candidates:  KL {kl:.4f}, agreement {agree:.3f}, state {np.round(other_states[index], 2)}')
  print('median candidate: KL %.4f' % float(np.median([kl for kl, _, _ in results])))
  kl, agree, index = results[-1]
  print(f'worst candidate:  KL {kl:.4f}, agreement {agree:.3f}, state {np.round(other_states[index], 2)}')


if __name__ == '__main__':
  main()
