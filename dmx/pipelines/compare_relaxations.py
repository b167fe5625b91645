"""``dmx compare relaxations``: the gate relaxations side by side, on the toy task or SST.

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

With ``--task sst --model DIR`` the same comparison runs on a fine-tuned
SST-5 classifier (the small BERT: MiniLM here): each relaxation trains the
probe of ``dmx diffmask sst`` (same data, batches, probe initialisation and
seed; only the relaxation differs) and is scored on the evaluation split as
``dmx diffmask sst`` scores it (``sparsity`` and ``agreement`` at its summary
depth: the deepest for input gates, the mean over depths for hidden gates).
SST has no ground-truth attribution, so ``js`` is ``null``; the gradient
variance is taken at ``variance_layer`` on the first ``batch_size``
evaluation sentences.

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
from dmx.pipelines import diffmask_text, jsonable
from dmx.pipelines import toy as toy_pipeline

TASKS = ('toy', 'sst')

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
    sst: for ``task='sst'``: the ``dmx diffmask sst`` run each relaxation repeats
      (its ``relaxation`` is replaced by each compared one); ``None`` for the toy.
    variance_layer: SST only: the depth whose gradient variance is measured
      (``None``: the middle state, or ``train_layer``); the toy uses its
      feed-forward state.
    train_layer: SST hidden gates only: train the gates of this one depth
      (:attr:`dmx.train.DiffMaskConfig.layers`) and score the masked fraction
      and agreement there, not averaged over every depth: every training step
      then goes to the compared depth, so a comparison takes minutes per
      relaxation instead of an hour. ``None`` trains every depth.
    names: the relaxations to compare, among :data:`dmx.relaxations.NAMES`.
    gate: ``'hidden'`` (the paper's Table 1 row) or ``'input'``.
    variance_draws: gate-noise draws for the gradient variance.
    overrides: ``((name, ((field, value), ...)), ...)``: DiffMaskConfig fields
      (among :data:`OVERRIDABLE_FIELDS`) set for relaxation ``name`` only.
  """
  toy: toy_pipeline.ToyExperimentConfig = toy_pipeline.ToyExperimentConfig()
  sst: diffmask_text.TextDiffMaskConfig | None = None
  variance_layer: int | None = None
  train_layer: int | None = None
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
    if self.sst is not None and (self.sst.task != 'sst' or self.sst.gate != self.gate):
      raise ValueError('the SST run must be a dmx diffmask sst run with the compared gate')
    if self.variance_layer is not None and self.sst is None:
      raise ValueError('variance_layer is for SST; the toy uses its feed-forward state')
    if self.train_layer is not None:
      if self.sst is None or self.gate != 'hidden':
        raise ValueError('--layer is for SST hidden gates (input gates train every depth at once)')
      if self.variance_layer not in (None, self.train_layer):
        raise ValueError(f'--variance-layer {self.variance_layer} differs from --layer '
                         f'{self.train_layer}: the variance is measured at the trained depth')
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

  @property
  def task(self) -> str:
    return 'toy' if self.sst is None else 'sst'

  def diffmask_config(self, name: str) -> train.DiffMaskConfig:
    """The task's DiffMask settings with relaxation ``name`` and its overrides."""
    base = (toy_pipeline.toy_diffmask_config(self.gate, self.toy.sparsity) if self.sst is None
            else self.sst.diffmask_config())
    fields = dict(dict(self.overrides).get(name, ()))
    if self.train_layer is not None:
      fields['layers'] = (self.train_layer,)
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

  Toy task: ``model_dir`` holds the toy classifier (read, or trained and
  written there if it does not match ``config.toy``); ``out_dir / 'toy_model'``
  by default. SST: the model is ``config.sst.model`` and ``model_dir`` must be
  ``None``. Returns the report (see the module docstring).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  if config.sst is None:
    rows, details, settings = _compare_on_toy(config, out_dir, model_dir, progress, log)
  else:
    if model_dir is not None:
      raise ValueError('the SST comparison reads its model from the SST run config')
    rows, details, settings = _compare_on_sst(config, out_dir, progress, log)
  report = {
      'relaxations': rows,
      'settings': {**settings, 'command': command},
      'checks': checks(rows),
      'details': details,
      'seconds': time.time() - started,
  }
  (out_dir / 'report.json').write_text(json.dumps(jsonable(report), indent=2))
  (out_dir / 'report.md').write_text(format_markdown(report))
  if rows:
    viz.save_figure(comparison_figure(rows, settings['task']), out_dir / 'relaxations.png')
  log(format_markdown(report))
  return report


