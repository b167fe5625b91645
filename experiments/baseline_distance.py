"""Where a hidden-gate probe's learned baselines ended, against the states they replace.

For each depth ``k``: the mean norm of the classifier's clean states on the
first SST dev sentences, the norm of their mean and its largest coordinate,
and for every RUN the norm of its learned baseline ``b_k`` and its distance
to that mean state. It tells whether a baseline stayed near its start, went
to the average state, or somewhere else.

    python experiments/baseline_distance.py RUN [RUN ...] [--sentences 256] [--data DIR]

Each RUN is a ``dmx diffmask sst --gate hidden`` output folder (its
``probe_hidden``); all must explain the same model.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from dmx.data import sst
from dmx.models import hf_import
from dmx.pipelines import diffmask_text, explain


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', type=Path)
  parser.add_argument('--sentences', type=int, default=256,
                      help='first SST dev sentences the clean states come from')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  args = parser.parse_args()
  loaded = []
  for run in args.runs:
    try:
      probe, params, metadata, _ = explain.load_probe(run / 'probe_hidden')
    except ValueError as error:
      sys.exit(f'{run}: {error}')
    loaded.append((run, probe, params, metadata['model']))
  models = {model for *_, model in loaded}
  if len(models) != 1:
    sys.exit(f'the runs explain different models: {sorted(models)}')
  model, frozen, tokenizer = hf_import.load_pretrained(models.pop(), head='classification',
                                                       random_head=False)
  examples = sst.load_sst('dev', args.data)[:args.sentences]
  batch = hf_import.tokenize(tokenizer, [example.text for example in examples])
  outputs, states = model.forward(frozen, batch)
  real = np.asarray(batch['mask'])
  # the pass just made, handed over as the batch's cached clean pass: one pass, not two
  cached = {**batch, 'clean_outputs': outputs, 'clean_states': states}
  means = [np.asarray(mean) for mean in diffmask_text.mean_clean_states(model, frozen, cached)]
  header = ' | '.join(f'h{k}' for k in range(len(means)))
  print(f'| {len(examples)} SST dev sentences | {header} |')
  print('| --- |' + ' --- |' * len(means))

  def row(name, values, digits=1):
    print(f'| {name} | ' + ' | '.join(f'{value:.{digits}f}' for value in values) + ' |')

  row('mean token norm', [np.linalg.norm(np.asarray(state)[real], axis=-1).mean()
                          for state in states])
  row('norm of the mean state', [np.linalg.norm(mean) for mean in means])
  row('largest absolute coordinate of the mean state', [np.abs(mean).max() for mean in means], 2)
  for run, probe, params, _ in loaded:
    baselines = [np.asarray(vector) for vector in probe.apply(params, method='baseline_vectors')]
    row(f'{run.name}: baseline norm', [np.linalg.norm(vector) for vector in baselines])
    row(f'{run.name}: distance to the mean state',
        [np.linalg.norm(vector - mean) for vector, mean in zip(baselines, means)])


if __name__ == '__main__':
  main()
