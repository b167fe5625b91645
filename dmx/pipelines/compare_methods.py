"""``dmx compare toy``: every attribution method on the toy task, next to the paper's Table 1.

Runs the toy experiment (:func:`dmx.pipelines.toy.run_toy`: DiffMask with
input and hidden gates) with every baseline dmx has, each attributing to the
feed-forward state ``h1`` and scored against the ground truth the same way
(see :mod:`dmx.pipelines.toy` for the normalisation): the paper's integrated
gradients, Schulz et al. (capacity in bits, and the original code's
``sigmoid(alpha)`` as ``schulz_gate``), Guan et al. and exact erasure, plus
plain gradients, gradient x input, occlusion and LIME. Erasure, occlusion and
LIME erase to DiffMask's learned hidden-gate baseline unless
``--erased-state zeros``. ``--model DIR`` reuses
a trained toy classifier (a ``toy_model`` folder of ``dmx toy``): the data and
settings are then read from its ``metadata.json``, and it is never
overwritten. Writes ``report.json`` (``run_toy``'s, plus ``paper`` and
``checks``) and ``report.md``, a markdown table with the paper's values and
the original code's notebook's side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

from dmx import baselines, checkpoint
from dmx.models.toy import ToyModelConfig
from dmx.pipelines.toy import (BASELINES, ERASED_STATES, TABLE1_BASELINES, ToyExperimentConfig,
                               run_toy)

# paper Table 1, (D_KL, D_JS) in nats; None: not given (erasure's D_KL is infinite)
PAPER_TABLE1 = {'erasure': (None, 0.26), 'integrated_gradients': (0.48, 0.14),
                'schulz': (1.21, 0.19), 'guan': (0.78, 0.22), 'diffmask_hidden': (0.00, 0.00)}
# what the original code's ToyTask notebook printed (its Schulz entry is the sigmoid variant)
ORIGINAL_NOTEBOOK = {'erasure': (None, 0.2664), 'integrated_gradients': (1.3551, 0.2703),
                     'schulz_gate': (1.1589, 0.1892), 'guan': (0.8610, 0.2320),
                     'diffmask_hidden': (0.0372, 0.0128)}
# the paper row each dmx method is compared with
PAPER_ROW = {name: name for name in PAPER_TABLE1} | {'schulz_gate': 'schulz'}
# how far a baseline's D_JS may be from the paper's (the bar)
JS_TOLERANCE = 0.1

DESCRIPTIONS = {
    'diffmask_input': 'DiffMask, input gates (votes up to h1)',
    'diffmask_hidden': 'DiffMask, hidden gates at h1 (the paper\'s row)',
    'integrated_gradients': 'integrated gradients (Sundararajan et al., 2017)',
    'schulz': 'Schulz et al. (2020), capacity in bits',
    'schulz_gate': 'Schulz et al., sigmoid(alpha) (the original code\'s)',
    'guan': 'Guan et al. (2019), 1 / sigma',
    'erasure': 'exact erasure search',
    'gradient': 'gradient (L2 norm)',
    'gradient_times_input': 'gradient x input',
    'occlusion': 'occlusion (leave-one-out)',
    'lime': 'LIME',
}


def config_from_model(model_dir: str | Path, **overrides) -> ToyExperimentConfig:
  """The toy config a saved toy classifier was trained with, plus ``overrides``.

  One-line ``ValueError`` if ``model_dir`` holds no toy-model checkpoint.
  """
  model_dir = Path(model_dir)
  if not (model_dir / 'metadata.json').is_file():
    raise ValueError(f'--model {model_dir}: no metadata.json; expected the toy_model folder '
                     'of a dmx toy run')
  saved = checkpoint.read_metadata(model_dir)
  try:
    config = ToyExperimentConfig(**{**saved, 'model': ToyModelConfig(**saved['model']),
                                    **overrides})
  except (TypeError, KeyError) as error:
    raise ValueError(f'--model {model_dir}: metadata.json does not describe a dmx toy model '
                     f'({error})') from None
  if config.model_fingerprint() != saved:
    raise ValueError(f'--model {model_dir}: metadata.json does not match any dmx toy config')
  return config


def table1_checks(methods: dict) -> dict:
  """The issue's claims about Table 1, computed from ``report['methods']``.

  ``diffmask_best_kl`` / ``diffmask_best_js``: DiffMask's hidden gates
  beat every baseline (an infinite ``D_KL`` loses); ``erasure_delta``: every
  erasure answer keeps a single digit; ``js_within_tolerance``: per Table 1
  baseline, ``|D_JS - paper| <= 0.1``.
  """
  kl = lambda entry: math.inf if entry['kl'] is None else entry['kl']
  diffmask = methods.get('diffmask_hidden')
  others = {name: entry for name, entry in methods.items() if not name.startswith('diffmask')}
  checks = {}
  if diffmask is not None and others:
    checks['diffmask_best_kl'] = all(kl(diffmask) < kl(entry) for entry in others.values())
    checks['diffmask_best_js'] = all(diffmask['js'] < entry['js'] for entry in others.values())
  if 'erasure' in methods:
    checks['erasure_delta'] = methods['erasure']['settings']['single_position_fraction'] == 1.0
  checks['js_within_tolerance'] = {
      name: abs(methods[name]['js'] - PAPER_TABLE1[name][1]) <= JS_TOLERANCE
      for name in TABLE1_BASELINES if name in methods}
  return checks


def _number(value) -> str:
  return '—' if value is None else f'{value:.3f}'


def format_markdown(report: dict, command: str) -> str:
  """``report.md``: the toy model, the table of every method, the checks, how it was scored."""
  model, methods, config = report['model'], report['methods'], report['config']
  baseline_entry = next((methods[name] for name in BASELINES if name in methods), None)
  lines = [
      '# Toy task, Table 1: attributions to the feed-forward states against the ground truth',
      '',
      f'Command: `{command}` (seed {config["seed"]}).',
      '',
      f'Toy classifier: validation accuracy {model["val_accuracy"]:.4f} on '
      f'{model["num_validation"]} examples. DiffMask is scored on all of them; the baselines on '
      f'the first {config["baseline_examples"]}'
      + (f' ({baseline_entry["num_examples"]} of which hold an n or an m).'
         if baseline_entry else '.'),
      '',
      '| method | D_KL | D_JS | paper D_KL | paper D_JS | abs(D_JS − paper) | '
      'original notebook D_KL / D_JS | seconds |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for name, entry in methods.items():
    paper = PAPER_TABLE1.get(PAPER_ROW.get(name, ''), None)
    notebook = ORIGINAL_NOTEBOOK.get(name)
    kl = '∞ (' + str(entry['infinite_kl_examples']) + ' examples)' if (
        entry['kl'] is None) else f'{entry["kl"]:.4f}'
    gap = '' if paper is None else f'{abs(entry["js"] - paper[1]):.3f}'
    seconds = f'{entry["seconds"]:.1f}' if 'seconds' in entry else ''
    lines.append(
        f'| {DESCRIPTIONS.get(name, name)} (`{name}`) | {kl} | {entry["js"]:.4f} | '
        f'{"" if paper is None else _number(paper[0])} | '
        f'{"" if paper is None else _number(paper[1])} | {gap} | '
        f'{"" if notebook is None else _number(notebook[0]) + " / " + _number(notebook[1])} | '
        f'{seconds} |')
  checks = report['checks']
  lines += ['', '## Checks', '']
  for name, value in checks.items():
    lines.append(f'- `{name}`: {value}')
  if 'erasure' in methods:
    settings = methods['erasure']['settings']
    lines.append(f'- erasure kept {settings["mean_kept"]:.3f} positions on average; '
                 f'{100 * settings["single_position_fraction"]:.1f}% of its answers keep one '
                 f'digit ({settings["mean_optimal_subsets"]:.2f} equally small valid subsets per '
                 f'example on average)')
  lines += [
      '', '## How it is scored', '',
      'Every method attributes to the feed-forward state h1 through `forward_from` (DiffMask\'s '
      'injection point). Signed scores (integrated gradients and gradient x input summed over '
      'the state\'s features, occlusion, LIME) are replaced by their magnitude; every method\'s '
      'scores are then normalised per example to a distribution over the real positions and '
      'compared with the ground truth (uniform over the positions holding n or m) by '
      'D_KL(ground truth || method) and D_JS, in nats, averaged over the examples holding an n '
      'or an m, as the original code\'s toy notebook did. Erasure, occlusion and LIME replace an '
      'erased h1 state by `config.erased_state` (DiffMask\'s learned hidden-gate baseline by '
      'default: erasure then erases as DiffMask masks); integrated gradients start from zeros. '
      'D_KL is infinite when a method puts no '
      'mass on a position holding n or m (erasure\'s deltas always do). The toy model has no '
      'attention, so there is no attention row. Settings of each method: `report.json`, '
      '`methods.<name>.settings`.',
  ]
  return '\n'.join(lines) + '\n'


def run_compare_toy(config: ToyExperimentConfig, out_dir: str | Path, *,
                    model_dir: str | Path | None = None, progress: bool = True,
                    log: Callable[[str], None] = print, command: str = 'dmx compare toy') -> dict:
  """Runs the toy experiment with every baseline; writes ``report.json`` and ``report.md``."""
  out_dir = Path(out_dir)
  report = run_toy(config, out_dir, progress=progress, log=log, baseline_names=BASELINES,
                   model_dir=model_dir)
  report['command'] = command
  report['paper'] = {'table1': {name: dict(kl=kl, js=js) for name, (kl, js) in
                                PAPER_TABLE1.items()},
                     'original_notebook': {name: dict(kl=kl, js=js) for name, (kl, js) in
                                           ORIGINAL_NOTEBOOK.items()}}
  report['checks'] = table1_checks(report['methods'])
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  (out_dir / 'report.md').write_text(format_markdown(report, command))
  return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx compare toy``."""
  defaults = ToyExperimentConfig()
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--model', default=None,
                      help='a trained toy classifier (the toy_model folder of a dmx toy run); '
                      'its data and settings are reused. Default: train one (or reuse '
                      'OUT/toy_model)')
  parser.add_argument('--seed', type=int, default=defaults.seed,
                      help='data and model seed (ignored with --model: the model\'s own)')
  parser.add_argument('--diffmask-steps', type=int, default=defaults.diffmask_steps,
                      help='DiffMask training steps per gate type')
  parser.add_argument('--examples', type=int, default=None,
                      help='validation examples the baselines are scored on (default: all)')
  parser.add_argument('--baseline-steps', type=int, default=defaults.baseline_steps,
                      help='optimisation steps of Schulz et al. and Guan et al. per example')
  parser.add_argument('--ig-steps', type=int, default=defaults.ig_steps,
                      help='integrated-gradients path points')
  parser.add_argument('--ig-variant', choices=baselines.IG_VARIANTS, default=defaults.ig_variant,
                      help='paper: gradient at the path point (Sundararajan et al.); original: '
                      'the released DiffMask code\'s gradient with respect to the input, '
                      'an extra factor alpha')
  parser.add_argument('--erased-state', choices=ERASED_STATES, default=defaults.erased_state,
                      help='what erasure, occlusion and LIME put in place of an erased h1 state: '
                      'DiffMask\'s learned hidden-gate baseline, or zeros')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def command_line(args: argparse.Namespace) -> str:
  """The ``dmx compare toy`` command ``args`` stand for, every option spelled out."""
  parts = ['dmx compare toy', f'--out {args.out}']
  if args.model is not None:
    parts.append(f'--model {args.model}')
  else:
    parts.append(f'--seed {args.seed}')
  parts += [f'--diffmask-steps {args.diffmask_steps}', f'--baseline-steps {args.baseline_steps}',
            f'--ig-steps {args.ig_steps}', f'--ig-variant {args.ig_variant}',
            f'--erased-state {args.erased_state}']
  if args.examples is not None:
    parts.append(f'--examples {args.examples}')
  return ' '.join(parts)


def run_from_args(args: argparse.Namespace) -> dict:
  """Builds the config from ``args`` and runs :func:`run_compare_toy`."""
  options = dict(diffmask_steps=args.diffmask_steps, baseline_steps=args.baseline_steps,
                 ig_steps=args.ig_steps, ig_variant=args.ig_variant,
                 erased_state=args.erased_state)
  if args.model is not None:
    config = config_from_model(args.model, **options)
  else:
    config = ToyExperimentConfig(seed=args.seed, **options)
  num_validation = config.num_examples - int(round(config.num_examples *
                                                   (1 - config.validation_fraction)))
  examples = num_validation if args.examples is None else args.examples
  if examples < 1:
    raise ValueError(f'--examples must be >= 1, got {examples}')
  config = dataclasses.replace(config, baseline_examples=examples)
  return run_compare_toy(config, args.out, model_dir=args.model, progress=not args.no_progress,
                         command=command_line(args))