def _row_and_details(name: str, dm_config: train.DiffMaskConfig, state, trained_variance: dict,
                     at_init: dict, layer: int, seconds: float, scores: dict, history) -> tuple:
  """One relaxation's row of the table and its details, from what either task measured."""
  row = dict(js=scores.get('js'), sparsity=scores['sparsity'], agreement=scores['agreement'],
             grad_variance=trained_variance['variance'], seconds=seconds)
  details = dict(
      description=DESCRIPTIONS[name], gradient=dm_config.gate_relaxation().gradient,
      kl=scores.get('kl'), num_examples=scores['num_examples'],
      keep_probability=scores['keep_probability'],
      multiplier=float(state.lagrange_multipliers[layer]),
      grad_mean_norm_sq=trained_variance['mean_norm_sq'],
      grad_variance_quarter_range=trained_variance['quarter_range'],
      grad_variance_at_init=at_init['variance'],
      grad_mean_norm_sq_at_init=at_init['mean_norm_sq'],
      diffmask_config=jsonable(dataclasses.asdict(dm_config)),
      training=history[-1] if history else None)
  js = '' if row['js'] is None else f"D_JS {row['js']:.4f}, "
  log_line = (f"{name}: {js}masked {row['sparsity']:.3f}, agreement {row['agreement']:.3f}, "
              f"grad variance {row['grad_variance']:.3g}, {seconds:.0f} s")
  return row, details, log_line


def _compare_on_toy(config: RelaxationComparisonConfig, out_dir: Path, model_dir, progress: bool,
                    log: Callable[[str], None]) -> tuple[dict, dict, dict]:
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
                         diffmask_config=jsonable(dataclasses.asdict(dm_config))))

    attribution = attribute.attribute(model, frozen_params, probe, state.probe_params, dm_config,
                                      val_batch)
    keep_prob = np.asarray(attribution.keep_prob[layer])
    scores = metrics.attribution_divergences(reference, keep_prob, validation.mask)
    masked = attribute.masked_agreement(model, frozen_params, probe, state.probe_params,
                                        dm_config, val_batch, layer)
    scores.update(sparsity=float(masked['masked_fraction'].mean()),
                  agreement=float(masked['agreement'].mean()),
                  keep_probability=float(np.sum(keep_prob * validation.mask)
                                         / np.sum(validation.mask)))
    rows[name], details[name], line = _row_and_details(
        name, dm_config, state, variance(state, variance_key), at_init, layer, seconds, scores,
        history)
    log(line)

  settings = dict(
      task='toy', gate=config.gate, layer=STATE_NAMES[layer], seed=toy.seed,
      steps=toy.diffmask_steps, batch_size=toy.diffmask_batch_size,
      variance_draws=config.variance_draws, variance_batch=len(variance_batch['mask']),
      variance_at='trained parameters of each relaxation, multiplier 1',
      toy=dataclasses.asdict(toy),
      model={'val_accuracy': val_accuracy, 'reused_checkpoint': reused, 'folder': str(model_dir)})
  return rows, details, settings


