"""The toy experiment end to end (paper sec. 4.1, Table 1): ``dmx toy``.

1. generate the data (seeded), 2. train the toy classifier or reuse its
checkpoint, 3. train DiffMask probes with input gates and with hidden gates,
4. score their attributions to the feed-forward states against the ground
truth (``D_KL``, ``D_JS``), 5. score the paper's baselines the same way
(integrated gradients, Schulz et al., Guan et al., exact erasure; Table 1),
6. write ``report.json``, heatmaps, checkpoints.

How Table 1 compares attributions (as the original code's toy notebook did):
every method's per-token scores at the feed-forward state ``h1`` are made
non-negative (signed ones, e.g. integrated gradients summed over the state's
features, by their magnitude), normalised per example to a distribution over
the real positions (:func:`dmx.metrics.normalize_attribution`), and compared
with the ground truth (uniform over the positions holding n or m) by
``D_KL(ground truth || method)`` and ``D_JS`` in nats, averaged over the
examples that hold an n or an m. DiffMask's scores are its keep
probabilities. ``D_KL`` is infinite (reported as ``null``, with the number of
such examples) when a method puts zero mass on a position holding n or m:
erasure, whose answer is a delta on one digit, always does. Erasure (and
occlusion, LIME) erase an h1 state to DiffMask's learned hidden-gate
baseline by default (``erased_state``), so erasure and DiffMask remove
information the same way. The toy model has no attention, so there is no
``attention`` entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from dmx import attribute, baselines, checkpoint, metrics, objective, probes, train, viz
from dmx.data.common import endless_batches
from dmx.data.toy import (ToyData, generate_toy_data, ground_truth_attribution, iterate_batches,
                          split_toy_data)
from dmx.models.toy import STATE_NAMES, ToyModel, ToyModelConfig, accuracy, train_toy_model

# the state whose attribution the paper scores against the ground truth (Table 1)
FEEDFORWARD_STATE = 1
# the baselines of the paper's Table 1, scored by every ``dmx toy`` run
TABLE1_BASELINES = ('integrated_gradients', 'schulz', 'guan', 'erasure')
# more methods ``dmx compare toy`` scores the same way
EXTRA_BASELINES = ('gradient', 'gradient_times_input', 'occlusion', 'lime', 'schulz_gate')
BASELINES = TABLE1_BASELINES + EXTRA_BASELINES
ERASED_STATES = ('diffmask_baseline', 'zeros')


def toy_diffmask_config(gate: str, sparsity: str = 'log_l0') -> train.DiffMaskConfig:
  """DiffMask settings for the toy task: margin 0.05, faster rates than BERT's."""
  return train.DiffMaskConfig(gate=gate, margin=0.05, sparsity=sparsity, probe_learning_rate=1e-3,
                              baseline_learning_rate=3e-3, warmup_steps=500)


