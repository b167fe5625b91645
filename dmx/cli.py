"""The ``dmx`` command line.

``dmx toy --out DIR`` runs the toy experiment end to end (see
:mod:`dmx.pipelines.toy`). Bad arguments end with a one-line error and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
  """A problem with what the user asked for, reported as one line with exit code 2."""


def _writable_dir(value: str) -> Path:
  path = Path(value)
  if path.exists() and not path.is_dir():
    raise UsageError(f'--out {value}: exists and is not a folder')
  parent = path if path.exists() else path.parent
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f'--out {value}: folder {parent} is not writable')
  return path


def _add_toy_parser(subparsers) -> None:
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
  parser.add_argument('--sparsity', choices=('log_l0', 'l0'), default=defaults.sparsity,
                      help="sparsity loss: the original's mean log P(z!=0), or expected L0")
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def _run_toy(args) -> int:
  from dmx.pipelines.toy import ToyExperimentConfig, run_toy
  out = _writable_dir(args.out)
  try:
    config = ToyExperimentConfig(
        seed=args.seed, num_examples=args.num_examples, epochs=args.epochs,
        batch_size=args.batch_size, diffmask_steps=args.diffmask_steps,
        probe_form=args.probe_form, sparsity=args.sparsity,
        model=dataclasses.replace(ToyExperimentConfig().model,
                                  feedforward_dim=args.feedforward_dim))
  except ValueError as error:
    raise UsageError(str(error)) from None
  run_toy(config, out, progress=not args.no_progress)
  print(f'wrote {out / "report.json"}')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='dmx', description='Differentiable Masking in JAX.')
  subparsers = parser.add_subparsers(dest='command', required=True)
  _add_toy_parser(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  commands = {'toy': _run_toy}
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
