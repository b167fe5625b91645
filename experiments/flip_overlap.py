"""Which SST dev predictions do DiffMask's masks flip, and are they the same ones in every run?

A hidden-gate run's agreement counts the (sentence, depth) pairs whose masked
prediction equals the clean one. This script reads the masked predictions
each finished ``dmx diffmask sst`` run saves in ``keep_prob.npz`` and prints,
per run, the flipped pairs and the sentences flipped at some depth; then how
many of those every run flips (a core that no setting spares points at the
classifier, not at the probe); and, with ``--model``, the flip rate by the
clean classifier's top-two probability gap (a small KL flips a near-tie).

    python experiments/flip_overlap.py RUN... [--model runs/sst_minilm_e3/model] [--data DIR]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from classifier_confidence import clean_probabilities, top_two_gap

GAP_EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 1.0)  # the last bin holds every gap >= 0.2


def load_flips(run: Path) -> tuple[np.ndarray, np.ndarray]:
  """``(input_ids (sentences, seq), flipped (depths, sentences) bool)`` of one finished run."""
  path = run / 'keep_prob.npz'
  if not path.is_file():
    sys.exit(f'{run}: no keep_prob.npz (not a finished dmx diffmask sst run)')
  arrays = np.load(path)
  return arrays['input_ids'], arrays['masked_predictions'] != arrays['predictions'][None]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', type=Path, help='finished dmx diffmask sst run folders')
  parser.add_argument('--model', default=None, help='the classifier the runs probed: adds the table by top-two gap')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  args = parser.parse_args()

  loaded = [load_flips(run) for run in args.runs]
  input_ids = loaded[0][0]
  for run, (ids, _) in zip(args.runs, loaded):
    if ids.shape != input_ids.shape or not np.array_equal(ids, input_ids):
      sys.exit(f'{run}: scored on other sentences than {args.runs[0]}')
  flips = np.stack([flipped for _, flipped in loaded])  # (runs, depths, sentences)
  num_depths, num_sentences = flips.shape[1:]
  allowed_flips = num_depths * num_sentences - int(np.ceil(0.9 * num_depths * num_sentences))

  print('| run | flipped pairs | pairs to unflip for agreement 0.90 | sentences flipped at some depth | at 3+ depths |')
  print('| --- | --- | --- | --- | --- |')
  for run, flipped in zip(args.runs, flips):
    depths_flipped = flipped.sum(0)
    print(f'| {run.name} | {flipped.sum()} | {max(0, flipped.sum() - allowed_flips)} '
          f'| {np.sum(depths_flipped > 0)} | {np.sum(depths_flipped >= 3)} |')
  every_pair = flips.all(0)
  every_sentence = flips.any(1).all(0)
  print(f'\nflipped by every run: {every_pair.sum()} pairs, {every_sentence.sum()} sentences '
        f'(of {num_sentences} sentences, {num_depths} depths, {len(args.runs)} runs)')

  if args.model:
    gap = top_two_gap(clean_probabilities(args.model, 'dev', args.data, input_ids.shape[1])[0])
    gap_bin = np.digitize(gap, GAP_EDGES[1:-1])  # (sentences,) index of the row below
    print('\n| clean top-two gap | sentences | '
          + ' | '.join(f'{run.name}: flip rate (share of its flips)' for run in args.runs) + ' |')
    print('| --- | --- |' + ' --- |' * len(args.runs))
    for row, (low, high) in enumerate(zip(GAP_EDGES[:-1], GAP_EDGES[1:])):
      chosen = gap_bin == row
      rates = ' | '.join(f'{flipped[:, chosen].mean():.3f} ({flipped[:, chosen].sum() / flipped.sum():.0%})'
                         if chosen.any() else '-' for flipped in flips)
      print(f'| [{low}, {high}) | {chosen.sum()} | {rates} |')


if __name__ == '__main__':
  main()
