"""Fine-tunes a BERT-family encoder on SST-5 sentence labels (``dmx finetune sst``).

DiffMask explains a *trained* classifier; this pipeline produces one. It loads
a Hugging Face checkpoint with :func:`dmx.models.hf_import.load_pretrained`
(a classification head the checkpoint lacks is added, randomly initialised),
encodes SST train and dev with :func:`dmx.data.sst.encode_sst`, and trains with
AdamW (linear warmup, then linear decay to zero; decay skips biases and
LayerNorm; gradients clipped to norm 1) on the cross-entropy of the root label.

Outputs under ``out_dir``:

* ``checkpoint/``: the resumable train state (params, optimizer state, step,
  the best dev params so far), saved atomically every ``checkpoint_every``
  steps. A rerun with the same settings resumes from it; with other settings
  it raises :class:`CheckpointMismatchError` rather than starting afresh.
* ``model/``: the best-dev model (with ``select='last'``, the final one) as a
  Hugging Face folder (``config.json`` with ``BertForSequenceClassification``,
  ``model.safetensors``, tokenizer files) that
  ``load_pretrained(out_dir / 'model', head='classification')`` reads.
* ``report.json``: dev accuracy and macro-F1, steps, seconds, per-eval history,
  truncation counts, and the machine.

Batches are shuffled per epoch by ``numpy.random.default_rng([seed, epoch])``
and only full batches are used, so the data position is a function of the step
alone and resuming replays exactly what an uninterrupted run would see (the
encoder has no dropout, so no random key is carried). Each batch is cut to its
longest sentence rounded up to ``length_bucket`` tokens: padding is masked out
of attention, so this only saves compute, at the price of one compilation per
bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dmx import checkpoint, metrics
from dmx.data import sst
from dmx.data.common import padded_batches
from dmx.pipelines import checked_output_folder
from dmx.models.bert import BertModel, Params
from dmx.models.hf_import import (bundled_minilm_folder, load_pretrained, read_hf_config,
                                  resolve_model_folder, save_pretrained)

BUNDLED_MINILM = 'bundled-minilm'  # --model alias for dmx.models.hf_import.bundled_minilm_folder()
CHECKPOINT_DIR = 'checkpoint'
MODEL_DIR = 'model'
REPORT_NAME = 'report.json'
DTYPES = ('float32', 'bfloat16')
SELECTIONS = ('best', 'last')
EVAL_BATCH_SIZE = 128


class CheckpointMismatchError(ValueError):
  """``out_dir/checkpoint`` was written by a run with other settings."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Settings of an SST-5 fine-tuning run.

  Attributes:
    model: a Hugging Face model folder, a hub id, or ``'bundled-minilm'``.
    data_dir: the folder holding ``sst/{train,dev}.txt``; None for
      :func:`dmx.data.sst.default_data_dir`.
    max_length: tokens per sentence, specials included; longer ones are
      truncated and counted in the report.
    epochs: passes over the training set (fractions allowed); ignored when
      ``max_steps`` is set.
    max_steps: optimizer steps; None for ``epochs`` worth.
    warmup_fraction: share of the steps with a linearly rising learning rate.
    eval_every: steps between dev evaluations (the run also evaluates at its end).
    checkpoint_every: steps between checkpoints (and one at the end).
    time_budget_minutes: wall-clock limit of this invocation; when reached the
      run evaluates, checkpoints, writes its outputs and stops. None: no limit.
    dtype: compute dtype, ``'float32'`` or ``'bfloat16'``.
    max_train_examples / max_eval_examples: use only the first examples (tests).
    length_bucket: batches are cut to a multiple of this many tokens.
    select: which parameters ``model/`` holds: ``'best'`` (the highest dev
      accuracy seen at an evaluation, the first on ties) or ``'last'`` (the
      final step's). The last ones of a longer run are usually the more
      confident classifier, which DiffMask's agreement benefits from.
    label_smoothing: the cross-entropy target puts ``1 - label_smoothing`` on
      the label plus an equal share of ``label_smoothing`` on every class. It
      caps the confidence fine-tuning drives the training sentences to, so the
      classifier is not far surer on train than on dev.
  """
  model: str = BUNDLED_MINILM
  data_dir: str | None = None
  max_length: int = 84
  batch_size: int = 32
  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  warmup_fraction: float = 0.1
  epochs: float = 3.0
  max_steps: int | None = None
  eval_every: int = 100
  checkpoint_every: int = 100
  seed: int = 0
  time_budget_minutes: float | None = None
  dtype: str = 'float32'
  max_train_examples: int | None = None
  max_eval_examples: int | None = None
  length_bucket: int = 16
  select: str = 'best'
  label_smoothing: float = 0.0

  def __post_init__(self):
    if not isinstance(self.model, str) or not self.model:
      raise ValueError('model must be a model folder, a hub id or bundled-minilm')
    for name in ('max_length', 'batch_size', 'eval_every', 'checkpoint_every', 'length_bucket'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if self.max_length < 3:
      raise ValueError(f'max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}')
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f'weight_decay must be >= 0, got {self.weight_decay}')
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f'warmup_fraction must be in [0, 1), got {self.warmup_fraction}')
    if not (math.isfinite(self.epochs) and self.epochs > 0):
      raise ValueError(f'epochs must be > 0, got {self.epochs}')
    if self.max_steps is not None and (isinstance(self.max_steps, bool) or self.max_steps < 1):
      raise ValueError(f'max_steps must be >= 1 or None, got {self.max_steps!r}')
    if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
      raise ValueError(f'time_budget_minutes must be > 0 or None, got {self.time_budget_minutes}')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')
    if self.select not in SELECTIONS:
      raise ValueError(f'select must be one of {SELECTIONS}, got {self.select!r}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    for name in ('max_train_examples', 'max_eval_examples'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f'{name} must be >= 1 or None, got {value}')

  @classmethod
  def tiny(cls, model: str, **overrides) -> 'FinetuneConfig':
    """A few steps on a few sentences, for tests."""
    values = dict(model=model, max_length=32, batch_size=4, learning_rate=1e-3, max_steps=4,
                  eval_every=2, checkpoint_every=2, max_train_examples=16, max_eval_examples=8)
    values.update(overrides)
    return cls(**values)

  def fingerprint(self) -> dict:
    """What determines the trained weights; a checkpoint resumes only if it matches."""
    values = dataclasses.asdict(self)
    for name in ('data_dir', 'time_budget_minutes', 'checkpoint_every', 'select'):
      # where the data sits, when the run stops or saves, and which of its
      # parameters are exported change nothing in the training itself
      values.pop(name)
    if values['label_smoothing'] == 0.0:
      values.pop('label_smoothing')  # runs from before the option resume unchanged
    return values


def resolve_model(model: str) -> Path:
  """The local folder of ``model`` (``'bundled-minilm'`` is the bundled MiniLM)."""
  if model == BUNDLED_MINILM:
    return bundled_minilm_folder()
  return resolve_model_folder(model)


# ---------------------------------------------------------------------------
# Optimisation


def make_optimizer(config: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warmup over ``warmup_fraction`` of ``total_steps`` then linear decay to 0.

  Weight decay applies to kernels and embeddings only (not biases or
  LayerNorm), as in BERT; gradients are clipped to global norm 1.
  """
  warmup = int(round(config.warmup_fraction * total_steps))
  decay = optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1))
  schedule = decay if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'embedding'), params)

  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))