@dataclasses.dataclass(frozen=True)
class ToyExperimentConfig:
  """Everything ``dmx toy`` runs; ``tiny()`` is a seconds-long version for tests."""
  seed: int = 0
  num_examples: int = 10_000
  max_length: int = 10
  validation_fraction: float = 0.1
  model: ToyModelConfig = ToyModelConfig(feedforward_dim=2)
  epochs: int = 50
  batch_size: int = 128
  learning_rate: float = 3e-3
  confidence_penalty: float = 0.1
  diffmask_steps: int = 20_000
  diffmask_batch_size: int = 64
  probe_form: str = 'mlp'
  sparsity: str = 'log_l0'
  probe_hidden_size: int = 64
  num_heatmap_examples: int = 4
  # baselines (Table 1): scored on the first baseline_examples validation examples (0: none);
  # Schulz et al. and Guan et al. optimise every example for baseline_steps steps, so their
  # cost grows with both; integrated gradients use ig_steps points on the path
  baseline_examples: int = 500
  baseline_steps: int = 500
  ig_steps: int = 100
  # 'paper': the path point's gradient; 'original': the released code's (see baselines.IG_VARIANTS)
  ig_variant: str = 'paper'
  # what erasure, occlusion and LIME put in place of an erased h1 state: DiffMask's learned
  # hidden-gate baseline ('diffmask_baseline') or the zero vector ('zeros')
  erased_state: str = 'diffmask_baseline'

  def __post_init__(self):
    positive = ('num_examples', 'max_length', 'epochs', 'batch_size', 'diffmask_batch_size',
                'probe_hidden_size')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.diffmask_steps < 0 or self.num_heatmap_examples < 0:
      raise ValueError('diffmask_steps and num_heatmap_examples must be >= 0')
    if self.baseline_examples < 0:
      raise ValueError(f'baseline_examples must be >= 0, got {self.baseline_examples}')
    if self.baseline_steps < 1 or self.ig_steps < 1:
      raise ValueError(f'baseline_steps and ig_steps must be >= 1, got {self.baseline_steps}, '
                       f'{self.ig_steps}')
    if self.ig_variant not in baselines.IG_VARIANTS:
      raise ValueError(f'ig_variant must be one of {baselines.IG_VARIANTS}, '
                       f'got {self.ig_variant!r}')
    if self.erased_state not in ERASED_STATES:
      raise ValueError(f'erased_state must be one of {ERASED_STATES}, got {self.erased_state!r}')
    if self.confidence_penalty < 0:
      raise ValueError(f'confidence_penalty must be >= 0, got {self.confidence_penalty}')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')
    if self.probe_form not in probes.VOTE_FORMS:
      raise ValueError(f'probe_form must be one of {probes.VOTE_FORMS}, got {self.probe_form!r}')
    if self.sparsity not in objective.SPARSITY_LOSSES:
      raise ValueError(f'sparsity must be one of {objective.SPARSITY_LOSSES}, got {self.sparsity!r}')
    num_validation = int(round(self.num_examples * self.validation_fraction))
    if not 0 < num_validation < self.num_examples:
      raise ValueError('num_examples and validation_fraction leave an empty split')

  @classmethod
  def tiny(cls, **overrides) -> 'ToyExperimentConfig':
    values = dict(num_examples=400, epochs=2, batch_size=32, diffmask_steps=40,
                  diffmask_batch_size=16, model=ToyModelConfig.tiny(), probe_hidden_size=8,
                  num_heatmap_examples=2, baseline_examples=16, baseline_steps=5, ig_steps=5)
    values.update(overrides)
    return cls(**values)

  def model_fingerprint(self) -> dict:
    """What determines the trained toy classifier; a checkpoint is reused only if it matches."""
    return dict(seed=self.seed, num_examples=self.num_examples, max_length=self.max_length,
                validation_fraction=self.validation_fraction, model=dataclasses.asdict(self.model),
                epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                confidence_penalty=self.confidence_penalty)


def load_or_train_model(config: ToyExperimentConfig, train_data: ToyData, checkpoint_dir: Path,
                        progress: bool, log: Callable[[str], None]):
  """Restores the toy classifier from ``checkpoint_dir`` if it was trained the same way."""
  model = ToyModel(config.model)
  fingerprint = config.model_fingerprint()
  if (checkpoint_dir / 'metadata.json').exists():
    saved = checkpoint.read_metadata(checkpoint_dir)
    if saved == fingerprint:
      log(f'reusing the toy model checkpoint in {checkpoint_dir}')
      return model, checkpoint.restore(checkpoint_dir, model.init(jax.random.key(0),
                                                                  config.max_length)), True
    log(f'the checkpoint in {checkpoint_dir} was trained with other settings; retraining')
  params = train_toy_model(model, train_data, seed=config.seed, epochs=config.epochs,
                           batch_size=config.batch_size, learning_rate=config.learning_rate,
                           confidence_penalty=config.confidence_penalty, progress=progress)
  checkpoint.save(checkpoint_dir, params, fingerprint)
  return model, params, False


def start_toy_probe(config: ToyExperimentConfig, model: ToyModel, frozen_params,
                    train_data: ToyData, dm_config: train.DiffMaskConfig):
  """A DiffMask probe for ``dm_config.gate`` as ``dmx toy`` starts it, ready for :func:`train.fit`.

  The batch order and keys depend only on ``config.seed`` and the gate, so
  every run that starts its probe here (``dmx toy``, ``dmx compare
  relaxations``) trains on the same batches from the same initial probe.

  Returns:
    ``(probe, state, batches, run_key)``: the probe module, its initial
    :class:`train.DiffMaskState`, the endless training batches (one already
    drawn to initialise the probe) and the key to pass to :func:`train.fit`.
  """
  gate_index = probes.GATES.index(dm_config.gate)
  probe = probes.DiffMaskProbe(gate=dm_config.gate, state_dims=model.state_dims,
                               form=config.probe_form, hidden_size=config.probe_hidden_size)
  batches = endless_batches(train_data, config.diffmask_batch_size, config.seed + 1 + gate_index)
  probe_key, run_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), gate_index))
  probe_params = train.init_probe_params(probe_key, model, probe, frozen_params, next(batches))
  state = train.init_state(dm_config, probe_params, len(model.state_dims))
  return probe, state, batches, run_key


