"""Self-attention attribution (Hao et al., 2021) on the fine-tuned SST-5 MiniLM.

On the first N SST dev sentences: every head's importance (expected maximum
attribution), the accuracy as heads are pruned most-important-first,
least-important-first and at random, and one sentence's attribution tree.
Writes ``report.json``, ``attribution_tree.txt`` and PNG figures to ``--out``.

    nice -n 10 python experiments/self_attention_attribution_sst.py \\
        --model runs/sst_minilm/model --num-sentences 200 --out runs/self_attention_attribution_sst
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use('Agg')

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from tqdm import tqdm  # pylint: disable=wrong-import-position

from dmx import viz  # pylint: disable=wrong-import-position
from dmx.baselines import attention  # pylint: disable=wrong-import-position
from dmx.data import sst  # pylint: disable=wrong-import-position
from dmx.data.common import length_sorted_index_batches  # pylint: disable=wrong-import-position
from dmx.models.hf_import import load_pretrained  # pylint: disable=wrong-import-position

LENGTH_BUCKET = 16  # pad each batch to a multiple of this: few distinct shapes, few compilations


def length_sorted_batches(features: sst.SstFeatures, batch_size: int):
  """``(indices, batch, labels)`` triples over sentences sorted by length, padding trimmed."""
  for indices, width in length_sorted_index_batches(features.mask.sum(axis=1), batch_size,
                                                    LENGTH_BUCKET, features.mask.shape[1]):
    chunk = features.take(indices)
    yield indices, {key: value[:, :width] for key, value in chunk.as_batch().items()}, chunk.labels


def plot_head_importance(importance: np.ndarray, title: str):
  """Heatmap of ``(layers, heads)`` importance, layer 1 at the bottom."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(0.45 * importance.shape[1] + 2.0,
                                  0.45 * importance.shape[0] + 1.4))
  image = ax.imshow(importance, origin='lower', cmap='viridis', aspect='auto')
  ax.set_xticks(range(importance.shape[1]), [str(h + 1) for h in range(importance.shape[1])])
  ax.set_yticks(range(importance.shape[0]), [str(l + 1) for l in range(importance.shape[0])])
  ax.set_xlabel('head')
  ax.set_ylabel('layer')
  ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, label='E[max attribution]')
  return fig


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='runs/sst_minilm/model',
                      help='fine-tuned SST-5 classifier folder (Hugging Face format)')
  parser.add_argument('--data', default=None, dest='data_dir',
                      help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--split', default='dev', choices=sst.SPLITS)
  parser.add_argument('--num-sentences', type=int, default=200)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=20,
                      help='Riemann steps of the attribution (Hao et al.: 20)')
  parser.add_argument('--importance-target', choices=('predicted', 'gold'), default='predicted',
                      help='label whose probability is attributed for head importance '
                           '(the paper: predicted; its pruning script: gold)')
  parser.add_argument('--levels', type=int, default=13,
                      help='pruning levels from 0 to all heads, evenly spaced')
  parser.add_argument('--random-orders', type=int, default=3,
                      help='random pruning orders averaged for the random curve')
  parser.add_argument('--threshold', type=float, default=0.4,
                      help='attribution-tree edge threshold (Hao et al.: 0.4)')
  parser.add_argument('--tree-top-layer', type=int, default=None,
                      help='highest attention layer (1-based) of the tree; default: the '
                           'second-to-last, as Hao et al.\'s code (the last one only feeds [CLS])')
  parser.add_argument('--tree-sentence', type=int, default=None,
                      help='index (among the N) of the tree sentence; default: the first correctly '
                           'classified one with 8 to 14 tokens')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='runs/self_attention_attribution_sst')
  args = parser.parse_args()
  if args.num_sentences < 1 or args.batch_size < 1 or args.levels < 2:
    raise ValueError('--num-sentences and --batch-size must be >= 1 and --levels >= 2')
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.time()

  model, params, tokenizer = load_pretrained(args.model, head='classification',
                                             random_head=False)
  examples = sst.load_sst(args.split, args.data_dir, limit=args.num_sentences)
  features = sst.encode_sst(examples, tokenizer, max_length=min(
      128, model.config.max_sequence_length))
  batches = list(length_sorted_batches(features, args.batch_size))
  order = np.concatenate([indices for indices, _, _ in batches])
  labels = features.labels[order]
  config = model.config
  total_heads = config.num_layers * config.num_heads
  print(f'{len(examples)} {args.split} sentences ({features.num_truncated} truncated), '
        f'{config.num_layers} layers x {config.num_heads} heads')

  # head importance: E_x[max_{q,k} Attr_h(A)] over the N sentences
  targets = None
  if args.importance_target == 'gold':
    targets = [batch_labels for _, _, batch_labels in batches]
  with tqdm(total=len(examples), desc='head importance', unit='sentence') as bar:
    importance = attention.head_importance(
        model, params, [batch for _, batch, _ in batches], targets=targets, steps=args.steps,
        progress=bar.update)
  importance_seconds = time.time() - started

  # pruning curves on the same sentences
  num_pruned = sorted({int(round(f * total_heads)) for f in np.linspace(0, 1, args.levels)})
  pruning_batches = [batch for _, batch, _ in batches]
  pruning_labels = [batch_labels for _, _, batch_labels in batches]
  with tqdm(total=len(num_pruned) * (2 + args.random_orders), desc='pruning', unit='level') as bar:
    ranked = attention.head_pruning_curve(
        model, params, pruning_batches, importance.importance, labels=pruning_labels,
        num_pruned=num_pruned, orders=('most_important_first', 'least_important_first'),
        progress=bar.update)
    random_curves = [attention.head_pruning_curve(
        model, params, pruning_batches, importance.importance, labels=pruning_labels,
        num_pruned=num_pruned, orders=('random',), seed=args.seed + repeat, progress=bar.update)
                     for repeat in range(args.random_orders)]
  random_accuracy = np.stack([curve.accuracy[0] for curve in random_curves])
  random_agreement = np.stack([curve.agreement[0] for curve in random_curves])
  curve = attention.PruningCurve(
      num_pruned=ranked.num_pruned, fraction_pruned=ranked.fraction_pruned,
      orders=ranked.orders + ('random',),
      head_orders=np.concatenate([ranked.head_orders, random_curves[0].head_orders]),
      agreement=np.concatenate([ranked.agreement, random_agreement.mean(0, keepdims=True)]),
      accuracy=np.concatenate([ranked.accuracy, random_accuracy.mean(0, keepdims=True)]))

  # one attribution tree
  predictions = np.concatenate([np.asarray(jax.numpy.argmax(model.forward(params, batch)[0], -1))
                                for _, batch, _ in batches])
  predicted = np.empty_like(predictions)
  predicted[order] = predictions
  lengths = features.mask.sum(axis=1)
  if args.tree_sentence is None:
    candidates = [i for i in range(len(examples))
                  if 8 <= lengths[i] <= 14 and predicted[i] == features.labels[i]]
    tree_index = candidates[0] if candidates else 0
  else:
    tree_index = args.tree_sentence
    if not 0 <= tree_index < len(examples):
      raise ValueError(f'--tree-sentence must be in [0, {len(examples)}), got {tree_index}')
  length = int(lengths[tree_index])
  tree_batch = {key: value[tree_index:tree_index + 1, :length]
                for key, value in features.as_batch().items()}
  tokens = tokenizer.convert_ids_to_tokens(tree_batch['input_ids'][0].tolist())
  tree_attributions = [attention.jitted_self_attention_attribution(
      model, params, tree_batch, layer_index=layer, steps=args.steps)
                       for layer in tqdm(range(config.num_layers), desc='tree', unit='layer')]
  tree_scores = np.stack([np.asarray(result.scores[0]) for result in tree_attributions])
  top_layer = (config.num_layers - 2 if args.tree_top_layer is None
               else args.tree_top_layer - 1)
  tree = attention.attribution_tree(tree_scores, tokens, args.threshold,
                                    top_layer=max(top_layer, 0))
  tree_text = attention.format_attribution_tree(tree, tokens)
  # for comparison, the tree hanging from [CLS] in the last layer
  full_tree = attention.attribution_tree(tree_scores, tokens, args.threshold)
  full_tree_text = attention.format_attribution_tree(full_tree, tokens)
  completeness = [float(result.convergence_delta[0]
                        / (result.target_score[0] - result.baseline_score[0]))
                  for result in tree_attributions]

  # figures
  label_names = sst.LABEL_NAMES
  viz.save_figure(plot_head_importance(
      importance.importance,
      f'Head importance (self-attention attribution), {len(examples)} SST {args.split} '
      f'sentences'), out / 'head_importance.png')
  majority = float(np.mean(labels == np.bincount(labels).argmax()))
  viz.save_figure(attention.plot_pruning_curve(
      curve, 'accuracy', reference=majority, reference_label='majority class',
      title=f'Pruning heads of the SST-5 MiniLM ({len(examples)} {args.split} sentences)'),
      out / 'pruning_accuracy.png')
  viz.save_figure(attention.plot_pruning_curve(
      curve, 'agreement', title='Agreement with the unpruned predictions'),
      out / 'pruning_agreement.png')
  viz.save_figure(attention.plot_attribution_tree(
      tree, tokens, title=f'Attribution tree (threshold {args.threshold}); prediction: '
      f'{label_names[predicted[tree_index]]}'), out / 'attribution_tree.png')
  (out / 'attribution_tree.txt').write_text(f'{examples[tree_index].text}\n\n{tree_text}\n\n'
                                            f'{full_tree_text}\n')

  report = {
      'config': vars(args),
      'num_sentences': len(examples),
      'accuracy_unpruned': float(np.mean(predictions == labels)),
      'majority_class_accuracy': majority,
      'importance': importance.importance.tolist(),
      'ranking_most_important_first': importance.ranking.tolist(),
      'pruning': {
          'num_pruned': curve.num_pruned.tolist(),
          'fraction_pruned': curve.fraction_pruned.tolist(),
          'orders': list(curve.orders),
          'accuracy': curve.accuracy.tolist(),
          'agreement': curve.agreement.tolist(),
          'random_accuracy_per_order': random_accuracy.tolist(),
      },
      'tree': {
          'sentence_index': tree_index,
          'text': examples[tree_index].text,
          'label': int(features.labels[tree_index]),
          'prediction': int(predicted[tree_index]),
          'tokens': tokens,
          'threshold': args.threshold,
          'top_layer': tree.top_layer + 1,
          'edges': [[edge._asdict() for edge in layer] for layer in tree.edges],
          'edges_from_last_layer': [[edge._asdict() for edge in layer]
                                    for layer in full_tree.edges],
          'rendering_from_last_layer': full_tree_text,
          'relative_completeness_error_per_layer': completeness,
          'rendering': tree_text,
      },
      'seconds': {'head_importance': importance_seconds, 'total': time.time() - started},
  }
  (out / 'report.json').write_text(json.dumps(report, indent=2) + '\n')
  print(f'unpruned accuracy {report["accuracy_unpruned"]:.3f} (majority class {majority:.3f})')
  for name, row in zip(curve.orders, curve.accuracy):
    print(f'{name:>22}: ' + ' '.join(f'{value:.3f}' for value in row))
  print('heads pruned:          ' + ' '.join(f'{count:5d}' for count in curve.num_pruned))
  print(examples[tree_index].text)
  print(tree_text)
  print(full_tree_text)
  print(f'wrote {out} in {time.time() - started:.0f} s')


if __name__ == '__main__':
  main()
