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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', help='fine-tuned SST-5 classifier folder')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--max-length', type=int, default=66)
  parser.add_argument('--split', choices=('dev', 'train'), default='dev')
  args = parser.parse_args()
  model, params, tokenizer = load_pretrained(args.model, head='auto', random_head=False)
  features = sst.encode_sst(sst.load_sst(args.split, args.data), tokenizer, args.max_length)
  forward = jax.jit(lambda params, batch: model.forward(params, batch)[0])
  logits = np.concatenate([np.asarray(forward(params, batch))[:count]
                           for batch, count in padded_batches(features, 128)])
  ranked = np.sort(np.asarray(jax.nn.softmax(logits, axis=-1)), axis=-1)
  gap = ranked[:, -1] - ranked[:, -2]
  print(f'{args.model}: {args.split} accuracy {np.mean(logits.argmax(-1) == features.labels):.4f}, '
        f'mean largest probability {ranked[:, -1].mean():.3f}')
  for threshold in (0.02, 0.05, 0.1, 0.2):
    print(f'  top-two gap < {threshold}: {np.mean(gap < threshold):.3f} of {len(gap)} sentences')


if __name__ == '__main__':
  main()
