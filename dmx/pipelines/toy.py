"""The toy experiment end to end (paper sec. 4.1, Table 1): ``dmx toy``.

1. generate the data (seeded), 2. train the toy classifier or reuse its
checkpoint, 3. train DiffMask probes with input gates and with hidden gates,
4. score their attributions to the feed-forward states against the ground
truth (``D_KL``, ``D_JS``), 5. write ``report.json``, heatmaps, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dmx import attribute, checkpoint, metrics, objective, probes, train, viz
from dmx.data.common import endless_batches
from dmx.data.toy import (ToyData, generate_toy_data, ground_truth_attribution,
                          split_toy_data)
from dmx.models.toy import STATE_NAMES, ToyModel, ToyModelConfig, accuracy, train_toy_model

# the state whose attribution the paper scores against the ground truth (Table 1)
FEEDFORWARD_STATE = 1


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

  def __post_init__(self):
    positive = ('num_examples', 'max_length', 'epochs', 'batch_size', 'diffmask_batch_size',
                'probe_hidden_size')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.diffmask_steps < 0 or self.num_heatmap_examples < 0:
      raise ValueError('diffmask_steps and num_heatmap_examples must be >= 0')
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
                  num_heatmap_examples=2)
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


def run_toy(config: ToyExperimentConfig, out_dir: str | Path, *, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
  """Runs the whole toy experiment and writes its outputs under ``out_dir``.

  Writes ``report.json``, ``heatmap_input.png``, ``heatmap_hidden.png``, the
  model checkpoint ``toy_model/`` and the probes ``probe_input/``,
  ``probe_hidden/``. Returns the report.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  data = generate_toy_data(config.seed, config.num_examples, config.max_length)
  train_data, validation = split_toy_data(data, config.validation_fraction)
  model, frozen_params, reused = load_or_train_model(config, train_data, out_dir / 'toy_model',
                                                     progress, log)
  val_accuracy = accuracy(model, frozen_params, validation)
  log(f'toy model validation accuracy: {val_accuracy:.4f}')

  reference = ground_truth_attribution(validation)
  val_batch = validation.as_batch()
  methods, per_layer, histories, keep_probs = {}, {}, {}, {}
  for gate_index, gate in enumerate(('input', 'hidden')):
    dm_config = toy_diffmask_config(gate, config.sparsity)
    probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, form=config.probe_form,
                                 hidden_size=config.probe_hidden_size)
    batches = endless_batches(train_data, config.diffmask_batch_size, config.seed + 1 + gate_index)
    probe_key, run_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), gate_index))
    probe_params = train.init_probe_params(probe_key, model, probe, frozen_params, next(batches))
    state = train.init_state(dm_config, probe_params, len(model.state_dims))
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


def format_table(report: dict) -> str:
  """A short text table: accuracy, then D_KL and D_JS per method."""
  lines = [f"toy model validation accuracy: {report['model']['val_accuracy']:.4f}",
           f"{'method':<20} {'D_KL':>8} {'D_JS':>8}"]
  for name, scores in report['methods'].items():
    lines.append(f"{name:<20} {scores['kl']:>8.4f} {scores['js']:>8.4f}")
  return '\n'.join(lines)