def init_state(params: Params, optimizer: optax.GradientTransformation) -> dict:
  """The train state ``{'params', 'opt_state', 'step'}`` (step an int32 scalar)."""
  return {'params': params, 'opt_state': optimizer.init(params), 'step': jnp.zeros((), jnp.int32)}


def make_train_step(model: BertModel, optimizer: optax.GradientTransformation,
                    label_smoothing: float = 0.0) -> Callable:
  """A jitted ``train_step(state, batch, labels) -> (state, {'loss', 'accuracy'})``.

  ``batch`` holds ``input_ids``, ``mask``, ``token_type_ids``, each ``(B, S)``;
  ``labels`` is ``(B,)`` int. The incoming ``state`` is donated. The loss is
  the cross-entropy against labels smoothed by ``label_smoothing``.
  """

  def train_step(state, batch, labels):
    def loss_fn(params):
      logits, _ = model.forward(params, batch)  # (B, num_labels)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
                 'step': state['step'] + 1}
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return new_state, {'loss': loss, 'accuracy': accuracy}

  return jax.jit(train_step, donate_argnums=0)


def trim_batch(batch: dict, bucket: int) -> dict:
  """Cuts ``(B, S)`` arrays to the longest row rounded up to a multiple of ``bucket`` (<= S)."""
  seq = batch['input_ids'].shape[1]
  longest = int(np.asarray(batch['mask']).sum(axis=1).max())
  length = min(seq, -(-longest // bucket) * bucket)
  return {name: value[:, :length] for name, value in batch.items()}


def train_batch(features: sst.SstFeatures, step: int, batch_size: int, seed: int,
                bucket: int) -> tuple[dict, np.ndarray]:
  """The batch of global step ``step``: ``(batch_dict (B, S'), labels (B,))``."""
  steps_per_epoch = len(features) // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(features))
  chosen = features.take(order[index * batch_size:(index + 1) * batch_size])
  return trim_batch(chosen.as_batch(), bucket), chosen.labels


def make_predict(model: BertModel) -> Callable:
  """A jitted ``predict(params, batch) -> logits (B, num_labels)``."""
  return jax.jit(lambda params, batch: model.forward(params, batch)[0])


def evaluate(predict: Callable, params: Params, features: sst.SstFeatures, bucket: int = 16,
             batch_size: int = EVAL_BATCH_SIZE) -> dict:
  """``{'accuracy', 'macro_f1', 'loss'}`` of ``params`` on ``features`` (all examples)."""
  logits = []
  for batch, size in padded_batches(features, batch_size):
    logits.append(np.asarray(predict(params, trim_batch(batch, bucket)))[:size])
  logits = np.concatenate(logits).astype(np.float64)
  labels = features.labels
  predictions = logits.argmax(-1)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
  return {'accuracy': float(np.mean(predictions == labels)),
          'macro_f1': metrics.macro_f1(labels, predictions, sst.NUM_CLASSES),
          'loss': float(-log_probs[np.arange(len(labels)), labels].mean())}


# ---------------------------------------------------------------------------
# Checkpoints and outputs


def _flat(tree) -> dict:
  return {f'{i:05d}': leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))}


