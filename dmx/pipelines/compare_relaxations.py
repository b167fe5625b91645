"""``dmx compare relaxations``: the gate relaxations side by side on the toy task.

For each relaxation of :mod:`dmx.relaxations` (Hard Concrete, Binary
Concrete, HardKuma, straight-through Bernoulli, REINFORCE), train the toy
task's DiffMask probe exactly as ``dmx toy`` trains its hidden-gate probe
(same data, classifier, probe initialisation, batch order and key stream; only
the relaxation differs) and measure, on the validation set at the
feed-forward state ``h1`` (the paper's Table 1 state):

* ``js``: ``D_JS`` between the keep probabilities and the ground truth, as
  ``dmx toy`` scores DiffMask (:func:`dmx.metrics.attribution_divergences`);
* ``sparsity``: the fraction of real tokens whose test-time gate is exactly 0;
* ``agreement``: the fraction of examples whose prediction survives masking
  with the test-time gates;
* ``grad_variance``: the variance of the probe's gradient estimate over
  independent draws of the gate noise (``variance_draws``, 1024 by default) on
  one fixed batch (the first ``diffmask_batch_size`` validation examples),
  at depth ``h1``, at each relaxation's trained parameters and with the
  multiplier set to 1 (so that runs whose multipliers ended differently
  compare; the sparsity term is in closed form and adds no variance). It is
  the trace of the covariance of the gradient of the vote parameters (the
  baseline vectors left out), i.e. the sum of per-coordinate variances. The
  same number at the shared initial parameters is under ``details``;
* ``seconds``: wall time of the training (compilation included).

Writes ``report.json`` (``{"relaxations": {name: {js, sparsity, agreement,
grad_variance, seconds}}}`` plus ``settings``, ``checks`` and ``details``),
``report.md`` (a markdown table) and ``relaxations.png``, and each trained
probe under ``probe_<name>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmx import attribute, checkpoint, metrics, probes, relaxations, train, viz
from dmx.data.toy import generate_toy_data, ground_truth_attribution, split_toy_data
from dmx.models.toy import STATE_NAMES, accuracy
from dmx.pipelines import toy as toy_pipeline

# the bar for every relaxation's masked-pass agreement
AGREEMENT_BAR = 0.95
# gate-noise draws for the gradient variance: the pathwise gradients of the
# low-temperature relaxations are heavy-tailed, and 64 draws gave estimates
# that moved by a factor of 2 with the key
DEFAULT_VARIANCE_DRAWS = 1024
_DRAWS_PER_CHUNK = 32

DESCRIPTIONS = {
    'hard_concrete': 'Hard Concrete (DiffMask\'s)',
    'binary_concrete': 'Binary Concrete / Gumbel-sigmoid',
    'hard_kuma': 'HardKuma (Bastings et al.)',
    'straight_through': 'straight-through Bernoulli',
    'reinforce': 'Bernoulli + REINFORCE',
}

# DiffMaskConfig fields a comparison may set for one relaxation (its parameters
# and the probe's learning rates), e.g. to give one relaxation a fairer chance
OVERRIDABLE_FIELDS = ('binary_concrete_temperature', 'hard_kuma_b', 'hard_kuma_stretch',
                      'straight_through_temperature', 'reinforce_baseline_decay',
                      'temperature', 'stretch',
                      'probe_learning_rate', 'baseline_learning_rate')


@dataclasses.dataclass(frozen=True)
class RelaxationComparisonConfig:
  """What ``dmx compare relaxations`` runs.

  Attributes:
    toy: the toy experiment (data, classifier, DiffMask steps and batch size).
    names: the relaxations to compare, among :data:`dmx.relaxations.NAMES`.
    gate: ``'hidden'`` (the paper's Table 1 row) or ``'input'``.
    variance_draws: gate-noise draws for the gradient variance.
    overrides: ``((name, ((field, value), ...)), ...)``: DiffMaskConfig fields
      (among :data:`OVERRIDABLE_FIELDS`) set for relaxation ``name`` only.
  """
  toy: toy_pipeline.ToyExperimentConfig = toy_pipeline.ToyExperimentConfig()
  names: tuple[str, ...] = relaxations.NAMES
  gate: str = 'hidden'
  variance_draws: int = DEFAULT_VARIANCE_DRAWS
  overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()

  def __post_init__(self):
    if not self.names:
      raise ValueError('name at least one relaxation')
    unknown = sorted(set(self.names) - set(relaxations.NAMES))
    if unknown:
      raise ValueError(f'unknown relaxations {unknown}; choose among {relaxations.NAMES}')
    if len(set(self.names)) != len(self.names):
      raise ValueError(f'relaxations must be distinct, got {list(self.names)}')
    if self.gate not in probes.GATES:
      raise ValueError(f'gate must be one of {probes.GATES}, got {self.gate!r}')
    if self.variance_draws < _DRAWS_PER_CHUNK or self.variance_draws % _DRAWS_PER_CHUNK:
      raise ValueError(f'variance_draws must be a positive multiple of {_DRAWS_PER_CHUNK}, '
                       f'got {self.variance_draws}')
    for name, fields in self.overrides:
      if name not in self.names:
        raise ValueError(f'override for {name!r}, which is not compared')
      bad = sorted(field for field, _ in fields if field not in OVERRIDABLE_FIELDS)
      if bad:
        raise ValueError(f'cannot override {bad}; choose among {OVERRIDABLE_FIELDS}')
      self.diffmask_config(name)  # a bad value fails here, before any training

  def diffmask_config(self, name: str) -> train.DiffMaskConfig:
    """The toy task's DiffMask settings with relaxation ``name`` and its overrides."""
    base = toy_pipeline.toy_diffmask_config(self.gate, self.toy.sparsity)
    fields = dict(dict(self.overrides).get(name, ()))
    return dataclasses.replace(base, relaxation=name, **fields)


def make_gradient_variance_fn(model, frozen_params, probe, config: train.DiffMaskConfig,
                              batch: dict, draws: int, layer_index: int
                              ) -> Callable[[train.DiffMaskState, jax.Array], dict]:
  """Builds ``variance(state, key)``: the spread of the probe's one-sample gradient estimate.

  The gradient is :func:`dmx.train.make_gradient_fn`'s at depth
  ``layer_index`` on ``batch``, with every multiplier set to 1; ``draws``
  keys split from ``key`` give independent gate noise. (One compiled program
  serves every state of the same shapes.)

  ``variance(state, key)`` returns ``variance``, the sum over the vote
  parameters (baseline vectors left out) of each coordinate's variance across
  draws (unbiased, ``ddof=1``); ``mean_norm_sq``, the squared norm of the
  mean gradient, for scale; and ``quarter_range``, the smallest and largest
  ``variance`` of four disjoint quarters of the draws, to show how settled
  the estimate is (heavy tails make it move).
  """
  gradients = train.make_gradient_fn(model, probe, config)

  def vote_gradients(state, key):
    ones = jnp.ones_like(state.multipliers.fast)
    unit_state = state._replace(multipliers=optax.LookaheadParams(fast=ones, slow=ones))

    def one_draw(draw_key):
      _, _, probe_grads, _, _ = gradients(unit_state, frozen_params, batch, draw_key, None,
                                          layer_index)
      votes = {name: value for name, value in probe_grads['params'].items()
               if not name.startswith('baseline_')}
      return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree_util.tree_leaves(votes)])

    keys = jax.random.split(key, draws).reshape(-1, _DRAWS_PER_CHUNK)
    # chunks of draws one after another: all draws at once would hold every
    # draw's activations in memory
    return jax.lax.map(jax.vmap(one_draw), keys).reshape(draws, -1)

  if draws % _DRAWS_PER_CHUNK:
    raise ValueError(f'variance draws must be a multiple of {_DRAWS_PER_CHUNK}, got {draws}')
  compiled = jax.jit(vote_gradients)

  def variance(state: train.DiffMaskState, key: jax.Array) -> dict:
    samples = np.asarray(compiled(state, key), np.float64)
    quarters = [float(part.var(axis=0, ddof=1).sum()) for part in np.array_split(samples, 4)]
    return dict(variance=float(samples.var(axis=0, ddof=1).sum()),
                mean_norm_sq=float(np.sum(samples.mean(axis=0) ** 2)),
                quarter_range=(min(quarters), max(quarters)))

  return variance


