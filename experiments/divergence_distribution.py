"""How are an input-gate probe's divergences spread over sentences, and where are its flips?

DiffMask's constraint bounds the *batch mean* of KL(clean || masked). A mean
can sit under the margin while a few sentences are far over it, and a
sentence far over it is one whose prediction may change. This script takes
trained input-gate probes, masks SST sentences with each probe's
deterministic gates at its deepest trained depth (filled with its learned
baseline), and prints per split:

- the mean, median and the means of the worst 25% and 10% of the per-sentence
  KL (the statistic that ``--divergence-tail 0.25`` / ``0.1`` bounds, here
  over the whole split instead of a batch);
- agreement with the clean predictions, and the mean and median KL of the
  sentences whose prediction changed;
- the masked fraction of real tokens.

    python experiments/divergence_distribution.py RUN [RUN ...] [--max-sentences 1500]

Each RUN is a ``dmx diffmask sst --gate input`` output folder (or its
``probe_input/``). Train sentences are the ones the probe trained on, so the
train and dev rows separate what the constraint reached from what carried over.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from baseline_sentiment import make_masked_outputs
from dmx import objective
from dmx.data import sst
from dmx.data.common import padded_batches
from dmx.pipelines.diffmask_text import summary_depths
from dmx.pipelines.explain import diffmask_config_from_metadata, load_model, load_probe


def tail_mean(values: np.ndarray, fraction: float) -> float:
  """Mean of the worst ``fraction`` of ``values``: what ``--divergence-tail`` bounds per batch."""
  values = jnp.asarray(values)
  threshold = objective.tail_threshold(values, fraction)
  return float(objective.tail_divergence(values, threshold, fraction).mean())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='input-gate run folders (or their probe_input/)')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--splits', nargs='+', default=['train', 'dev'], choices=sst.SPLITS)
  parser.add_argument('--max-sentences', type=int, default=1500,
                      help='first N sentences of each split (0: all)')
  parser.add_argument('--batch-size', type=int, default=64)
  args = parser.parse_args()

  for run in args.runs:
    try:  # a missing folder or a probe without its model: one line, no traceback
      probe, probe_params, metadata, folder = load_probe(run)
      model, params, tokenizer = load_model(metadata)
    except ValueError as error:
      raise SystemExit(f'error: {error}') from None
    if metadata['gate'] != 'input':
      raise SystemExit(f'{folder}: a {metadata["gate"]}-gate probe; this measures input gates')
    learned = probe.apply(probe_params, method='baseline_vectors')[0][None]  # (1, hidden)
    dm_config = diffmask_config_from_metadata(metadata)
    depth = summary_depths('input', len(probe.state_dims), dm_config.layers)[0]
    masked_outputs = make_masked_outputs(model, probe, dm_config, depth)
    for split in args.splits:
      examples = sst.load_sst(split, args.data)[:args.max_sentences or None]
      features = sst.encode_sst(examples, tokenizer, int(metadata['max_length']))
      divergences, agreements, masked, real = [], [], 0, 0
      for batch, count in padded_batches(features, args.batch_size):
        clean, keep, logits = jax.device_get(
            masked_outputs(params, probe_params, batch, None, learned))
        clean, keep, logits = clean[:count], keep[:count], logits[0, :count]
        divergences.append(np.asarray(objective.kl_divergence(clean, logits), np.float64))
        agreements.append(clean.argmax(-1) == logits.argmax(-1))
        mask = np.asarray(batch['mask'][:count], bool)
        masked += int(((keep == 0) & mask).sum())
        real += int(mask.sum())
      divergence, agreed = np.concatenate(divergences), np.concatenate(agreements)
      flipped = divergence[~agreed]
      print(f'{folder} {split} ({len(divergence)} sentences, h{depth}): masked {masked / real:.1%}, '
            f'agreement {agreed.mean():.3f}; KL mean {divergence.mean():.4f}, '
            f'median {np.median(divergence):.4f}, worst 25% {tail_mean(divergence, 0.25):.4f}, '
            f'worst 10% {tail_mean(divergence, 0.1):.4f}; changed predictions: KL mean '
            f'{flipped.mean() if len(flipped) else float("nan"):.4f}, median '
            f'{np.median(flipped) if len(flipped) else float("nan"):.4f}', flush=True)


if __name__ == '__main__':
  main()