def save_checkpoint(path: Path, state: dict, best_params: Params, metadata: dict) -> None:
  """Atomically saves the train state and the best params (leaves by index) with ``metadata``."""
  checkpoint.save(path, {'state': _flat(state), 'best_params': _flat(best_params)}, metadata)


def restore_checkpoint(path: Path, config: FinetuneConfig, state: dict, best_params: Params
                       ) -> tuple[dict, Params, dict]:
  """``(state, best_params, metadata)`` from ``path``, shaped as the given templates.

  Raises :class:`CheckpointMismatchError` when the checkpoint's settings differ.
  """
  metadata = checkpoint.read_metadata(path)
  saved = metadata.get('fingerprint')
  wanted = json.loads(json.dumps(config.fingerprint()))
  if saved != wanted:
    saved = saved if isinstance(saved, dict) else {}
    differing = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    details = ', '.join(f'{key}: checkpoint {saved.get(key)!r} vs now {wanted.get(key)!r}'
                        for key in differing[:4])
    raise CheckpointMismatchError(f'{path} was written by a run with other settings ({details}); '
                                  f'use another --out or delete that checkpoint')
  target = {'state': _flat(state), 'best_params': _flat(best_params)}
  restored = checkpoint.restore(path, target)
  unflatten = lambda template, flat: jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(template), [jnp.asarray(flat[key]) for key in sorted(flat)])
  return (unflatten(state, restored['state']), unflatten(best_params, restored['best_params']),
          metadata)


def machine_info() -> dict:
  """Host and JAX device facts for the report."""
  return {'hostname': platform.node(), 'platform': platform.platform(),
          'processor': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()]}


