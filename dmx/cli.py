"""The ``dmx`` command line.

``dmx toy --out DIR`` runs the toy experiment end to end (see
:mod:`dmx.pipelines.toy`); ``dmx finetune sst --model PATH --out DIR``
fine-tunes a BERT-family classifier on SST-5 (:mod:`dmx.pipelines.finetune`);
``dmx diffmask sst|squad --model DIR --gate input|hidden --out DIR`` trains
and evaluates DiffMask probes on a frozen fine-tuned model
(:mod:`dmx.pipelines.diffmask_text`); ``dmx explain --probe DIR "a sentence"``
prints and plots one sentence's keep probabilities with a trained probe
(:mod:`dmx.pipelines.explain`); ``dmx bench step --impl jax|torch`` times one
DiffMask training step and ``dmx bench attribution`` amortised attribution
against integrated gradients, each printing one JSON line (:mod:`dmx.bench`);
``dmx sweep toy|sst --seeds 0 1 2 3 4`` trains K probes in one program
(:mod:`dmx.pipelines.sweep`); ``dmx compare toy --out DIR`` scores every
attribution method on the toy task next to the paper's Table 1
(:mod:`dmx.pipelines.compare_methods`); ``dmx compare relaxations --out DIR``
trains the toy probe (or, with ``--task sst``, the SST probe) with each gate
relaxation and compares them (:mod:`dmx.pipelines.compare_relaxations`);
``dmx compare sst --model DIR --out DIR`` scores every method's faithfulness on
SST sentences (ERASER AOPC) and draws the paper's Figure 5
(:mod:`dmx.pipelines.compare_sst`); ``dmx compare sst-erasure --out DIR``
reproduces the paper's Table 2, per-example DiffMask and REINFORCE against
exact erasure (:mod:`dmx.pipelines.compare_erasure`).
Bad arguments end with a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
  """A problem with what the user asked for, reported as one line with exit code 2."""


def _writable_dir(value: str) -> Path:
  from dmx.pipelines import checked_output_folder
  try:
    return checked_output_folder(value)
  except ValueError as error:
    raise UsageError(str(error)) from None


def _add_toy_parser(subparsers) -> None:
  from dmx import objective
  from dmx.pipelines.toy import ToyExperimentConfig
  defaults = ToyExperimentConfig()
  parser = subparsers.add_parser(
      'toy', help='the toy task of the paper (sec. 4.1) end to end',
      description='Train the toy classifier, train DiffMask probes on it, and score their '
      'attributions against the ground truth (paper Table 1).')
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--seed', type=int, default=defaults.seed)
  parser.add_argument('--num-examples', type=int, default=defaults.num_examples)
  parser.add_argument('--epochs', type=int, default=defaults.epochs,
                      help='epochs of toy-model training')
  parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
  parser.add_argument('--feedforward-dim', type=int, default=defaults.model.feedforward_dim,
                      help='width of the feed-forward states (2 is the paper\'s bottleneck)')
  parser.add_argument('--diffmask-steps', type=int, default=defaults.diffmask_steps,
                      help='DiffMask training steps per gate type')
  parser.add_argument('--probe-form', choices=('mlp', 'bilinear'), default=defaults.probe_form)
  parser.add_argument('--sparsity', choices=objective.SPARSITY_LOSSES, default=defaults.sparsity,
                      help="sparsity loss: the original's mean log P(z!=0), or expected L0")
  parser.add_argument('--baseline-examples', type=int, default=defaults.baseline_examples,
                      help='validation examples the Table 1 baselines are scored on (0: none)')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def _run_toy(args) -> int:
  from dmx.pipelines.toy import ToyExperimentConfig, run_toy
  out = _writable_dir(args.out)
  try:
    config = ToyExperimentConfig(
        seed=args.seed, num_examples=args.num_examples, epochs=args.epochs,
        batch_size=args.batch_size, diffmask_steps=args.diffmask_steps,
        probe_form=args.probe_form, sparsity=args.sparsity,
        baseline_examples=args.baseline_examples,
        model=dataclasses.replace(ToyExperimentConfig().model,
                                  feedforward_dim=args.feedforward_dim))
  except ValueError as error:
    raise UsageError(str(error)) from None
  run_toy(config, out, progress=not args.no_progress)
  print(f'wrote {out / "report.json"}')
  return 0


def _add_finetune_parser(subparsers) -> None:
  from dmx.pipelines import finetune
  parser = subparsers.add_parser('finetune', help='fine-tune a classifier to probe later')
  tasks = parser.add_subparsers(dest='task', required=True)
  finetune.add_arguments(tasks.add_parser(
      'sst', help='SST-5 sentence sentiment', description='Fine-tune a BERT-family model on '
      'SST-5 with optax; writes a Hugging Face-style model folder and report.json.'))


def _run_finetune(args) -> int:
  from dmx.pipelines import finetune
  _writable_dir(args.out)
  try:
    return finetune.run_from_args(args)
  except ValueError as error:
    raise UsageError(str(error)) from None


def _add_diffmask_parser(subparsers) -> None:
  from dmx.pipelines import diffmask_text
  parser = subparsers.add_parser('diffmask', help='DiffMask probes on a frozen fine-tuned model')
  tasks = parser.add_subparsers(dest='task', required=True)
  for task, what in (('sst', 'an SST-5 classifier'), ('squad', 'a SQuAD question-answering model')):
    diffmask_text.add_arguments(tasks.add_parser(
        task, help=f'probes on {what}', description=f'Train input- or hidden-gate DiffMask probes '
        f'for every layer of {what} and evaluate them (report.json, keep_prob.npz, figures).'), task)


def _run_diffmask(args) -> int:
  from dmx.checkpoint import CheckpointError
  from dmx.pipelines import diffmask_text
  _writable_dir(args.out)
  try:
    diffmask_text.run_from_args(args, args.task)
  except (ValueError, CheckpointError) as error:
    raise UsageError(str(error)) from None
  print(f'wrote {Path(args.out) / "report.json"}')
  return 0


def _add_explain_parser(subparsers) -> None:
  from dmx.pipelines import explain
  explain.add_arguments(subparsers.add_parser(
      'explain', help='per-layer keep probabilities of one sentence with a trained probe',
      description='Explain one sentence with a trained DiffMask probe (from dmx diffmask sst): '
      'prints the keep probability of every token at every depth and writes a heatmap PNG.'))


def _run_explain(args) -> int:
  from dmx.pipelines import explain
  try:
    return explain.run_from_args(args)
  except ValueError as error:
    raise UsageError(str(error)) from None


def _add_bench_parser(subparsers) -> None:
  from dmx import bench  # torch stays unimported until --impl torch runs
  sizes, impls, gates, dtypes = bench.SIZES, bench.IMPLS, bench.GATES, bench.DTYPES
  parser = subparsers.add_parser('bench', help='speed benchmarks; each prints one JSON line')
  kinds = parser.add_subparsers(dest='kind', required=True)
  step = kinds.add_parser(
      'step', help='time one DiffMask training step (dmx or PyTorch)',
      description='Time one DiffMask training step on a random-init BERT classifier: dmx\'s '
      'jitted step (--impl jax) or a PyTorch step written as the original code (--impl torch: '
      'transformers BERT, hooks, whole model re-run). Timed steps cycle through every depth. '
      'Prints one JSON line with examples_per_s and peak_memory_mb.')
  step.add_argument('--impl', choices=impls, required=True)
  step.add_argument('--size', choices=sizes, default='tiny',
                    help='tiny (2 layers, 32 wide), minilm (MiniLM-L6-H384) or base (BERT-base)')
  step.add_argument('--batch', type=int, default=32)
  step.add_argument('--seq', type=int, default=64)
  step.add_argument('--gate', choices=gates, default='hidden')
  step.add_argument('--steps', type=int, default=None,
                    help='timed steps (default: one per depth, L + 2)')
  step.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  step.add_argument('--dtype', choices=dtypes, default='float32')
  step.add_argument('--layer', type=int, default=None,
                    help='time this depth only (default: cycle through all depths)')
  step.add_argument('--threads', type=int, default=None,
                    help='torch.set_num_threads for --impl torch (default: all cores)')
  step.add_argument('--cached-clean-pass', action='store_true',
                    help='--impl jax: the batch carries its clean pass, computed once, as '
                    'dmx diffmask trains when the training set\'s clean pass fits its cache')
  attribution = kinds.add_parser(
      'attribution', help='amortised DiffMask attribution vs integrated gradients',
      description='Examples/s of DiffMask attribution (one clean pass + probe: keep '
      'probabilities at every depth) against integrated gradients of the predicted logit '
      'w.r.t. the word embeddings, on the same random-init dmx BERT. Prints one JSON line.')
  attribution.add_argument('--size', choices=sizes, default='tiny')
  attribution.add_argument('--batch', type=int, default=32)
  attribution.add_argument('--seq', type=int, default=64)
  attribution.add_argument('--ig-steps', type=int, default=50, help='integrated-gradients steps')
  attribution.add_argument('--ig-batch', type=int, default=None,
                           help='examples per integrated-gradients call (default: --batch)')
  attribution.add_argument('--path-batch-size', type=int, default=10,
                           help='path points vectorised together')
  attribution.add_argument('--repeats', type=int, default=3, help='timed DiffMask calls')
  attribution.add_argument('--ig-repeats', type=int, default=1,
                           help='timed integrated-gradients calls')
  attribution.add_argument('--warmup', type=int, default=1, help='untimed DiffMask calls')
  attribution.add_argument('--dtype', choices=dtypes, default='float32')


def _run_bench(args) -> int:
  import json
  from dmx import bench
  try:
    if args.kind == 'step':
      result = bench.time_step(args.impl, args.size, args.batch, args.seq, args.gate, args.steps,
                               args.warmup, args.dtype, args.layer, args.threads,
                               args.cached_clean_pass)
    else:
      result = bench.time_attribution(
          args.size, args.batch, args.seq, args.ig_steps, ig_batch=args.ig_batch,
          path_batch_size=args.path_batch_size, repeats=args.repeats,
          ig_repeats=args.ig_repeats, warmup=args.warmup, dtype=args.dtype)
  except (ValueError, bench.MissingTorchError) as error:
    raise UsageError(str(error)) from None
  print(json.dumps(result), flush=True)
  return 0


def _add_sweep_parser(subparsers) -> None:
  from dmx.pipelines import sweep
  parser = subparsers.add_parser('sweep', help='K probes that differ in seed, in one program')
  tasks = parser.add_subparsers(dest='task', required=True)
  sweep.add_arguments(tasks.add_parser(
      'toy', help='the toy task', description='Train K DiffMask probes on the toy classifier '
      'in one vmapped program; report the spread of attributions across seeds and the cost '
      'against K separate runs (report.json).'))
  sweep.add_sst_arguments(tasks.add_parser(
      'sst', help='a fine-tuned SST-5 classifier (the paper\'s 5-seed stability experiment)',
      description='Train K dmx diffmask sst probes that differ in seed in one vmapped program; '
      'report the spread of attributions across seeds, each member\'s masked fraction and '
      'agreement, and the cost against K separate runs (report.json).'))


def _run_sweep(args) -> int:
  from dmx.checkpoint import CheckpointError
  from dmx.pipelines import sweep
  out = _writable_dir(args.out)
  try:
    if args.task == 'sst':
      sweep.run_sst_from_args(args)
    else:
      sweep.run_toy_sweep(sweep.config_from_args(args), out, progress=not args.no_progress)
  except (ValueError, CheckpointError) as error:
    raise UsageError(str(error)) from None
  print(f'wrote {out / "report.json"}')
  return 0


def _add_compare_parser(subparsers) -> None:
  from dmx.pipelines import compare_erasure, compare_methods, compare_relaxations, compare_sst
  parser = subparsers.add_parser('compare', help='attribution methods side by side (paper tables)')
  tasks = parser.add_subparsers(dest='task', required=True)
  compare_methods.add_arguments(tasks.add_parser(
      'toy', help='every method on the toy task (Table 1)', description='Score DiffMask and every '
      'baseline (integrated gradients, Schulz et al., Guan et al., erasure, gradients, occlusion, '
      'LIME) against the toy task\'s ground truth; report.json and report.md with the paper\'s '
      'values side by side.'))
  compare_relaxations.add_arguments(tasks.add_parser(
      'relaxations', help='gate relaxations on the toy task or SST',
      description='Train the toy task\'s (or, with --task sst, SST\'s) DiffMask probe once per '
      'gate relaxation (Hard Concrete, Binary Concrete, HardKuma, straight-through Bernoulli, '
      'REINFORCE); report D_JS to the ground truth (toy only), sparsity, agreement, gradient '
      'variance and wall time (report.json, report.md, relaxations.png).'))
  compare_sst.add_arguments(tasks.add_parser(
      'sst', help='faithfulness of every method on SST sentences (ERASER AOPC), and Figure 5',
      description='Score random, gradients, gradient x input, integrated gradients, Schulz et '
      'al., Guan et al., occlusion, LIME, attention and DiffMask input gates by ERASER '
      'comprehensiveness and sufficiency (AOPC) on SST sentences, erasing to one shared '
      'baseline; --figure5-sentence also draws the paper\'s Figure 5 (report.json, report.md, '
      'per_example.npz, figure5.png).'))
  compare_erasure.add_arguments(tasks.add_parser(
      'sst-erasure',
      help='per-example DiffMask and REINFORCE against exact erasure on SST (Table 2)',
      description='Train (or reuse) a recurrent SST-5 classifier, run exact erasure on dev '
      'sentences of at most 25 words and score per-example DiffMask and REINFORCE masks against '
      'every optimal set (precision, recall, F1, sparsity, optimality; report.json, report.md).'))


def _run_compare(args) -> int:
  from dmx.checkpoint import CheckpointError
  from dmx.pipelines import compare_erasure, compare_methods, compare_relaxations, compare_sst
  _writable_dir(args.out)
  runners = {'toy': compare_methods.run_from_args,
             'relaxations': compare_relaxations.run_from_args,
             'sst': compare_sst.run_from_args,
             'sst-erasure': compare_erasure.run_from_args}
  try:
    runners[args.task](args)
  except (ValueError, CheckpointError) as error:
    raise UsageError(str(error)) from None
  print(f'wrote {Path(args.out) / "report.json"} and report.md')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='dmx', description='Differentiable Masking in JAX.')
  subparsers = parser.add_subparsers(dest='command', required=True)
  _add_toy_parser(subparsers)
  _add_finetune_parser(subparsers)
  _add_diffmask_parser(subparsers)
  _add_explain_parser(subparsers)
  _add_bench_parser(subparsers)
  _add_sweep_parser(subparsers)
  _add_compare_parser(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  commands = {'toy': _run_toy, 'finetune': _run_finetune, 'diffmask': _run_diffmask,
              'explain': _run_explain, 'bench': _run_bench,
              'sweep': _run_sweep, 'compare': _run_compare}
  try:
    return commands[args.command](args)
  except UsageError as error:
    print(f'dmx {args.command}: error: {error}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'dmx {args.command}: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