def run_compare_relaxations(config: RelaxationComparisonConfig, out_dir: str | Path, *,
                            model_dir: str | Path | None = None, progress: bool = True,
                            log: Callable[[str], None] = print, command: str | None = None
                            ) -> dict:
  """Trains one probe per relaxation and writes the comparison under ``out_dir``.

  ``model_dir`` holds the toy classifier (read, or trained and written there
  if it does not match ``config.toy``); ``out_dir / 'toy_model'`` by default.
  Returns the report (see the module docstring).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  toy = config.toy
  data = generate_toy_data(toy.seed, toy.num_examples, toy.max_length)
  train_data, validation = split_toy_data(data, toy.validation_fraction)
  model_dir = out_dir / 'toy_model' if model_dir is None else Path(model_dir)
  model, frozen_params, reused = toy_pipeline.load_or_train_model(toy, train_data, model_dir,
                                                                  progress, log)
  val_accuracy = accuracy(model, frozen_params, validation)
  log(f'toy model validation accuracy: {val_accuracy:.4f}')
  reference = ground_truth_attribution(validation)
  val_batch = validation.as_batch()
  variance_batch = {name: value[:toy.diffmask_batch_size] for name, value in val_batch.items()}
  layer = toy_pipeline.FEEDFORWARD_STATE

  rows, details = {}, {}
  for name in config.names:
    dm_config = config.diffmask_config(name)
    # dmx toy's start for this gate: same batches, keys and initial probe
    probe, initial_state, batches, run_key = toy_pipeline.start_toy_probe(
        toy, model, frozen_params, train_data, dm_config)
    variance = make_gradient_variance_fn(model, frozen_params, probe, dm_config, variance_batch,
                                         config.variance_draws, layer)
    variance_key = jax.random.fold_in(run_key, 2**31 - 1)  # not a step key of the run
    at_init = variance(initial_state, variance_key)
    log(f'{name}: training {toy.diffmask_steps} steps')
    training_started = time.time()
    state, history = train.fit(model, frozen_params, probe, dm_config, initial_state, batches,
                               toy.diffmask_steps, run_key, progress=progress,
                               description=f'diffmask {config.gate} {name}')
    jax.block_until_ready(state.params)
    seconds = time.time() - training_started
    checkpoint.save(out_dir / f'probe_{name}', state.probe_params,
                    dict(gate=config.gate, form=toy.probe_form, relaxation=name,
                         state_dims=list(model.state_dims),
                         diffmask_config=_jsonable(dataclasses.asdict(dm_config))))

    attribution = attribute.attribute(model, frozen_params, probe, state.probe_params, dm_config,
                                      val_batch)
    scores = metrics.attribution_divergences(reference, np.asarray(attribution.keep_prob[layer]),
                                             validation.mask)
    masked = attribute.masked_agreement(model, frozen_params, probe, state.probe_params,
                                        dm_config, val_batch, layer)
    trained = variance(state, variance_key)
    rows[name] = dict(js=scores['js'], sparsity=float(masked['masked_fraction'].mean()),
                      agreement=float(masked['agreement'].mean()),
                      grad_variance=trained['variance'], seconds=seconds)
    details[name] = dict(
        description=DESCRIPTIONS[name], gradient=dm_config.gate_relaxation().gradient,
        kl=scores['kl'], num_examples=scores['num_examples'],
        keep_probability=float(np.sum(np.asarray(attribution.keep_prob[layer]) * validation.mask)
                               / np.sum(validation.mask)),
        multiplier=float(state.lagrange_multipliers[layer]),
        grad_mean_norm_sq=trained['mean_norm_sq'],
        grad_variance_quarter_range=trained['quarter_range'],
        grad_variance_at_init=at_init['variance'],
        grad_mean_norm_sq_at_init=at_init['mean_norm_sq'],
        diffmask_config=_jsonable(dataclasses.asdict(dm_config)),
        training=history[-1] if history else None)
    log(f"{name}: D_JS {rows[name]['js']:.4f}, masked {rows[name]['sparsity']:.3f}, "
        f"agreement {rows[name]['agreement']:.3f}, grad variance {trained['variance']:.3g}, "
        f'{seconds:.0f} s')

  report = {
      'relaxations': rows,
      'settings': dict(
          task='toy', gate=config.gate, layer=STATE_NAMES[layer], seed=toy.seed,
          steps=toy.diffmask_steps, batch_size=toy.diffmask_batch_size,
          variance_draws=config.variance_draws, variance_batch=len(variance_batch['mask']),
          variance_at='trained parameters of each relaxation, multiplier 1',
          command=command, toy=dataclasses.asdict(toy),
          model={'val_accuracy': val_accuracy, 'reused_checkpoint': reused,
                 'folder': str(model_dir)}),
      'checks': checks(rows),
      'details': details,
      'seconds': time.time() - started,
  }
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  (out_dir / 'report.md').write_text(format_markdown(report))
  if rows:
    viz.save_figure(comparison_figure(rows), out_dir / 'relaxations.png')
  log(format_markdown(report))
  return report


def _jsonable(values):
  return json.loads(json.dumps(values))


def checks(rows: dict) -> dict:
  """The issue's claims: agreement >= 0.95 for all; REINFORCE's variance above the others'."""
  result = {'agreement_at_least_0.95': {name: row['agreement'] >= AGREEMENT_BAR
                                        for name, row in rows.items()}}
  pathwise = [row['grad_variance'] for name, row in rows.items() if name != 'reinforce']
  if 'reinforce' in rows and pathwise:
    result['score_function_variance_highest'] = rows['reinforce']['grad_variance'] > max(pathwise)
  return result


