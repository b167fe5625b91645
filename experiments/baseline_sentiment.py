"""Does an input-gate probe's learned baseline carry sentiment of its own?

A DiffMask input gate replaces a masked word embedding by the probe's learned
baseline vector. If that vector itself reads as, say, negative, then masking a
negative word changes the prediction little, and the probe can mask negative
words cheaply: the probe would keep them less for a reason that has nothing to
do with what the model needs. This script measures three baselines on SST dev:
the learned one, the ``[MASK]`` embedding it started from, and the zero vector
(the original code's baseline unless it is run with ``--placeholder``). Each is
measured three ways:

1. every real token of every sentence replaced (``[CLS]`` and ``[SEP]``
   included): the mean predicted class distribution and the argmax counts,
   against the clean predictions' class counts;
2. one sentiment-bearing word piece at a time replaced (pieces whose word is
   labelled very negative, negative, positive or very positive): the mean
   change of the expected label ``E[y] = sum_k k p_k`` (0 = very negative,
   4 = very positive), by the word's label. A neutral baseline pulls the
   expected label toward the middle by the same amount from both sides;
   a negative one lowers ``E[y]`` less (or raises it less) for negative words;
3. the probe's own masks (its deterministic gates at the deepest depth it was
   trained at) filled with either baseline: agreement with the clean
   predictions, the mean change of ``E[y]`` and the masked predictions per class.

    python experiments/baseline_sentiment.py runs/sst_minilm_e3_input_l0_m002_depth7 [--max-sentences N]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dmx import attribute, train
from dmx.data import sst
from dmx.data.common import padded_batches
from dmx.pipelines.diffmask_text import mask_token_baseline, summary_depths
from dmx.pipelines.explain import diffmask_config_from_metadata, load_model, load_probe


def masked_logits(model, params, batch: dict, keep: jax.Array, baseline: jax.Array) -> jax.Array:
  """``(batch, classes)`` logits with the tokens where ``keep`` is 0 replaced by ``baseline``."""
  _, states = model.forward(params, batch)
  return train.masked_pass(model, params, batch, states, 'input', keep, (baseline,), 0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('probe', help='an input-gate run folder (or its probe_input/)')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--max-sentences', type=int, default=None,
                      help='first N dev sentences only (default: all)')
  parser.add_argument('--batch-size', type=int, default=64)
  args = parser.parse_args()

  try:  # a missing folder or a probe without its model: one line, no traceback
    probe, probe_params, metadata, folder = load_probe(args.probe)
    model, params, tokenizer = load_model(metadata)
  except ValueError as error:
    raise SystemExit(f'error: {error}') from None
  if metadata['gate'] != 'input':
    raise SystemExit(f'{folder}: a {metadata["gate"]}-gate probe; this measures input baselines')
  learned = probe.apply(probe_params, method='baseline_vectors')[0]
  baselines = {'learned': learned, '[MASK]': mask_token_baseline(params, tokenizer),
               'zeros': jnp.zeros_like(learned)}
  examples = sst.load_sst('dev', args.data)[:args.max_sentences]
  features = sst.encode_sst(examples, tokenizer, int(metadata['max_length']))
  clean = jax.jit(lambda params, batch: model.forward(params, batch)[0])
  masked = jax.jit(lambda params, batch, keep, baseline: masked_logits(model, params, batch, keep,
                                                                       baseline))

  clean_logits = np.concatenate([np.asarray(clean(params, batch))[:count]
                                 for batch, count in padded_batches(features, args.batch_size)])
  num_classes = clean_logits.shape[-1]
  labels = np.arange(num_classes)
  per_class = lambda predictions: np.bincount(predictions, minlength=num_classes).tolist()
  clean_probs = np.asarray(jax.nn.softmax(clean_logits, -1), np.float64)
  norms = {name: float(jnp.linalg.norm(baselines[name])) for name in ('learned', '[MASK]')}
  cosine = float(jnp.dot(learned, baselines['[MASK]'])) / (norms['learned'] * norms['[MASK]'])
  print(f'{folder}: {len(features.labels)} dev sentences; baseline norms: '
        + ', '.join(f'{name} {norm:.3f}' for name, norm in norms.items())
        + f'; cosine(learned, [MASK]) = {cosine:.3f}')
  print(f'clean predictions per class {per_class(clean_logits.argmax(-1))}, '
        f'mean E[y] {np.mean(clean_probs @ labels):.3f}')

  # 1. everything replaced
  for name, vector in baselines.items():
    logits = np.concatenate([
        np.asarray(masked(params, batch, jnp.zeros(batch['mask'].shape, jnp.float32),
                          vector))[:count]
        for batch, count in padded_batches(features, args.batch_size)])
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    print(f'all tokens -> {name}: mean distribution {np.round(probs.mean(0), 3).tolist()}, '
          f'predictions per class {per_class(logits.argmax(-1))}, '
          f'mean E[y] {np.mean(probs @ labels):.3f}')

  # 2. one sentiment-bearing word piece at a time
  rows, cols = np.nonzero(features.word_ids >= 0)
  piece_labels = features.word_labels[rows, features.word_ids[rows, cols]]
  chosen = piece_labels != sst.NUM_CLASSES // 2
  rows, cols, piece_labels = rows[chosen], cols[chosen], piece_labels[chosen]
  print(f'{len(rows)} sentiment-bearing word pieces, per label '
        f'{per_class(piece_labels)}')
  clean_expected = clean_probs @ labels
  for name, vector in baselines.items():
    shifts = np.empty(len(rows))
    for start in range(0, len(rows), args.batch_size):
      part = slice(start, start + args.batch_size)
      batch = features.take(rows[part]).as_batch()
      keep = np.ones(batch['mask'].shape, np.float32)
      keep[np.arange(len(keep)), cols[part]] = 0.0
      logits = masked(params, batch, jnp.asarray(keep), vector)
      expected = np.asarray(jax.nn.softmax(logits, -1), np.float64) @ labels
      shifts[part] = expected - clean_expected[rows[part]]
    means = [f'{sst.LABEL_NAMES[label]} {shifts[piece_labels == label].mean():+.3f}'
             for label in labels if np.any(piece_labels == label)]
    print(f'one piece -> {name}: mean change of E[y] by the word\'s label: ' + ', '.join(means))

  # 3. the probe's own masks
  dm_config = diffmask_config_from_metadata(metadata)
  depth = summary_depths('input', len(probe.state_dims), dm_config.layers)[0]

  def probe_gates(params, probe_params, batch):
    _, states = model.forward(params, batch)
    return attribute.keep_probs_and_gates(probe, probe_params, dm_config, states,
                                          batch['mask'])[1][depth]

  probe_gates = jax.jit(probe_gates)
  for name, vector in baselines.items():
    logits, closed_per_sentence = [], []
    for batch, count in padded_batches(features, args.batch_size):
      gates = probe_gates(params, probe_params, batch)
      closed = (np.asarray(gates) == 0) & np.asarray(batch['mask'], bool)
      closed_per_sentence.append(closed[:count].sum(-1))
      logits.append(np.asarray(masked(params, batch, gates, vector))[:count])
    logits = np.concatenate(logits)
    closed_per_sentence = np.concatenate(closed_per_sentence)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    clean_predictions, masked_predictions = clean_logits.argmax(-1), logits.argmax(-1)
    flipped = masked_predictions != clean_predictions
    masked_share = closed_per_sentence / features.mask.sum(-1)
    print(f'probe masks at h{depth} ({closed_per_sentence.sum() / features.mask.sum():.1%} of '
          f'tokens) -> {name}: agreement {1 - flipped.mean():.3f}, '
          f'mean change of E[y] {np.mean(probs @ labels - clean_expected):+.3f}, '
          f'predictions per class {per_class(masked_predictions)}')
    print(f'  {flipped.sum()} changed predictions: from class '
          f'{per_class(clean_predictions[flipped])}, to class '
          f'{per_class(masked_predictions[flipped])}; mean share '
          f'of a sentence masked {masked_share[flipped].mean():.3f} where the prediction changed, '
          f'{masked_share[~flipped].mean():.3f} where it did not')

if __name__ == '__main__':
  main()