# ---------------------------------------------------------------------------
# The pipeline


def load_features(config: FinetuneConfig, tokenizer) -> tuple[sst.SstFeatures, sst.SstFeatures]:
  """Encoded SST ``(train, dev)``, cut to ``max_{train,eval}_examples``."""
  train_examples = sst.load_sst('train', config.data_dir, limit=config.max_train_examples)
  dev_examples = sst.load_sst('dev', config.data_dir, limit=config.max_eval_examples)
  return (sst.encode_sst(train_examples, tokenizer, config.max_length),
          sst.encode_sst(dev_examples, tokenizer, config.max_length))


def total_steps(config: FinetuneConfig, num_train: int) -> int:
  """Optimizer steps of the whole run (full batches only)."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size {config.batch_size} exceeds the {num_train} training examples')
  if config.max_steps is not None:
    return config.max_steps
  return max(1, int(math.ceil(config.epochs * steps_per_epoch)))


def run_finetune(config: FinetuneConfig, out_dir: str | os.PathLike, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
  """Fine-tunes ``config.model`` on SST-5 and writes ``out_dir/{checkpoint,model,report.json}``.

  Resumes from ``out_dir/checkpoint`` when it exists and was written with the
  same settings (raises :class:`CheckpointMismatchError` otherwise). Stops at
  ``total_steps`` or when ``time_budget_minutes`` runs out, evaluating and
  checkpointing first. Returns the report.
  """
  started = time.time()
  deadline = (started + 60 * config.time_budget_minutes
              if config.time_budget_minutes is not None else math.inf)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpoint_dir = out_dir / CHECKPOINT_DIR
  folder = resolve_model(config.model)
  source_config = read_hf_config(folder)
  model, params, tokenizer = load_pretrained(folder, head='classification',
                                             num_labels=sst.NUM_CLASSES, dtype=config.dtype,
                                             seed=config.seed)
  if tokenizer is None:
    raise ValueError(f'{folder} has no tokenizer files; fine-tuning needs its tokenizer')
  if config.max_length > model.config.max_sequence_length:
    raise ValueError(f'max_length {config.max_length} exceeds the model limit of '
                     f'{model.config.max_sequence_length} tokens')
  train_features, dev_features = load_features(config, tokenizer)
  steps = total_steps(config, len(train_features))
  steps_per_epoch = len(train_features) // config.batch_size
  log(f'fine-tuning {folder} on {len(train_features)} SST train sentences '
      f'({train_features.num_truncated} truncated to {config.max_length} tokens), '
      f'{len(dev_features)} dev; {steps} steps of {config.batch_size} '
      f'({steps / steps_per_epoch:.2f} epochs)')

  optimizer = make_optimizer(config, steps)
  # a copy: train_step donates (deletes) the arrays of the state it is given
  best_params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  state = init_state(params, optimizer)
  history: list[dict] = []
  best = {'accuracy': -1.0, 'macro_f1': 0.0, 'step': 0}
  previous_seconds = 0.0
  resumed_from = None
  if (checkpoint_dir / 'metadata.json').exists() or (
      checkpoint_dir.with_name(CHECKPOINT_DIR + '.previous') / 'metadata.json').exists():
    state, best_params, metadata = restore_checkpoint(checkpoint_dir, config, state, best_params)
    history, best = metadata['history'], metadata['best']
    previous_seconds = metadata.get('train_seconds', 0.0)
    resumed_from = int(state['step'])
    log(f'resuming from {checkpoint_dir} at step {resumed_from}')
  del params

  train_step = make_train_step(model, optimizer, config.label_smoothing)
  predict = make_predict(model)

  def metadata_now(step_now: int) -> dict:
    return {'fingerprint': config.fingerprint(), 'step': step_now, 'history': history,
            'best': best, 'train_seconds': previous_seconds + time.time() - started,
            'steps_per_epoch': steps_per_epoch, 'total_steps': steps}

  def run_eval(step_now: int, train_loss: float | None) -> None:
    nonlocal best_params
    scores = evaluate(predict, state['params'], dev_features, config.length_bucket)
    history.append({'step': step_now, 'epoch': step_now / steps_per_epoch,
                    'train_loss': train_loss, 'dev_loss': scores['loss'],
                    'dev_accuracy': scores['accuracy'], 'dev_macro_f1': scores['macro_f1'],
                    'seconds': previous_seconds + time.time() - started})
    if scores['accuracy'] > best['accuracy']:
      best.update(accuracy=scores['accuracy'], macro_f1=scores['macro_f1'], step=step_now)
      best_params = jax.tree.map(lambda x: jnp.array(x, copy=True), state['params'])
    log(f'step {step_now}: dev accuracy {scores["accuracy"]:.4f}, '
        f'macro-F1 {scores["macro_f1"]:.4f}, loss {scores["loss"]:.4f} '
        f'(best {best["accuracy"]:.4f} at step {best["step"]})')

  step = int(state['step'])
  stopped_by = 'completed'
  recent_loss, recent_acc = [], []
  last_eval = history[-1]['step'] if history else -1
  last_saved = step
  bar = tqdm(total=steps, initial=step, desc='finetune sst', unit='step', disable=not progress,
             dynamic_ncols=True)
  try:
    while step < steps:
      if time.time() >= deadline:
        stopped_by = 'time_budget'
        log(f'time budget of {config.time_budget_minutes} min reached at step {step}')
        break
      batch, labels = train_batch(train_features, step, config.batch_size, config.seed,
                                  config.length_bucket)
      state, outputs = train_step(state, batch, labels)
      step += 1
      recent_loss.append(outputs['loss'])
      recent_acc.append(outputs['accuracy'])
      bar.update(1)
      if step % 10 == 0 or step == steps:
        bar.set_postfix(loss=f'{float(np.mean(jax.device_get(recent_loss[-50:]))):.3f}',
                        acc=f'{float(np.mean(jax.device_get(recent_acc[-50:]))):.3f}')
      if step % config.eval_every == 0:
        run_eval(step, float(np.mean(jax.device_get(recent_loss))))
        last_eval = step
        recent_loss, recent_acc = [], []  # train_loss is the mean since the previous eval
      if step % config.checkpoint_every == 0:
        save_checkpoint(checkpoint_dir, state, best_params, metadata_now(step))
        last_saved = step
  finally:
    bar.close()
  if last_eval != step:
    run_eval(step, float(np.mean(jax.device_get(recent_loss))) if recent_loss else None)
  if last_saved != step or resumed_from == step or not checkpoint_dir.exists():
    save_checkpoint(checkpoint_dir, state, best_params, metadata_now(step))

  exported = best_params if config.select == 'best' else state['params']
  exported_step = best['step'] if config.select == 'best' else step
  model_dir = save_pretrained(
      out_dir / MODEL_DIR, model, exported, tokenizer,
      model_type=source_config.get('model_type', 'bert'), label_names=sst.LABEL_NAMES,
      base_config={**source_config, 'problem_type': 'single_label_classification'})
  final = history[-1]
  report = {
      'task': 'finetune_sst',
      'config': dataclasses.asdict(config),
      'model_source': str(folder),
      'model_dir': str(model_dir),
      'dev_accuracy': best['accuracy'],
      'dev_macro_f1': best['macro_f1'],
      'best_step': best['step'],
      'select': config.select,
      'model_step': exported_step,
      'model_dev_accuracy': best['accuracy'] if config.select == 'best' else final['dev_accuracy'],
      'model_dev_macro_f1': best['macro_f1'] if config.select == 'best' else final['dev_macro_f1'],
      'final_dev_accuracy': final['dev_accuracy'],
      'final_dev_macro_f1': final['dev_macro_f1'],
      'steps': step,
      'total_steps': steps,
      'epochs_done': step / steps_per_epoch,
      'stopped_by': stopped_by,
      'resumed_from_step': resumed_from,
      'seconds': time.time() - started,
      'train_seconds_all_invocations': previous_seconds + time.time() - started,
      'num_train': len(train_features),
      'num_dev': len(dev_features),
      'num_truncated': {'train': train_features.num_truncated,
                        'dev': dev_features.num_truncated},
      'history': history,
      'machine': machine_info(),
  }
  (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
  log(f'best dev accuracy {best["accuracy"]:.4f} (macro-F1 {best["macro_f1"]:.4f}) at step '
      f'{best["step"]}; wrote the step-{exported_step} model to {model_dir} and '
      f'{out_dir / REPORT_NAME}')
  return report


# ---------------------------------------------------------------------------
# Command-line adapter (``dmx finetune sst``)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the options of ``dmx finetune sst`` to ``parser``."""
  defaults = FinetuneConfig()
  parser.add_argument('--model', required=True,
                      help=f'Hugging Face model folder or hub id ({BUNDLED_MINILM!r}: the bundled '
                      'all-MiniLM-L6-v2)')
  parser.add_argument('--out', required=True,
                      help='output folder (created if missing; a checkpoint there is resumed)')
  parser.add_argument('--data', default=None,
                      help='folder with sst/train.txt and sst/dev.txt (default: $DMX_DATA_DIR '
                      'or ../shared/data)')
  parser.add_argument('--epochs', type=float, default=defaults.epochs)
  parser.add_argument('--max-steps', type=int, default=None,
                      help='optimizer steps (overrides --epochs)')
  parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
  parser.add_argument('--learning-rate', type=float, default=defaults.learning_rate)
  parser.add_argument('--max-length', type=int, default=defaults.max_length,
                      help='tokens per sentence; longer ones are truncated')
  parser.add_argument('--eval-every', type=int, default=defaults.eval_every)
  parser.add_argument('--checkpoint-every', type=int, default=defaults.checkpoint_every)
  parser.add_argument('--seed', type=int, default=defaults.seed)
  parser.add_argument('--time-budget-minutes', type=float, default=None,
                      help='stop (evaluate, save) after this much wall-clock time')
  parser.add_argument('--select', choices=SELECTIONS, default=defaults.select,
                      help='which parameters model/ holds: the best dev accuracy seen (default) '
                      'or the last step\'s; a finished run rerun with the other choice only '
                      're-exports')
  parser.add_argument('--label-smoothing', type=float, default=defaults.label_smoothing,
                      help='smooth the cross-entropy targets by this much (default 0: none)')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')