def format_markdown(report: dict) -> str:
  """The comparison as a markdown table, with the settings under it."""
  settings = report['settings']
  lines = ['| relaxation | gradient | D_JS | masked (sparsity) | agreement | grad variance '
           '| seconds |', '| --- | --- | --- | --- | --- | --- | --- |']
  for name, row in report['relaxations'].items():
    gradient = report['details'][name]['gradient'].replace('_', ' ')
    lines.append(f"| {name} | {gradient} | {row['js']:.4f} | {row['sparsity']:.3f} | "
                 f"{row['agreement']:.3f} | {row['grad_variance']:.3g} | {row['seconds']:.0f} |")
  lines += ['', f"Toy task, {settings['gate']} gates, scored at `{settings['layer']}` on the "
            f"validation set; seed {settings['seed']}, {settings['steps']} steps of batch "
            f"{settings['batch_size']}. Gradient variance: {settings['variance_draws']} gate-noise "
            f"draws on {settings['variance_batch']} validation examples, "
            f"{settings['variance_at']}."]
  if settings.get('command'):
    lines += ['', f"Command: `{settings['command']}`"]
  return '\n'.join(lines) + '\n'


def comparison_figure(rows: dict):
  """Three bar charts: D_JS and gradient variance (log scales) and agreement."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(rows)
  colours = ['tab:red' if name == 'reinforce' else 'tab:blue' for name in names]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  panels = [('js', 'D_JS to the ground truth (log)', True),
            ('grad_variance', 'gradient variance (log)', True),
            ('agreement', 'masked-pass agreement', False)]
  for ax, (field, title, log_scale) in zip(axes, panels):
    values = [max(rows[name][field], 1e-12) if log_scale else rows[name][field] for name in names]
    bars = ax.bar(range(len(names)), values, color=colours)
    ax.bar_label(bars, labels=[f'{rows[name][field]:.2g}' if log_scale else
                               f'{rows[name][field]:.3f}' for name in names], fontsize=7)
    ax.set_xticks(range(len(names)), [name.replace('_', '\n') for name in names], fontsize=8)
    ax.set_title(title, fontsize=10)
    if log_scale:
      ax.set_yscale('log')
    else:
      ax.axhline(AGREEMENT_BAR, color='grey', linestyle='--', linewidth=1)
      ax.set_ylim(min(0.9, min(values) - 0.02), 1.0)
  fig.suptitle('Gate relaxations on the toy task (hidden gates at the feed-forward state)',
               fontsize=11)
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx compare relaxations``."""
  defaults = toy_pipeline.ToyExperimentConfig()
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--model', default=None,
                      help='a trained toy classifier (the toy_model folder of a dmx toy run); '
                      'its data and settings are reused. Default: train one (or reuse '
                      'OUT/toy_model)')
  parser.add_argument('--seed', type=int, default=None,
                      help=f'data and model seed (default {defaults.seed}; with --model: the '
                      'model\'s own)')
  parser.add_argument('--steps', type=int, default=None,
                      help=f'DiffMask steps per relaxation (default {defaults.diffmask_steps}, '
                      'the toy pipeline\'s; --tiny: 40)')
  parser.add_argument('--tiny', action='store_true',
                      help='a seconds-long run on a tiny model and data set (for tests)')
  parser.add_argument('--relaxations', nargs='+', default=list(relaxations.NAMES),
                      metavar='NAME', help=f'among {", ".join(relaxations.NAMES)} (default: all)')
  parser.add_argument('--gate', default='hidden', help='hidden (default) or input')
  parser.add_argument('--variance-draws', type=int, default=DEFAULT_VARIANCE_DRAWS,
                      help=f'gate-noise draws for the gradient variance (a multiple of '
                      f'{_DRAWS_PER_CHUNK})')
  parser.add_argument('--set', action='append', default=[], metavar='NAME.FIELD=VALUE',
                      dest='overrides', help='a DiffMask setting for one relaxation, e.g. '
                      'binary_concrete.binary_concrete_temperature=0.3 or '
                      'reinforce.probe_learning_rate=3e-3 (repeatable)')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def parse_overrides(values: Sequence[str]) -> tuple:
  """``['name.field=value', ...]`` as :attr:`RelaxationComparisonConfig.overrides`."""
  grouped: dict[str, dict] = {}
  for text in values:
    target, separator, raw = text.partition('=')
    name, dot, field = target.partition('.')
    if not (separator and dot and name and field and raw):
      raise ValueError(f'--set {text}: expected NAME.FIELD=VALUE')
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      raise ValueError(f'--set {text}: {raw!r} is not a number or JSON list') from None
    grouped.setdefault(name, {})[field] = tuple(value) if isinstance(value, list) else value
  return tuple((name, tuple(sorted(fields.items()))) for name, fields in grouped.items())


