"""How confident a fine-tuned SST-5 classifier is on SST: near-ties break DiffMask's agreement.

A masked pass that moves the output distribution by a small KL flips the
prediction only where the two most probable classes are nearly tied, so the
fraction of such sentences bounds the agreement a small margin can reach.
Prints accuracy, the mean largest class probability and, for a few gaps, the
fraction of sentences whose top-two probability gap is below it. DiffMask's
probe trains on SST train and is scored on dev, so ``--split train`` shows
how much surer the classifier is on the sentences it was fine-tuned on.

    python experiments/classifier_confidence.py runs/sst_minilm/model [--split train] [--data DIR]
"""

import argparse

import jax
import numpy as np

from dmx.data import sst
from dmx.data.common import padded_batches
from dmx.models.hf_import import load_pretrained


def clean_probabilities(model_dir: str, split: str, data_dir: str | None,
                        max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(probabilities (sentences, classes), labels (sentences,))`` of the unmasked classifier."""
  model, params, tokenizer = load_pretrained(model_dir, head='auto', random_head=False)
  features = sst.encode_sst(sst.load_sst(split, data_dir), tokenizer, max_length)
  forward = jax.jit(lambda params, batch: model.forward(params, batch)[0])
  logits = np.concatenate([np.asarray(forward(params, batch))[:count]
                           for batch, count in padded_batches(features, 128)])
  return np.asarray(jax.nn.softmax(logits, axis=-1)), features.labels


def top_two_gap(probabilities: np.ndarray) -> np.ndarray:
  """``(sentences,)`` largest minus second-largest class probability."""
  ranked = np.sort(probabilities, axis=-1)
  return ranked[:, -1] - ranked[:, -2]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', help='fine-tuned SST-5 classifier folder')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--max-length', type=int, default=66)
  parser.add_argument('--split', choices=('dev', 'train'), default='dev')
  args = parser.parse_args()
  probabilities, labels = clean_probabilities(args.model, args.split, args.data, args.max_length)
  gap = top_two_gap(probabilities)
  print(f'{args.model}: {args.split} accuracy {np.mean(probabilities.argmax(-1) == labels):.4f}, '
        f'mean largest probability {probabilities.max(-1).mean():.3f}')
  for threshold in (0.02, 0.05, 0.1, 0.2):
    print(f'  top-two gap < {threshold}: {np.mean(gap < threshold):.3f} of {len(gap)} sentences')


if __name__ == '__main__':
  main()