def _check_model(value: str) -> None:
  if value == BUNDLED_MINILM:
    return
  path = Path(value).expanduser()
  looks_local = path.exists() or value.startswith(('.', '/', '~')) or value.count('/') > 1
  if looks_local and not path.is_dir():
    raise ValueError(f'--model {value}: model folder does not exist' if not path.exists()
                     else f'--model {value}: is a file, expected a model folder')
  if path.is_dir() and not (path / 'config.json').is_file():
    raise ValueError(f'--model {value}: no config.json there; is it a Hugging Face model folder?')


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
  """The :class:`FinetuneConfig` of parsed ``dmx finetune sst`` arguments (ValueError if bad)."""
  _check_model(args.model)
  if args.data is not None and not Path(args.data).is_dir():
    raise ValueError(f'--data {args.data}: folder does not exist')
  return FinetuneConfig(
      model=args.model, data_dir=args.data, max_length=args.max_length,
      batch_size=args.batch_size, learning_rate=args.learning_rate, epochs=args.epochs,
      max_steps=args.max_steps, eval_every=args.eval_every,
      checkpoint_every=args.checkpoint_every, seed=args.seed,
      time_budget_minutes=args.time_budget_minutes, select=args.select,
      label_smoothing=args.label_smoothing)


def run_from_args(args: argparse.Namespace) -> int:
  """Validates parsed arguments and runs; bad input raises a one-line ValueError."""
  out = checked_output_folder(args.out)
  config = config_from_args(args)
  report = run_finetune(config, out, progress=not args.no_progress)
  print(f'model/ holds step {report["model_step"]}: dev accuracy '
        f'{report["model_dev_accuracy"]:.4f}, macro-F1 {report["model_dev_macro_f1"]:.4f}; '
        f'wrote {out / MODEL_DIR} and {out / REPORT_NAME}')
  return 0
