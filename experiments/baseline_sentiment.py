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
from dmx.models.bert import BertModel
from dmx.data import sst
from dmx.data.common import padded_batches
from dmx.pipelines.diffmask_text import mask_token_baseline, summary_depths
from dmx.pipelines.explain import diffmask_config_from_metadata, load_model, load_probe


def make_masked_outputs(model: BertModel, probe, dm_config: train.DiffMaskConfig, depth: int):
  """A jitted ``(params, probe_params, batch, keep, baselines) -> (clean, keep, masked)``.

  One clean pass per batch serves every baseline: ``clean`` ``(batch, classes)``,
  ``masked`` ``(num_baselines, batch, classes)`` with the tokens where ``keep``
  ``(batch, seq)`` is 0 replaced by each row of ``baselines``
  ``(num_baselines, hidden)``. ``keep=None`` takes the probe's deterministic
  gates at ``depth``, returned as ``keep``.
  """

  def masked_outputs(params, probe_params, batch, keep, baselines):
    clean, states = model.forward(params, batch)
    if keep is None:
      keep = attribute.keep_probs_and_gates(probe, probe_params, dm_config, states,
                                            batch['mask'])[1][depth]
    masked = jax.lax.map(lambda baseline: train.masked_pass(
        model, params, batch, states, 'input', keep, (baseline,), 0), baselines)
    return clean, keep, masked

  return jax.jit(masked_outputs)


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
  names, stacked = list(baselines), jnp.stack(list(baselines.values()))
  examples = sst.load_sst('dev', args.data)[:args.max_sentences]
  features = sst.encode_sst(examples, tokenizer, int(metadata['max_length']))
  dm_config = diffmask_config_from_metadata(metadata)
  depth = summary_depths('input', len(probe.state_dims), dm_config.layers)[0]
  masked_outputs = make_masked_outputs(model, probe, dm_config, depth)

  def over_dev(keep_of):
    """Clean logits ``(N, C)``, keep ``(N, S)`` and masked logits ``(K, N, C)`` over dev."""
    parts = []
    for batch, count in padded_batches(features, args.batch_size):
      clean, keep, masked = jax.device_get(
          masked_outputs(params, probe_params, batch, keep_of(batch), stacked))
      parts.append((clean[:count], keep[:count], masked[:, :count]))
    return (np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts], axis=1))

  # 1. everything replaced (the clean logits of every later part come from here)
  clean_logits, _, all_masked = over_dev(
      lambda batch: jnp.zeros(batch['mask'].shape, jnp.float32))
  num_classes = clean_logits.shape[-1]
  labels = np.arange(num_classes)
  per_class = lambda predictions: np.bincount(predictions, minlength=num_classes).tolist()
  softmax = lambda logits: np.asarray(jax.nn.softmax(logits, -1), np.float64)
  clean_expected = softmax(clean_logits) @ labels
  norms = {name: float(jnp.linalg.norm(baselines[name])) for name in ('learned', '[MASK]')}
  cosine = float(jnp.dot(learned, baselines['[MASK]'])) / (norms['learned'] * norms['[MASK]'])
  print(f'{folder}: {len(features.labels)} dev sentences; baseline norms: '
        + ', '.join(f'{name} {norm:.3f}' for name, norm in norms.items())
        + f'; cosine(learned, [MASK]) = {cosine:.3f}')
  print(f'clean predictions per class {per_class(clean_logits.argmax(-1))}, '
        f'mean E[y] {clean_expected.mean():.3f}')
  for name, logits in zip(names, all_masked):
    probs = softmax(logits)
    print(f'all tokens -> {name}: mean distribution {np.round(probs.mean(0), 3).tolist()}, '
          f'predictions per class {per_class(logits.argmax(-1))}, '
          f'mean E[y] {np.mean(probs @ labels):.3f}')

  # 2. one sentiment-bearing word piece at a time
  rows, cols = np.nonzero(features.word_ids >= 0)
  piece_labels = features.word_labels[rows, features.word_ids[rows, cols]]
  chosen = piece_labels != sst.NUM_CLASSES // 2
  rows, cols, piece_labels = rows[chosen], cols[chosen], piece_labels[chosen]
  print(f'{len(rows)} sentiment-bearing word pieces, per label {per_class(piece_labels)}')
  shifts = np.empty((len(names), len(rows)))  # (num_baselines, pieces)
  for start in range(0, len(rows), args.batch_size):
    part = slice(start, start + args.batch_size)
    batch = features.take(rows[part]).as_batch()
    keep = np.ones(batch['mask'].shape, np.float32)
    keep[np.arange(len(keep)), cols[part]] = 0.0
    _, _, masked = masked_outputs(params, probe_params, batch, jnp.asarray(keep), stacked)
    shifts[:, part] = softmax(masked) @ labels - clean_expected[rows[part]]
  for name, shift in zip(names, shifts):
    means = [f'{sst.LABEL_NAMES[label]} {shift[piece_labels == label].mean():+.3f}'
             for label in labels if np.any(piece_labels == label)]
    print(f'one piece -> {name}: mean change of E[y] by the word\'s label: ' + ', '.join(means))

  # 3. the probe's own masks
  _, gates, probe_masked = over_dev(lambda batch: None)
  closed_per_sentence = ((gates == 0) & features.mask).sum(-1)
  masked_share = closed_per_sentence / features.mask.sum(-1)
  clean_predictions = clean_logits.argmax(-1)
  for name, logits in zip(names, probe_masked):
    masked_predictions = logits.argmax(-1)
    flipped = masked_predictions != clean_predictions
    print(f'probe masks at h{depth} ({closed_per_sentence.sum() / features.mask.sum():.1%} of '
          f'tokens) -> {name}: agreement {1 - flipped.mean():.3f}, '
          f'mean change of E[y] {np.mean(softmax(logits) @ labels - clean_expected):+.3f}, '
          f'predictions per class {per_class(masked_predictions)}')
    print(f'  {flipped.sum()} changed predictions: from class '
          f'{per_class(clean_predictions[flipped])}, to class '
          f'{per_class(masked_predictions[flipped])}; mean share of a sentence masked '
          f'{masked_share[flipped].mean():.3f} where the prediction changed, '
          f'{masked_share[~flipped].mean():.3f} where it did not')


if __name__ == '__main__':
  main()