def command_line(args: argparse.Namespace) -> str:
  """The ``dmx compare relaxations`` command ``args`` stand for."""
  parts = ['dmx compare relaxations', f'--out {args.out}']
  for flag, value in (('--model', args.model), ('--seed', args.seed), ('--steps', args.steps)):
    if value is not None:
      parts.append(f'{flag} {value}')
  if args.tiny:
    parts.append('--tiny')
  if list(args.relaxations) != list(relaxations.NAMES):
    parts.append('--relaxations ' + ' '.join(args.relaxations))
  if args.gate != 'hidden':
    parts.append(f'--gate {args.gate}')
  if args.variance_draws != DEFAULT_VARIANCE_DRAWS:
    parts.append(f'--variance-draws {args.variance_draws}')
  parts += [f'--set {text}' for text in args.overrides]
  return ' '.join(parts)


def config_from_args(args: argparse.Namespace) -> RelaxationComparisonConfig:
  """The comparison ``args`` describe; one-line ``ValueError`` for nonsense."""
  if args.tiny and args.model is not None:
    raise ValueError('--tiny trains its own tiny model; it cannot be combined with --model')
  if args.steps is not None and args.steps < 1:
    raise ValueError(f'--steps must be >= 1, got {args.steps}')
  options = {} if args.steps is None else dict(diffmask_steps=args.steps)
  if args.model is not None:
    if args.seed is not None:
      raise ValueError('--seed cannot be combined with --model (the model fixes the data seed)')
    from dmx.pipelines.compare_methods import config_from_model  # pylint: disable=import-outside-toplevel
    toy = config_from_model(args.model, **options)
  else:
    seed = {} if args.seed is None else dict(seed=args.seed)
    make = toy_pipeline.ToyExperimentConfig.tiny if args.tiny else toy_pipeline.ToyExperimentConfig
    toy = make(**seed, **options)
  return RelaxationComparisonConfig(toy=toy, names=tuple(args.relaxations), gate=args.gate,
                                    variance_draws=args.variance_draws,
                                    overrides=parse_overrides(args.overrides))


def run_from_args(args: argparse.Namespace) -> dict:
  """Builds the config from ``args`` and runs :func:`run_compare_relaxations`."""
  config = config_from_args(args)
  return run_compare_relaxations(config, args.out, model_dir=args.model,
                                 progress=not args.no_progress, command=command_line(args))