def _compare_on_sst(config: RelaxationComparisonConfig, out_dir: Path, progress: bool,
                    log: Callable[[str], None]) -> tuple[dict, dict, dict]:
  sst = config.sst
  model, frozen_params, tokenizer = diffmask_text.load_frozen_model(sst, log)
  train_features, _, eval_features = diffmask_text.load_task_data(sst, tokenizer)
  batch_size = min(sst.batch_size, len(train_features))
  num_states = len(model.state_dims)
  layer = next((value for value in (config.train_layer, config.variance_layer)
                if value is not None), num_states // 2)
  if not 0 <= layer < num_states:
    what = 'variance layer' if config.train_layer is None else '--layer'
    raise ValueError(f'{what} must be in [0, {num_states}), got {layer}')
  variance_rows = np.arange(min(batch_size, len(eval_features)))
  variance_batch = eval_features.take(variance_rows).as_batch()
  length = int(variance_batch['mask'].sum(axis=1).max())  # cut the padding off: same gradients
  variance_batch = {name: value[:, :length] for name, value in variance_batch.items()}
  log(f'sst: {len(train_features)} training and {len(eval_features)} evaluation sentences; '
      f'gradient variance at depth {layer} on {len(variance_rows)} sentences')

  # the training set's buckets and cached clean pass serve every relaxation
  buckets = diffmask_text.training_buckets(sst, model, frozen_params, train_features, batch_size,
                                           log, progress)
  variance_key = jax.random.fold_in(jax.random.key(sst.seed), 2**31 - 1)  # one for all
  rows, details = {}, {}
  for name in config.names:
    run = dataclasses.replace(sst, relaxation=name)
    dm_config = config.diffmask_config(name)
    log(f'{name}: training {run.steps} steps')
    trained = diffmask_text.train_probe(run, model, frozen_params, tokenizer, train_features,
                                        batch_size, out_dir / f'sst_{name}', progress, log,
                                        dm_config=dm_config, buckets=buckets)
    variance = make_gradient_variance_fn(model, frozen_params, trained.probe, dm_config,
                                         variance_batch, config.variance_draws, layer)
    initial_state = train.init_state(dm_config, trained.initial_probe_params, num_states)
    at_init = variance(initial_state, variance_key)
    evaluator = diffmask_text.make_evaluator(model, frozen_params, trained.probe, dm_config)
    result = diffmask_text.run_evaluation(evaluator, trained.state.probe_params, eval_features,
                                          sst.eval_batch_size)
    scores = diffmask_text.sst_scores(result, eval_features, sst.gate, dm_config.layers)
    scores = dict(sparsity=scores['masked_fraction'], agreement=scores['agreement'],
                  num_examples=len(eval_features), keep_probability=scores['mean_keep_prob'],
                  per_layer=scores['per_layer'])
    rows[name], details[name], line = _row_and_details(
        name, dm_config, trained.state, variance(trained.state, variance_key), at_init, layer,
        trained.seconds, scores, trained.history)
    details[name]['per_layer'] = scores['per_layer']
    log(line)

  settings = dict(
      task='sst', gate=config.gate, layer=diffmask_text.state_names(num_states)[layer],
      trained_layers=('all' if config.train_layer is None
                      else diffmask_text.state_names(num_states)[layer]),
      seed=sst.seed, steps=sst.steps, batch_size=batch_size,
      variance_draws=config.variance_draws, variance_batch=len(variance_rows),
      variance_at='trained parameters of each relaxation, multiplier 1',
      sst=dataclasses.asdict(sst),
      model={'folder': sst.model, 'eval_split': sst.eval_split,
             'num_eval_sentences': len(eval_features)})
  return rows, details, settings


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
    js = 'n/a' if row['js'] is None else f"{row['js']:.4f}"
    lines.append(f"| {name} | {gradient} | {js} | {row['sparsity']:.3f} | "
                 f"{row['agreement']:.3f} | {row['grad_variance']:.3g} | {row['seconds']:.0f} |")
  if settings['task'] == 'toy':
    scored = (f"Toy task, {settings['gate']} gates, scored at `{settings['layer']}` on the "
              'validation set')
  else:
    scored = (f"SST ({settings['model']['folder']}), {settings['gate']} gates, scored on "
              f"{settings['model']['num_eval_sentences']} {settings['model']['eval_split']} "
              + ('sentences at dmx diffmask sst\'s summary depth'
                 if settings.get('trained_layers', 'all') == 'all' else
                 f"sentences at `{settings['trained_layers']}`, the only depth trained")
              + ' (no ground truth: D_JS n/a)')
  lines += ['', f"{scored}; seed {settings['seed']}, {settings['steps']} steps of batch "
            f"{settings['batch_size']}. Gradient variance at `{settings['layer']}`: "
            f"{settings['variance_draws']} gate-noise draws on {settings['variance_batch']} "
            f"held-out examples, {settings['variance_at']}."]
  if settings.get('command'):
    lines += ['', f"Command: `{settings['command']}`"]
  return '\n'.join(lines) + '\n'


def comparison_figure(rows: dict, task: str = 'toy'):
  """Bar charts: D_JS (toy) or states masked (SST), gradient variance (log scale), agreement.

  The toy's agreement panel marks the issue's bar (0.95); SST has no such bar.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(rows)
  colours = ['tab:red' if name == 'reinforce' else 'tab:blue' for name in names]
  first = (('js', 'D_JS to the ground truth (log)', True) if task == 'toy'
           else ('sparsity', 'states masked', False))
  panels = [first, ('grad_variance', 'gradient variance (log)', True),
            ('agreement', 'masked-pass agreement', False)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
  for ax, (field, title, log_scale) in zip(axes, panels):
    values = [max(rows[name][field], 1e-12) if log_scale else rows[name][field] for name in names]
    bars = ax.bar(range(len(names)), values, color=colours)
    ax.bar_label(bars, labels=[f'{rows[name][field]:.2g}' if log_scale else
                               f'{rows[name][field]:.3f}' for name in names], fontsize=7)
    ax.set_xticks(range(len(names)), [name.replace('_', '\n') for name in names], fontsize=8)
    ax.set_title(title, fontsize=10)
    if log_scale:
      ax.set_yscale('log')
    elif field == 'agreement':
      if task == 'toy':
        ax.axhline(AGREEMENT_BAR, color='grey', linestyle='--', linewidth=1)
      ax.set_ylim(min(0.9, min(values) - 0.02), 1.0)
    else:
      ax.set_ylim(0.0, 1.0)
  fig.suptitle('Gate relaxations on the toy task (hidden gates at the feed-forward state)'
               if task == 'toy' else 'Gate relaxations on SST (fine-tuned classifier)',
               fontsize=11)
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx compare relaxations``."""
  defaults = toy_pipeline.ToyExperimentConfig()
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  # dest: 'task' is the compare subcommand's own name
  parser.add_argument('--task', choices=TASKS, default='toy', dest='comparison_task',
                      help='toy (default) or sst (needs --model, a fine-tuned SST-5 classifier)')
  parser.add_argument('--model', default=None,
                      help='toy: a trained toy classifier (the toy_model folder of a dmx toy '
                      'run), its data and settings reused; default: train one (or reuse '
                      'OUT/toy_model). sst: the fine-tuned classifier\'s folder (required)')
  parser.add_argument('--seed', type=int, default=None,
                      help=f'data and model seed (default {defaults.seed}; with --model: the '
                      'model\'s own)')
  parser.add_argument('--steps', type=int, default=None,
                      help=f'DiffMask steps per relaxation (toy default {defaults.diffmask_steps}, '
                      'the toy pipeline\'s; --tiny: 40)')
  parser.add_argument('--tiny', action='store_true',
                      help='a seconds-long run on a tiny model and data set (for tests)')
  parser.add_argument('--relaxations', nargs='+', default=list(relaxations.NAMES),
                      metavar='NAME', help=f'among {", ".join(relaxations.NAMES)} (default: all)')
  parser.add_argument('--gate', default='hidden', help='hidden (default) or input')
  parser.add_argument('--variance-draws', type=int, default=DEFAULT_VARIANCE_DRAWS,
                      help=f'gate-noise draws for the gradient variance (a multiple of '
                      f'{_DRAWS_PER_CHUNK})')
  sst = parser.add_argument_group('SST (--task sst); other settings are dmx diffmask sst\'s')
  sst.add_argument('--data', default=None, help='data folder holding sst/ (default ../shared/data)')
  sst.add_argument('--margin', type=float, default=None, help='tolerated KL (default 0.1)')
  sst.add_argument('--batch-size', type=int, default=None, help='training batch (default 64)')
  sst.add_argument('--max-length', type=int, default=None, help='tokens per sentence (default 84)')
  sst.add_argument('--warmup-steps', type=int, default=None, help='default 1200')
  sst.add_argument('--max-train-examples', type=int, default=None,
                   help='train on the first N sentences')
  sst.add_argument('--max-eval-examples', type=int, default=None,
                   help='score on the first N dev sentences')
  sst.add_argument('--variance-layer', type=int, default=None,
                   help='depth whose gradient variance is measured (default: the middle one)')
  sst.add_argument('--layer', type=int, default=None,
                   help='hidden gates: train and score only this depth (minutes per '
                   'relaxation instead of an hour); default: every depth')
  parser.add_argument('--set', action='append', default=[], metavar='NAME.FIELD=VALUE',
                      dest='overrides', help='a DiffMask setting for one relaxation, e.g. '
                      'binary_concrete.binary_concrete_temperature=0.3 or '
                      'reinforce.probe_learning_rate=3e-3 (repeatable)')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


SST_FLAGS = ('--data', '--margin', '--batch-size', '--max-length', '--warmup-steps',
             '--max-train-examples', '--max-eval-examples', '--variance-layer', '--layer')


def _attribute(flag: str) -> str:
  """The argparse attribute of an option: ``--max-length`` -> ``max_length``."""
  return flag[2:].replace('-', '_')


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
  if args.comparison_task != 'toy':
    parts.append(f'--task {args.comparison_task}')
  for flag, value in (('--model', args.model), ('--seed', args.seed), ('--steps', args.steps)):
    if value is not None:
      parts.append(f'{flag} {value}')
  for flag in SST_FLAGS:
    value = getattr(args, _attribute(flag))
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
  sst_options = {flag: getattr(args, _attribute(flag)) for flag in SST_FLAGS}
  if args.comparison_task == 'sst':
    if args.model is None:
      raise ValueError('--task sst needs --model, the folder of a fine-tuned SST-5 classifier')
    if args.tiny:
      raise ValueError('--tiny is for the toy task')
    fields = {_attribute(flag): value for flag, value in sst_options.items()
              if value is not None and flag not in ('--data', '--variance-layer', '--layer')}
    sst = diffmask_text.TextDiffMaskConfig(
        task='sst', model=args.model, gate=args.gate, data_dir=args.data,
        steps=args.steps, num_heatmap_examples=0,
        **({} if args.seed is None else dict(seed=args.seed)), **fields)
    return RelaxationComparisonConfig(sst=sst, variance_layer=args.variance_layer,
                                      train_layer=args.layer,
                                      names=tuple(args.relaxations), gate=args.gate,
                                      variance_draws=args.variance_draws,
                                      overrides=parse_overrides(args.overrides))
  given = [flag for flag, value in sst_options.items() if value is not None]
  if given:
    raise ValueError(f'{", ".join(given)}: only for --task sst')
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
  return run_compare_relaxations(config, args.out,
                                 model_dir=args.model if config.sst is None else None,
                                 progress=not args.no_progress, command=command_line(args))