def run_toy(config: ToyExperimentConfig, out_dir: str | Path, *, progress: bool = True,
            log: Callable[[str], None] = print, baseline_names: Sequence[str] = TABLE1_BASELINES,
            model_dir: str | Path | None = None) -> dict:
  """Runs the whole toy experiment and writes its outputs under ``out_dir``.

  Writes ``report.json``, ``heatmap_input.png``, ``heatmap_hidden.png``, the
  model checkpoint ``toy_model/`` and the probes ``probe_input/``,
  ``probe_hidden/``. ``report['methods']`` holds DiffMask's and the
  baselines' (``baseline_names``, among :data:`BASELINES`) divergences from
  the ground truth at the feed-forward state. ``model_dir`` is where the toy
  classifier's checkpoint is read (or written, if it does not match
  ``config``); ``out_dir / 'toy_model'`` by default. Returns the report.
  """
  unknown = sorted(set(baseline_names) - set(BASELINES))
  if unknown:
    raise ValueError(f'unknown baselines {unknown}; choose among {BASELINES}')
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  data = generate_toy_data(config.seed, config.num_examples, config.max_length)
  train_data, validation = split_toy_data(data, config.validation_fraction)
  model_dir = out_dir / 'toy_model' if model_dir is None else Path(model_dir)
  model, frozen_params, reused = load_or_train_model(config, train_data, model_dir, progress, log)
  val_accuracy = accuracy(model, frozen_params, validation)
  log(f'toy model validation accuracy: {val_accuracy:.4f}')

  reference = ground_truth_attribution(validation)
  val_batch = validation.as_batch()
  methods, per_layer, histories, keep_probs = {}, {}, {}, {}
  erased_vector = None  # what DiffMask's hidden gates put in place of a masked h1
  for gate in ('input', 'hidden'):
    dm_config = toy_diffmask_config(gate, config.sparsity)
    probe, state, batches, run_key = start_toy_probe(config, model, frozen_params, train_data,
                                                     dm_config)
    state, history = train.fit(model, frozen_params, probe, dm_config, state, batches,
                               config.diffmask_steps, run_key, progress=progress,
                               description=f'diffmask {gate}')
    checkpoint.save(out_dir / f'probe_{gate}', state.probe_params,
                    dict(gate=gate, form=config.probe_form, state_dims=list(model.state_dims)))
    attribution = attribute.attribute(model, frozen_params, probe, state.probe_params, dm_config,
                                      val_batch)
    keep_prob = np.asarray(attribution.keep_prob)
    keep_probs[gate] = keep_prob
    layers = {}
    for layer_index, name in enumerate(STATE_NAMES):
      scores = metrics.attribution_divergences(reference, keep_prob[layer_index], validation.mask)
      masked = attribute.masked_agreement(model, frozen_params, probe, state.probe_params,
                                          dm_config, val_batch, layer_index)
      layers[name] = dict(kl=scores['kl'], js=scores['js'],
                          agreement=float(masked['agreement'].mean()),
                          masked_fraction=float(masked['masked_fraction'].mean()),
                          multiplier=float(state.lagrange_multipliers[layer_index]))
    per_layer[f'diffmask_{gate}'] = layers
    feedforward = layers[STATE_NAMES[FEEDFORWARD_STATE]]
    methods[f'diffmask_{gate}'] = dict(kl=feedforward['kl'], js=feedforward['js'],
                                       layer=STATE_NAMES[FEEDFORWARD_STATE],
                                       num_examples=scores['num_examples'])
    histories[gate] = history
    if gate == 'hidden' and config.erased_state == 'diffmask_baseline':
      erased_vector = np.asarray(probe.apply(state.probe_params,
                                             method='baseline_vectors')[FEEDFORWARD_STATE])

  baseline_examples = min(config.baseline_examples, len(validation))
  if baseline_examples and baseline_names:
    examples = validation.take(slice(0, baseline_examples))
    examples_reference = ground_truth_attribution(examples)
    results = baseline_attributions(baseline_names, model, frozen_params, train_data, examples,
                                    config, log, erased_vector=erased_vector)
    for name, result in results.items():
      methods[name] = dict(**score_attribution(examples_reference, result.pop('scores'),
                                               examples.mask),
                           layer=STATE_NAMES[FEEDFORWARD_STATE], **result)

  _write_heatmaps(out_dir, validation, keep_probs, config.num_heatmap_examples)
  report = {
      'task': 'toy',
      'config': dataclasses.asdict(config),
      'model': {'val_accuracy': val_accuracy, 'reused_checkpoint': reused,
                'num_train': len(train_data), 'num_validation': len(validation)},
      'methods': methods,
      'per_layer': per_layer,
      'training': histories,
      'seconds': time.time() - started,
  }
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  log(format_table(report))
  return report


def _write_heatmaps(out_dir: Path, validation: ToyData, keep_probs: dict, count: int) -> None:
  count = min(count, len(validation))
  if count == 0:
    return
  lengths = validation.mask[:count].sum(axis=1)
  tokens = [[str(d) for d in validation.digits[i, :lengths[i]]] for i in range(count)]
  titles = [f'query n={validation.query[i, 0]}, m={validation.query[i, 1]}' for i in range(count)]
  for gate, keep_prob in keep_probs.items():
    what = 'input digits' if gate == 'input' else 'states'
    fig = viz.keep_probability_heatmaps(
        keep_prob[:, :count], tokens, STATE_NAMES, titles,
        suptitle=f'DiffMask {gate} gates: keep probability of {what} at each depth')
    viz.save_figure(fig, out_dir / f'heatmap_{gate}.png')


def score_attribution(reference: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> dict:
  """One method's Table 1 entry: ``kl`` (``None`` if infinite), ``js``, counts.

  ``reference``, ``scores`` (non-negative), ``mask``: ``(examples, seq)``.
  ``infinite_kl_examples`` counts the examples where ``scores`` put no mass on
  a position the ground truth needs (each makes the mean ``D_KL`` infinite).
  """
  divergences = metrics.attribution_divergences(reference, scores, mask)
  defined = (np.asarray(reference) * np.asarray(mask)).sum(axis=-1) > 0
  infinite = int(np.sum(~np.isfinite(metrics.attribution_kl(reference, scores, mask)[defined])))
  return dict(kl=None if infinite else divergences['kl'], js=divergences['js'],
              num_examples=divergences['num_examples'], infinite_kl_examples=infinite)


def baseline_attributions(names: Sequence[str], model: ToyModel, params, train_data: ToyData,
                          examples: ToyData, config: ToyExperimentConfig,
                          log: Callable[[str], None] = print,
                          erased_vector: np.ndarray | None = None) -> dict:
  """Runs the baselines ``names`` on ``examples``, attributing to the feed-forward state.

  Returns ``{name: {'scores': (examples, seq) non-negative, 'seconds',
  'settings', ...}}``. Signed scores are replaced by their magnitude.

  The erasing methods (erasure, occlusion, LIME) replace an erased h1 state by
  ``erased_vector`` ``(feedforward_dim,)``: ``run_toy`` passes DiffMask's
  learned hidden-gate baseline for h1, so erasure erases exactly as DiffMask
  masks and the two differ only in search against amortised prediction (the
  zero vector when ``None``; it can sit inside the n or m cluster of a
  classifier's h1 space, where "erased" means "another m", see
  docs/RESULTS.md). Integrated gradients start from the zero vector (the
  usual baseline); Schulz et al.'s noise has the mean and standard deviation
  of the training set's feed-forward states.
  The optimisers' settings are the original DiffMask code's toy notebook's:
  500 steps of centered RMSprop at 0.1, Schulz ``beta = 10`` and gate logits
  from 5, Guan noise-scale logits from -5 and ``la = 1`` on a batch of 1 000
  (see :mod:`dmx.baselines.guan`).
  """
  layer = FEEDFORWARD_STATE
  batch = examples.as_batch()
  erased = np.zeros(model.state_dims[layer], np.float32) if erased_vector is None else (
      np.asarray(erased_vector, np.float32))
  erased_name = ('zeros' if erased_vector is None else
                 f'DiffMask hidden-gate baseline b1 = {[round(float(x), 4) for x in erased]}')
  base_key = jax.random.fold_in(jax.random.key(config.seed), 1000)
  statistics = {}

  def noise_statistics():
    if not statistics:
      train_batches = (chunk.as_batch() for chunk in iterate_batches(train_data, 1000))
      statistics['mean'], statistics['std'] = baselines.state_statistics(
          model, params, train_batches, layer)
    return statistics['mean'], statistics['std']

  def schulz(attribution):
    mean, std = noise_statistics()
    settings = dict(beta=10.0, steps=config.baseline_steps, learning_rate=0.1,
                    optimizer='rmsprop', initial_alpha=5.0, per_feature=False,
                    attribution=attribution, noise='training-set mean and std of h1')
    run = jax.jit(functools.partial(
        baselines.information_bottleneck, model, layer_index=layer, noise_mean=mean,
        noise_std=std, **{k: v for k, v in settings.items() if k != 'noise'}))
    return np.asarray(run(params, batch, jax.random.fold_in(base_key, 1)).token_scores), settings

  def guan():
    settings = dict(steps=config.baseline_steps, learning_rate=0.1, optimizer='rmsprop',
                    entropy_weight=5e-4, initial_scale_logit=-5.0, attribution='1 / sigma')
    run = jax.jit(functools.partial(
        baselines.guan_noise_scales, model, layer_index=layer,
        **{k: v for k, v in settings.items() if k != 'attribution'}))
    return np.asarray(run(params, batch, jax.random.fold_in(base_key, 2)).token_scores), settings

  def integrated_gradients():
    settings = dict(steps=config.ig_steps, rule='right', variant=config.ig_variant,
                    baseline='zeros', target='predicted logit', token_score='|sum over features|')
    run = jax.jit(functools.partial(baselines.integrated_gradients, model, layer_index=layer,
                                    steps=config.ig_steps, variant=config.ig_variant,
                                    path_batch_size=min(10, config.ig_steps)))
    return np.abs(np.asarray(run(params, batch).token_scores)), settings

  def gradients(which):
    run = jax.jit(functools.partial(baselines.gradient_attribution, model, layer_index=layer))
    result = run(params, batch)
    if which == 'gradient':
      return np.asarray(result.gradient_norm), dict(token_score='L2 norm over features')
    return np.abs(np.asarray(result.gradient_times_input)), dict(
        token_score='|sum over features|')

  def occlusion():
    run = jax.jit(functools.partial(baselines.occlusion, model, layer_index=layer))
    return np.abs(np.asarray(run(params, batch, baseline=erased).token_scores)), dict(
        baseline=erased_name, output='probability', token_score='|drop|')

  def lime():
    settings = dict(num_samples=1000, baseline=erased_name, output='probability',
                    kernel_width=25.0, ridge=1.0)
    run = jax.jit(functools.partial(baselines.lime, model, layer_index=layer, num_samples=1000))
    scores = run(params, batch, jax.random.fold_in(base_key, 3), baseline=erased).token_scores
    return np.abs(np.asarray(scores)), dict(settings, token_score='|coefficient|')

  def erasure():
    result = baselines.erasure_search(model, params, batch, layer_index=layer, baseline=erased)
    found = result.size[result.found]
    settings = dict(baseline=erased_name, min_size=1, tie_break='confidence',
                    evaluations=result.evaluations,
                    mean_kept=float(found.mean()) if len(found) else None,
                    single_position_fraction=float(np.mean(found == 1)) if len(found) else None,
                    mean_optimal_subsets=float(result.num_optimal[result.found].mean())
                    if len(found) else None)
    return result.keep, settings

  runners = {'integrated_gradients': integrated_gradients, 'schulz': lambda: schulz('capacity'),
             'schulz_gate': lambda: schulz('gate'), 'guan': guan, 'erasure': erasure,
             'gradient': lambda: gradients('gradient'),
             'gradient_times_input': lambda: gradients('gradient_times_input'),
             'occlusion': occlusion, 'lime': lime}
  results = {}
  for name in names:
    started = time.time()
    scores, settings = runners[name]()
    seconds = time.time() - started
    log(f'{name}: {len(examples)} examples in {seconds:.1f} s')
    results[name] = dict(scores=scores, seconds=seconds, settings=settings)
  return results


def format_table(report: dict) -> str:
  """A short text table: accuracy, then D_KL and D_JS per method (``-``: infinite D_KL)."""
  lines = [f"toy model validation accuracy: {report['model']['val_accuracy']:.4f}",
           f"{'method':<22} {'D_KL':>8} {'D_JS':>8}"]
  for name, scores in report['methods'].items():
    kl = '-' if scores['kl'] is None else f"{scores['kl']:.4f}"
    lines.append(f"{name:<22} {kl:>8} {scores['js']:>8.4f}")
  return '\n'.join(lines)
