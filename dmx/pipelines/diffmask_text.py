"""DiffMask on a fine-tuned BERT-family encoder: ``dmx diffmask sst`` and ``dmx diffmask squad``.

1. load the frozen fine-tuned model (a Hugging Face folder with a trained
   classification or question-answering head) and its tokenizer,
2. train one DiffMask probe (input gates or hidden gates, one vote per state
   ``h0..h_{L+1}``) with :func:`dmx.train.fit` on the training split,
3. evaluate it on the evaluation split with the deterministic (median) gates:
   at every depth ``l`` the model is rerun with the gates of depth ``l`` applied
   (input gates mask ``h0`` with the product of the votes up to ``l``; hidden
   gates mask ``h_l``), and predictions are compared with the clean ones and
   with the gold labels,
4. write ``report.json``, ``keep_prob.npz`` (per-depth keep probabilities of
   every evaluated sentence / window), heatmaps (tokens x depths, as the
   paper's Figures 7 and 9), for SST the Figure 8b aggregate, and the probe
   checkpoint ``probe_<gate>/`` that :mod:`dmx.checkpoint` restores.

Checkpoint selection (SST, ``--validation-sentences N --select-agreement A``):
``N`` training sentences are held out (the same ones for every seed) and the
probe never trains on them. Every ``--validate-every`` steps the probe is
scored on them as on the evaluation split, and the report, the heatmaps and
``probe_<gate>/`` use the probe with the most masking among those whose
held-out agreement is at least ``A`` (the highest agreement when none
reaches it, flagged in the report). The original selects its checkpoints the
same way (lowest L0 among those meeting an agreement and a divergence bar),
on the dev set it reports; here the selection never sees the evaluation
split. The final iterate's evaluation is in the report too.

The headline numbers of the report (``masked_fraction``, ``agreement``,
``macro_f1_masked`` / ``exact_match_masked``...) are taken at
``report['summary_depth']``: for input gates the deepest depth ``h_{L+1}``
(the input mask that the votes of every layer agree on, what the paper's
"masking 46.3% of input tokens" refers to); for hidden gates the mean over
depths, each depth masked on its own ("67.6% of hidden states"). Masked
fractions count real tokens only (``[CLS]`` and ``[SEP]`` included) and pool
tokens over the whole split. ``per_layer`` holds every depth.

Paper settings are the defaults: SST margin 0.1, batch 64, max length 84;
SQuAD margin 1 (KL of start plus KL of end), batch 8, length 384; probe lr
3e-4, baseline lr 1e-3, multiplier lr 0.3, warm-up 1200 steps. Input-gate
baselines start from the model's ``[MASK]`` embedding, hidden-gate baselines
from zeros.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dmx import attribute, checkpoint, metrics, objective, probes, relaxations, train, viz
from dmx.data import squad as squad_data
from dmx.data.common import (bucketed_batches, length_buckets, padded_batches,
                             padded_index_batches)
from dmx.data import sst as sst_data
from dmx.models.bert import BertModel
from dmx.models.hf_import import MissingHeadError, load_pretrained
from dmx.pipelines import checked_output_folder, jsonable

TASKS = ('sst', 'squad')
TASK_HEADS = {'sst': 'classification', 'squad': 'question_answering'}
# the paper's settings per task (DESIGN.md)
TASK_DEFAULTS = {
    'sst': dict(margin=0.1, batch_size=64, max_length=84, steps=10_000, max_eval_examples=None,
                eval_batch_size=64),
    'squad': dict(margin=1.0, batch_size=8, max_length=384, steps=10_000, max_eval_examples=500,
                  eval_batch_size=16),
}
EVAL_SPLITS = {'sst': ('dev', 'test'), 'squad': ('dev',)}
TRAIN_SPLITS = {'sst': ('train', 'dev', 'test'), 'squad': ('train', 'dev')}
REPORT_FILE = 'report.json'
KEEP_PROB_FILE = 'keep_prob.npz'
TRAIN_CHECKPOINT = 'train_checkpoint'
SELECTED_CHECKPOINT = 'selected_probe'
# the held-out sentences are drawn with their own seed: the same for every probe seed
VALIDATION_SEED = 0
HIDDEN_BASELINE_INITS = ('zeros', 'mean_state', 'mask_at_h0')


@dataclasses.dataclass(frozen=True)
class TextDiffMaskConfig:
  """Everything ``dmx diffmask sst|squad`` runs; ``None`` fields take the task's default.

  Attributes:
    task: ``'sst'`` (SST-5 sentence classification) or ``'squad'`` (extractive QA).
    model: a Hugging Face model folder with a fine-tuned head for the task.
    gate: ``'input'`` or ``'hidden'``.
    data_dir: folder holding ``sst/`` or ``squad/`` (default ``../shared/data``).
    train_split, eval_split: the splits to train and to evaluate on.
    steps: DiffMask training steps.
    batch_size, max_length: training batch and sequence length (S).
    eval_batch_size: evaluation batch (every batch padded to it: one compilation).
    max_train_examples, max_eval_examples: keep the first so many examples (sentences
      or questions); ``None`` keeps all, except SQuAD evaluation (default 500 questions).
    margin: the tolerated divergence (SST 0.1, SQuAD 1).
    divergence_tail: bound the mean divergence of the worst fraction of each
      batch instead of the batch mean (1.0, the paper's constraint); see
      :attr:`dmx.train.DiffMaskConfig.divergence_tail`.
    flip_penalty: add this weight times the size of each flipped prediction
      to the constrained divergence (0, the paper's objective); see
      :attr:`dmx.train.DiffMaskConfig.flip_penalty`.
    probe_average_decay: evaluate and save the moving average of the probe's
      iterates with this decay instead of the last iterate (0, the original);
      see :attr:`dmx.train.DiffMaskConfig.probe_average_decay`.
    hidden_baseline_init: where the hidden gates' baselines start: ``'zeros'``
      (as the original, whose learned variant starts at a small random vector),
      ``'mean_state'``, the mean clean state of each depth over the real
      tokens of the first training batch, or ``'mask_at_h0'``, the ``[MASK]``
      embedding for the word-embedding state h0 and zeros elsewhere. A zero
      vector is far from every state (MiniLM's have norms near 10), and at the
      baseline's learning rate it moves about 1e-3 per coordinate per step;
      yet on SST the mean-state start masked less (docs/RESULTS.md).
    warmup_steps, sparsity, probe_learning_rate, baseline_learning_rate: passed to
      :class:`dmx.train.DiffMaskConfig` (paper: 1200, log_l0, 3e-4, 1e-3).
    relaxation: the gate distribution, among :data:`dmx.relaxations.NAMES`
      (paper: Hard Concrete).
    probe_form, probe_hidden_size: the probe (hidden size defaults to hidden / 4,
      the original's ``hidden_attention``).
    probe_weight_norm: weight-normalise the MLP vote's dense layers, as the
      original does (:class:`dmx.probes.WeightNormDense`); off by default.
    num_heatmap_examples: heatmaps drawn (one PNG each).
    bucket_width: training batches hold sequences of similar length, padded to
      a multiple of this many tokens (one compilation per bucket length).
    checkpoint_every: save the whole train state to ``OUT/train_checkpoint``
      every so many steps; running the same command again resumes from it.
    clean_pass_cache_gb: compute the frozen model's clean pass over the training
      set once and keep it in host memory when it needs at most this many GB
      (0 never caches); the same numbers, fewer model passes per step.
    allow_random_head: accept a checkpoint without trained head weights (a random
      head, for smoke tests and timing only).
    dtype: the frozen model's compute dtype, ``'float32'`` or ``'bfloat16'``.
    layers: train the probe at these depths only (``None``: every depth, the
      paper's procedure). For input gates the depth ``l`` trains the votes of
      layers ``0..l`` together, and the headline is taken at the deepest one.
    seed: seeds the probe initialisation, the batch order and the gate samples.
    validation_sentences: SST training sentences held out from the probe's
      training to score it on (0: none); chosen by a fixed seed, not ``seed``.
    select_agreement: keep the probe with the most masking whose held-out
      agreement is at least this (``None``: the final iterate). Needs
      ``validation_sentences``.
    validate_every: score on the held-out sentences every so many steps
      (default ``checkpoint_every``).
  """
  task: str
  model: str
  gate: str = 'input'
  data_dir: str | None = None
  train_split: str = 'train'
  eval_split: str = 'dev'
  steps: int | None = None
  batch_size: int | None = None
  max_length: int | None = None
  eval_batch_size: int | None = None
  max_train_examples: int | None = None
  max_eval_examples: int | None = None
  margin: float | None = None
  divergence_tail: float = 1.0
  flip_penalty: float = 0.0
  probe_average_decay: float = 0.0
  hidden_baseline_init: str = 'zeros'
  warmup_steps: int = 1200
  probe_learning_rate: float = 3e-4
  baseline_learning_rate: float = 1e-3
  sparsity: str = 'log_l0'
  relaxation: str = 'hard_concrete'
  probe_form: str = 'mlp'
  probe_hidden_size: int | None = None
  probe_weight_norm: bool = False
  num_heatmap_examples: int = 4
  bucket_width: int = 16
  clean_pass_cache_gb: float = 6.0
  checkpoint_every: int = 500
  allow_random_head: bool = False
  dtype: str = 'float32'
  layers: tuple[int, ...] | None = None
  seed: int = 0
  validation_sentences: int = 0
  select_agreement: float | None = None
  validate_every: int | None = None

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'task must be one of {TASKS}, got {self.task!r}')
    defaults = TASK_DEFAULTS[self.task]
    for name in ('steps', 'batch_size', 'max_length', 'eval_batch_size', 'margin'):
      if getattr(self, name) is None:
        object.__setattr__(self, name, defaults[name])
    if self.max_eval_examples is None:
      object.__setattr__(self, 'max_eval_examples', defaults['max_eval_examples'])
    if self.gate not in probes.GATES:
      raise ValueError(f'--gate must be one of {probes.GATES}, got {self.gate!r}')
    if self.eval_split not in EVAL_SPLITS[self.task]:
      raise ValueError(f'--eval-split must be one of {EVAL_SPLITS[self.task]} for {self.task}, '
                       f'got {self.eval_split!r}')
    if self.train_split not in TRAIN_SPLITS[self.task]:
      raise ValueError(f'--train-split must be one of {TRAIN_SPLITS[self.task]} for {self.task}, '
                       f'got {self.train_split!r}')
    if self.steps < 0:
      raise ValueError(f'--steps must be >= 0, got {self.steps}')
    for name in ('batch_size', 'eval_batch_size', 'max_length'):
      if getattr(self, name) < 1:
        raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(self, name)}')
    if self.max_length < 8:
      raise ValueError(f'--max-length must be >= 8, got {self.max_length}')
    for name in ('max_train_examples', 'max_eval_examples'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    if not (self.margin >= 0 and math.isfinite(self.margin)):
      raise ValueError(f'--margin must be a finite number >= 0, got {self.margin}')
    if not 0.0 < self.divergence_tail <= 1.0:
      raise ValueError(f'--divergence-tail must lie in (0, 1], got {self.divergence_tail}')
    if not (self.flip_penalty >= 0 and math.isfinite(self.flip_penalty)):
      raise ValueError(f'--flip-penalty must be a finite number >= 0, got {self.flip_penalty}')
    if not 0.0 <= self.probe_average_decay < 1.0:
      raise ValueError(f'--probe-average-decay must lie in [0, 1), got {self.probe_average_decay}')
    if self.hidden_baseline_init not in HIDDEN_BASELINE_INITS:
      raise ValueError(f'--hidden-baseline-init must be one of {HIDDEN_BASELINE_INITS}, '
                       f'got {self.hidden_baseline_init!r}')
    if self.hidden_baseline_init != 'zeros' and self.gate != 'hidden':
      raise ValueError('--hidden-baseline-init applies to hidden gates only (the input '
                       "gate's baseline starts at the [MASK] embedding)")
    for flag, rate in (('--probe-learning-rate', self.probe_learning_rate),
                       ('--baseline-learning-rate', self.baseline_learning_rate)):
      if not rate > 0 or rate != rate:
        raise ValueError(f'{flag} must be > 0, got {rate}')
    if self.warmup_steps < 0:
      raise ValueError(f'--warmup-steps must be >= 0, got {self.warmup_steps}')
    if self.sparsity not in objective.SPARSITY_LOSSES:
      raise ValueError(f'--sparsity must be one of {objective.SPARSITY_LOSSES}, '
                       f'got {self.sparsity!r}')
    if self.relaxation not in relaxations.NAMES:
      raise ValueError(f'--relaxation must be one of {relaxations.NAMES}, '
                       f'got {self.relaxation!r}')
    if self.probe_form not in probes.VOTE_FORMS:
      raise ValueError(f'--probe-form must be one of {probes.VOTE_FORMS}, got {self.probe_form!r}')
    if self.probe_hidden_size is not None and self.probe_hidden_size < 1:
      raise ValueError(f'--probe-hidden-size must be >= 1, got {self.probe_hidden_size}')
    if self.probe_weight_norm and self.probe_form != 'mlp':
      raise ValueError(f'--probe-weight-norm applies to the mlp probe only, not '
                       f'--probe-form {self.probe_form}')
    if self.bucket_width < 1:
      raise ValueError(f'--bucket-width must be >= 1, got {self.bucket_width}')
    if not (self.clean_pass_cache_gb >= 0 and math.isfinite(self.clean_pass_cache_gb)):
      raise ValueError(f'--clean-pass-cache-gb must be a finite number >= 0, '
                       f'got {self.clean_pass_cache_gb}')
    if self.checkpoint_every < 1:
      raise ValueError(f'--checkpoint-every must be >= 1, got {self.checkpoint_every}')
    if self.num_heatmap_examples < 0:
      raise ValueError(f'--num-heatmaps must be >= 0, got {self.num_heatmap_examples}')
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"--dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.layers is not None:
      object.__setattr__(self, 'layers', tuple(sorted(set(int(k) for k in self.layers))))
      if not self.layers or self.layers[0] < 0:
        raise ValueError(f'--layers must name depths >= 0, got {list(self.layers)}')
    if self.validation_sentences < 0:
      raise ValueError(f'--validation-sentences must be >= 0, got {self.validation_sentences}')
    if self.validation_sentences and self.task != 'sst':
      raise ValueError('--validation-sentences is only offered for sst')
    if self.select_agreement is not None:
      if not 0.0 <= self.select_agreement <= 1.0:
        raise ValueError(f'--select-agreement must lie in [0, 1], got {self.select_agreement}')
      if not self.validation_sentences:
        raise ValueError('--select-agreement needs held-out sentences: pass '
                         '--validation-sentences N')
    if self.validate_every is not None:
      if self.validate_every < 1:
        raise ValueError(f'--validate-every must be >= 1, got {self.validate_every}')
      if not self.validation_sentences:
        raise ValueError('--validate-every needs held-out sentences: pass '
                         '--validation-sentences N')

  def diffmask_config(self) -> train.DiffMaskConfig:
    """The trainer's settings: the paper's rates, this run's gate, margin and warm-up."""
    return train.DiffMaskConfig(gate=self.gate, margin=self.margin,
                                divergence_tail=self.divergence_tail,
                                flip_penalty=self.flip_penalty, sparsity=self.sparsity,
                                relaxation=self.relaxation, warmup_steps=self.warmup_steps,
                                probe_learning_rate=self.probe_learning_rate,
                                baseline_learning_rate=self.baseline_learning_rate,
                                layers=self.layers, probe_average_decay=self.probe_average_decay)


# ---------------------------------------------------------------------------
# Model and data


def load_frozen_model(config: TextDiffMaskConfig, log: Callable[[str], None] = print):
  """``(model, params, tokenizer)`` of ``config.model`` with the task's head.

  Raises ValueError (one line) for a missing folder, a checkpoint without
  trained head weights (unless ``allow_random_head``), a wrong label count or
  a missing tokenizer.
  """
  head = TASK_HEADS[config.task]
  if not Path(config.model).expanduser().is_dir():
    raise ValueError(f'--model {config.model}: model folder does not exist')
  # a random head (smoke tests) gets SST-5's label count; a trained one keeps its own
  num_labels = sst_data.NUM_CLASSES if config.task == 'sst' and config.allow_random_head else None
  try:
    model, params, tokenizer = load_pretrained(config.model, head=head, num_labels=num_labels,
                                               dtype=config.dtype, seed=config.seed,
                                               random_head=config.allow_random_head)
  except MissingHeadError as error:
    raise ValueError(f'--model {config.model}: {error} (or pass --allow-random-head for a '
                     'smoke test)') from None
  if tokenizer is None or not getattr(tokenizer, 'is_fast', False):
    raise ValueError(f'--model {config.model}: the folder needs a fast tokenizer '
                     '(tokenizer.json or vocab.txt)')
  if config.task == 'sst' and model.config.num_labels != sst_data.NUM_CLASSES:
    raise ValueError(f'--model {config.model}: the classifier has {model.config.num_labels} '
                     f'labels; SST-5 needs {sst_data.NUM_CLASSES}')
  if config.max_length > model.config.max_sequence_length:
    raise ValueError(f'--max-length {config.max_length} exceeds the model limit of '
                     f'{model.config.max_sequence_length} tokens')
  if tokenizer.mask_token_id is None and config.gate == 'input':
    raise ValueError(f'--model {config.model}: the tokenizer has no [MASK] token for the '
                     'input-gate baseline')
  return model, params, tokenizer


def _first(examples: list, limit: int | None) -> list:
  return examples if limit is None else examples[:limit]


def load_task_data(config: TextDiffMaskConfig, tokenizer):
  """``(train_features, eval_examples, eval_features)`` for the task.

  Raises ValueError when a split is missing or malformed.
  """
  try:
    if config.task == 'sst':
      train_examples = sst_data.load_sst(config.train_split, config.data_dir,
                                         limit=config.max_train_examples)
      eval_examples = sst_data.load_sst(config.eval_split, config.data_dir,
                                        limit=config.max_eval_examples)
    else:
      train_examples = _first(squad_data.load_squad(config.train_split, config.data_dir),
                              config.max_train_examples)
      eval_examples = _first(squad_data.load_squad(config.eval_split, config.data_dir),
                             config.max_eval_examples)
  except FileNotFoundError as error:
    hint = (' (only the dev file ships here: pass --train-split dev for a smoke test)'
            if config.task == 'squad' and config.train_split == 'train' else '')
    raise ValueError(f'{error}{hint}') from None
  if config.task == 'sst':
    encode = lambda examples: sst_data.encode_sst(examples, tokenizer, config.max_length)
  else:
    encode = lambda examples: squad_data.encode_squad(examples, tokenizer, config.max_length)
  return encode(train_examples), eval_examples, encode(eval_examples)


def hold_out(features, count: int):
  """``(training, held_out)`` features: ``count`` sequences drawn by :data:`VALIDATION_SEED`.

  Both parts keep the split's order. Raises ValueError when nothing would be
  left to train on.
  """
  if count >= len(features):
    raise ValueError(f'--validation-sentences {count} leaves no training sentences (the '
                     f'training split has {len(features)})')
  order = np.random.default_rng(VALIDATION_SEED).permutation(len(features))
  return features.take(np.sort(order[count:])), features.take(np.sort(order[:count]))


def mask_token_baseline(params, tokenizer) -> jax.Array:
  """The ``(hidden,)`` word embedding of ``[MASK]``: the input-gate baseline's start."""
  return params['embeddings']['word_embeddings']['embedding'][tokenizer.mask_token_id]


def initial_baselines(config: TextDiffMaskConfig, model: BertModel, frozen_params, tokenizer,
                      first_batch: dict) -> tuple[jax.Array, ...]:
  """Where training starts the probe's baselines: ``(dim_k,)`` vectors for ``probes.set_baselines``.

  Input gates start at the ``[MASK]`` embedding; hidden gates at zeros (``()``:
  the probe's own initialisation), or with ``config.hidden_baseline_init ==
  'mean_state'`` at :func:`mean_clean_states` of ``first_batch``, or with
  ``'mask_at_h0'`` the word-embedding state h0 at ``[MASK]`` (what the input
  gate replaces a word with; the original does this when it trains depth 0
  alone) and the other depths at zeros. ``dmx diffmask`` and ``dmx sweep``
  both start from here.
  """
  if config.gate == 'input' or config.hidden_baseline_init == 'mask_at_h0':
    return (mask_token_baseline(frozen_params, tokenizer),)
  if config.hidden_baseline_init == 'mean_state':
    return mean_clean_states(model, frozen_params, first_batch)
  return ()


def mean_clean_states(model: BertModel, frozen_params, batch: dict) -> tuple[jax.Array, ...]:
  """Each depth's clean state averaged over the batch's real tokens: ``(dim_k,)`` per state.

  The clean pass is :func:`dmx.train.clean_pass` (the batch's cached one when it has it).
  """
  _, states = jax.jit(lambda frozen, batch: train.clean_pass(model, frozen, batch))(
      frozen_params, batch)
  weights = jnp.asarray(batch['mask'], jnp.float32)[..., None]  # (batch, seq, 1)
  count = jnp.maximum(weights.sum(), 1.0)
  return tuple((jnp.asarray(state, jnp.float32) * weights).sum(axis=(0, 1)) / count
               for state in states)


def state_names(num_states: int) -> list[str]:
  """Display names of the depths: ``h0 words``, ``h1 embed``, ``h2 L1`` ... (bottom first)."""
  return ['h0 words', 'h1 embed'] + [f'h{k} L{k - 1}' for k in range(2, num_states)]


def training_buckets(config: TextDiffMaskConfig, model: BertModel, frozen_params, features,
                     batch_size: int, log: Callable[[str], None] = print,
                     progress: bool = True) -> list[dict]:
  """The training set in length buckets, with the cached clean pass when it fits.

  Sequences are grouped into buckets of similar length (``config.bucket_width``)
  and each bucket is cut to its length, so short sentences do not pay for the
  longest one. When the clean pass over the whole training set fits in
  ``config.clean_pass_cache_gb``, it is computed once here and every bucket
  carries it (``clean_outputs``, ``clean_states``; see :func:`dmx.train.clean_pass`).
  :func:`dmx.data.common.bucketed_batches` draws the training batches from them;
  probes trained on the same data can share one list.
  """
  buckets = length_buckets(features.mask.sum(axis=1), batch_size, config.bucket_width,
                           features.mask.shape[1])
  bucket_batches = []
  for length, indices in buckets:
    batch = features.take(indices).as_batch()
    bucket_batches.append({name: value[:, :length] for name, value in batch.items()})
  cache_bytes = sum(len(indices) * length * sum(model.state_dims) * 4
                    for length, indices in buckets)
  lengths = ', '.join(f'{length}: {len(indices)}' for length, indices in buckets)
  log(f'training buckets (padded length: sequences) {lengths}')
  if cache_bytes > config.clean_pass_cache_gb * 1e9:
    log(f'clean pass not cached ({cache_bytes / 1e9:.1f} GB > --clean-pass-cache-gb '
        f'{config.clean_pass_cache_gb}): computed in every step')
    return bucket_batches
  log(f'caching the clean pass over the training set ({cache_bytes / 1e9:.2f} GB)')
  forward = jax.jit(model.forward)
  total = sum(len(indices) for _, indices in buckets)
  with tqdm(total=total, desc='clean pass', disable=not progress, unit='seq') as bar:
    for bucket in bucket_batches:
      outputs, states = [], []
      for rows, count in padded_index_batches(len(bucket['mask']), batch_size):
        chunk = {name: value[rows] for name, value in bucket.items()}
        chunk_outputs, chunk_states = jax.device_get(forward(frozen_params, chunk))
        outputs.append(chunk_outputs[:count])
        states.append([state[:count] for state in chunk_states])
        bar.update(count)
      bucket['clean_outputs'] = np.concatenate(outputs)
      bucket['clean_states'] = tuple(np.concatenate(parts) for parts in zip(*states))
  return bucket_batches


# ---------------------------------------------------------------------------
# Evaluation with the deterministic gates


def make_evaluator(model: BertModel, frozen_params, probe, dm_config: train.DiffMaskConfig,
                   depths: Sequence[int] | None = None):
  """A ``(probe_params, batch) -> dict`` of arrays for one batch (jitted, one compilation).

  The dict holds ``outputs`` ``(B, ...)``, ``masked_outputs`` ``(K, B, ...)``
  (the model rerun with the deterministic gates of each depth ``k``),
  ``keep_prob`` ``(K, B, S)``, ``closed`` ``(K, B, S)`` (real tokens whose gate
  is 0) and ``layers_kept`` ``(B, S)`` (depths whose gate is > 0). With
  ``depths``, ``masked_outputs`` and ``closed`` cover those depths only, in
  that order (one masked pass each instead of one per state).
  """
  num_states = len(model.state_dims)
  depths = jnp.arange(num_states) if depths is None else jnp.asarray(depths, jnp.int32)

  def evaluate(frozen, probe_params, batch):
    outputs, states = model.forward(frozen, batch)  # the one clean pass
    keep_prob, gates = attribute.keep_probs_and_gates(probe, probe_params, dm_config, states,
                                                      batch['mask'])
    baselines = probe.apply(probe_params, method='baseline_vectors')
    real = batch['mask'].astype(bool)[None]

    def masked_at(depth):
      return train.masked_pass(model, frozen, batch, states, dm_config.gate, gates[depth],
                               baselines, depth)

    masked_outputs = jax.lax.map(masked_at, depths)
    return dict(outputs=outputs, masked_outputs=masked_outputs, keep_prob=keep_prob,
                closed=(gates[depths] == 0) & real,
                layers_kept=jnp.sum(gates > 0, axis=0).astype(jnp.int32))

  compiled = jax.jit(evaluate)  # frozen parameters as an argument, not baked-in constants
  return lambda probe_params, batch: compiled(frozen_params, probe_params, batch)


def run_evaluation(evaluator, probe_params, features, batch_size: int) -> dict:
  """Runs ``evaluator`` over all of ``features``; arrays concatenated on the example axis."""
  parts = []
  for batch, count in padded_batches(features, batch_size):
    result = jax.device_get(evaluator(probe_params, batch))
    parts.append({name: (value[:, :count] if name in ('masked_outputs', 'keep_prob', 'closed')
                         else value[:count]) for name, value in result.items()})
  return {name: np.concatenate([part[name] for part in parts],
                               axis=1 if name in ('masked_outputs', 'keep_prob', 'closed') else 0)
          for name in parts[0]}


def summary_depths(gate: str, num_states: int,
                   layers: Sequence[int] | None = None) -> list[int]:
  """The depths the headline numbers are taken at.

  Input gates: the deepest trained depth (the input mask from the votes of
  every layer up to it); hidden gates: every trained depth, averaged.
  ``layers`` are the trained depths (:attr:`dmx.train.DiffMaskConfig.layers`,
  ``None`` for all): untrained probes score nothing meaningful.
  """
  trained = sorted(set(layers)) if layers is not None else list(range(num_states))
  return [trained[-1]] if gate == 'input' else trained


def _summary_depth(gate: str, num_states: int, layers: Sequence[int] | None = None) -> str | int:
  depths = summary_depths(gate, num_states, layers)
  return depths[0] if gate == 'input' else ('mean' if layers is None else f'mean over {depths}')


def _at_summary(per_layer: Sequence[dict], name: str, depths: Sequence[int]) -> float:
  """The headline value of ``name``: its mean over the summary ``depths``."""
  return float(np.mean([per_layer[depth][name] for depth in depths]))


def _summary_note(gate: str, num_states: int, layers: Sequence[int] | None = None) -> str:
  depths = summary_depths(gate, num_states, layers)
  if gate == 'input':
    which = 'deepest' if layers is None else 'deepest trained'
    return (f'input gates: headline numbers at the {which} depth h{depths[0]} (the input '
            'mask from the votes of every layer up to it); masked_fraction = fraction of real '
            'input tokens masked')
  which = 'every depth' if layers is None else f'the trained depths {depths}'
  return (f'hidden gates: headline numbers are the mean over {which}, each depth masked on '
          'its own; masked_fraction = fraction of real hidden states masked')


def sst_scores(result: dict, features: sst_data.SstFeatures, gate: str,
               layers: Sequence[int] | None = None) -> dict:
  """Masked fractions, agreement and macro-F1 (all in [0, 1]) per depth and at the summary depth.

  ``layers``: the depths the probe was trained at
  (:attr:`dmx.train.DiffMaskConfig.layers`, ``None`` for all); the summary is
  taken at :func:`summary_depths`.
  """
  real_tokens = features.mask.sum()
  original = result['outputs'].argmax(-1)
  masked = result['masked_outputs'].argmax(-1)  # (K, N)
  labels = features.labels
  per_layer = []
  for depth in range(masked.shape[0]):
    per_layer.append(dict(
        masked_fraction=float(result['closed'][depth].sum() / real_tokens),
        agreement=float(np.mean(masked[depth] == original)),
        macro_f1_masked=metrics.macro_f1(labels, masked[depth], sst_data.NUM_CLASSES),
        mean_keep_prob=float(result['keep_prob'][depth].sum() / real_tokens)))
  depths = summary_depths(gate, len(per_layer), layers)
  pick = lambda name: _at_summary(per_layer, name, depths)
  return dict(masked_fraction=pick('masked_fraction'), agreement=pick('agreement'),
              macro_f1_original=metrics.macro_f1(labels, original, sst_data.NUM_CLASSES),
              macro_f1_masked=pick('macro_f1_masked'), mean_keep_prob=pick('mean_keep_prob'),
              accuracy_original=float(np.mean(original == labels)),
              per_layer=per_layer)


def layers_by_sentiment(result: dict, features: sst_data.SstFeatures,
                        layers: Sequence[int] | None = None) -> dict:
  """Figure 8b: mean number of depths that keep a wordpiece, by its word's sentiment label.

  A wordpiece inherits the label of its word (leaf); special tokens are left
  out. ``layers_kept`` counts depths whose deterministic gate is > 0,
  ``expected_layers_kept`` sums the keep probabilities, both over the trained
  ``layers`` (``None``: every depth; an untrained depth keeps everything and
  would only add a constant). Labels without any token get NaN means and count 0.
  """
  rows, cols = np.nonzero(features.word_ids >= 0)
  token_labels = features.word_labels[rows, features.word_ids[rows, cols]]
  if layers is None:
    kept = result['layers_kept'][rows, cols].astype(np.float64)
    expected = result['keep_prob'][:, rows, cols].sum(axis=0).astype(np.float64)
  else:
    depths = sorted(set(int(k) for k in layers))
    kept = (~result['closed'][depths][:, rows, cols]).sum(axis=0).astype(np.float64)
    expected = result['keep_prob'][depths][:, rows, cols].sum(axis=0).astype(np.float64)
  out = dict(labels=list(range(sst_data.NUM_CLASSES)), label_names=list(sst_data.LABEL_NAMES),
             depths=None if layers is None else depths,
             num_tokens=[], layers_kept=[], layers_kept_sem=[], expected_layers_kept=[])
  for label in range(sst_data.NUM_CLASSES):
    chosen = token_labels == label
    count = int(chosen.sum())
    out['num_tokens'].append(count)
    out['layers_kept'].append(float(kept[chosen].mean()) if count else float('nan'))
    out['layers_kept_sem'].append(float(kept[chosen].std() / np.sqrt(count)) if count > 1 else 0.0)
    out['expected_layers_kept'].append(float(expected[chosen].mean()) if count else float('nan'))
  return out


def squad_scores(result: dict, features: squad_data.SquadFeatures, examples, gate: str,
                 layers: Sequence[int] | None = None) -> dict:
  """Start/end agreement per window, EM/F1 original vs masked, per depth and at the summary.

  ``layers``: the trained depths, as in :func:`sst_scores`.
  """
  outputs, masked_outputs = result['outputs'], result['masked_outputs']
  original = squad_data.evaluate(
      squad_data.best_spans(outputs[:, 0], outputs[:, 1], features), examples)
  original_argmax = outputs.argmax(-1)  # (F, 2)
  real_tokens = features.mask.sum()
  per_layer = []
  for depth in range(masked_outputs.shape[0]):
    masked = masked_outputs[depth]
    same = masked.argmax(-1) == original_argmax
    scores = squad_data.evaluate(squad_data.best_spans(masked[:, 0], masked[:, 1], features),
                                 examples)
    per_layer.append(dict(
        masked_fraction=float(result['closed'][depth].sum() / real_tokens),
        agreement=float(np.mean(same.all(-1))), start_agreement=float(np.mean(same[:, 0])),
        end_agreement=float(np.mean(same[:, 1])), exact_match_masked=scores['exact_match'],
        f1_masked=scores['f1'],
        mean_keep_prob=float(result['keep_prob'][depth].sum() / real_tokens)))
  depths = summary_depths(gate, len(per_layer), layers)
  pick = lambda name: _at_summary(per_layer, name, depths)
  return dict(masked_fraction=pick('masked_fraction'), agreement=pick('agreement'),
              start_agreement=pick('start_agreement'), end_agreement=pick('end_agreement'),
              exact_match_original=original['exact_match'], f1_original=original['f1'],
              exact_match_masked=pick('exact_match_masked'), f1_masked=pick('f1_masked'),
              per_layer=per_layer)


# ---------------------------------------------------------------------------
# Files: keep probabilities and figures


def save_keep_probabilities(path: Path, result: dict, features, names: Sequence[str]) -> None:
  """Writes ``keep_prob`` float16 ``(K, N, S)`` and the inputs needed to read it (npz)."""
  arrays = dict(keep_prob=result['keep_prob'].astype(np.float16),
                layers_kept=result['layers_kept'].astype(np.int8),
                input_ids=features.input_ids, mask=features.mask,
                token_type_ids=features.token_type_ids, state_names=np.array(names),
                predictions=result['outputs'].argmax(-1).astype(np.int32),
                masked_predictions=result['masked_outputs'].argmax(-1).astype(np.int32))
  if isinstance(features, sst_data.SstFeatures):
    arrays.update(word_ids=features.word_ids, word_labels=features.word_labels,
                  labels=features.labels)
  else:
    arrays.update(example_index=features.example_index, context_mask=features.context_mask,
                  example_ids=np.array(features.example_ids))
  np.savez_compressed(path, **arrays)


def _draw_heatmap(path: Path, keep_prob: np.ndarray, tokens: list[str], names: Sequence[str],
                  title: str, suptitle: str) -> None:
  fig = viz.keep_probability_heatmaps(keep_prob[:, None, :len(tokens)], [tokens], names, [title],
                                      suptitle=suptitle)
  viz.save_figure(fig, path)


def write_sst_heatmaps(out_dir: Path, result: dict, features: sst_data.SstFeatures, tokenizer,
                       names: Sequence[str], gate: str, count: int) -> list[str]:
  """One tokens x depths heatmap per sentence (the first ``count``): ``heatmap_<gate>_<i>.png``."""
  files = []
  what = 'input tokens' if gate == 'input' else 'hidden states'
  for index in range(min(count, len(features))):
    length = int(features.mask[index].sum())
    tokens = tokenizer.convert_ids_to_tokens(features.input_ids[index, :length].tolist())
    predicted = int(result['outputs'][index].argmax())
    title = f'sentence {index}: gold {features.labels[index]}, predicted {predicted}'
    path = out_dir / f'heatmap_{gate}_{index}.png'
    _draw_heatmap(path, result['keep_prob'][:, index], tokens, names, title,
                  f'DiffMask {gate} gates: keep probability of {what} at each depth')
    files.append(path.name)
  return files


def write_squad_heatmaps(out_dir: Path, result: dict, features: squad_data.SquadFeatures,
                         tokenizer, names: Sequence[str], gate: str, count: int,
                         context_margin: int = 12) -> list[str]:
  """Heatmaps of the first ``count`` windows: the question and the context around the answer.

  Columns are the question tokens (with ``[CLS]``/``[SEP]``) and the context tokens
  within ``context_margin`` of the predicted span; the span's tokens end in ``*``.
  """
  files = []
  what = 'input tokens' if gate == 'input' else 'hidden states'
  starts, ends, _ = squad_data.best_span_indices(result['outputs'][:, 0], result['outputs'][:, 1],
                                                 features.context_mask)
  for index in range(min(count, len(features))):
    context = np.flatnonzero(features.context_mask[index])
    question = np.arange(context[0] if context.size else int(features.mask[index].sum()))
    lo, hi = max(starts[index] - context_margin, 0), ends[index] + context_margin + 1
    context = context[(context >= lo) & (context < hi)]
    positions = np.concatenate([question, context])
    tokens = tokenizer.convert_ids_to_tokens(features.input_ids[index, positions].tolist())
    tokens = [token + ('*' if starts[index] <= p <= ends[index] else '')
              for token, p in zip(tokens, positions)]
    title = f'window {index} (question {features.example_index[index]}), * = predicted answer'
    path = out_dir / f'heatmap_{gate}_{index}.png'
    _draw_heatmap(path, result['keep_prob'][:, index][:, positions], tokens, names, title,
                  f'DiffMask {gate} gates: keep probability of {what} at each depth')
    files.append(path.name)
  return files


def write_sentiment_figure(path: Path, aggregate: dict, gate: str, num_states: int) -> None:
  """Figure 8b: bars of the mean number of depths keeping a token, per sentiment label."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  means = np.nan_to_num(np.array(aggregate['layers_kept'], np.float64))
  ax.bar(aggregate['labels'], means, yerr=aggregate['layers_kept_sem'], color='tab:blue',
         alpha=0.8, capsize=3, label='gate > 0 (deterministic)')
  ax.plot(aggregate['labels'], aggregate['expected_layers_kept'], 'o-', color='tab:orange',
          label='sum of keep probabilities')
  ax.set_xticks(aggregate['labels'], [f'{k}\n{name}' for k, name in
                                      zip(aggregate['labels'], aggregate['label_names'])],
                fontsize=8)
  ax.set_ylim(0, num_states * 1.08)
  ax.set_xlabel('sentiment label of the token\'s word')
  trained = '' if aggregate.get('depths') is None else ' trained'
  ax.set_ylabel(f'mean number of{trained} depths keeping it (of {num_states})')
  ax.set_title(f'DiffMask {gate} gates: depths that keep a token, by sentiment', fontsize=10)
  ax.legend(fontsize=8)
  viz.save_figure(fig, path)


# ---------------------------------------------------------------------------
# The pipeline


class TrainedProbe(NamedTuple):
  """What :func:`train_probe` returns: the probe module, its trainer settings and final state.

  ``probe_params`` are the parameters to report: the final state's, or the
  selected ones (:class:`ProbeSelection`), whose step is ``selected_step``.
  """
  probe: probes.DiffMaskProbe
  config: train.DiffMaskConfig
  initial_probe_params: Any
  state: train.DiffMaskState
  history: list
  seconds: float
  probe_params: Any = None
  selected_step: int | None = None


HEADLINE_SCORES = ('masked_fraction', 'agreement', 'macro_f1_masked')


def make_headline_scorer(config: TextDiffMaskConfig, model: BertModel, frozen_params, probe,
                         dm_config: train.DiffMaskConfig):
  """A ``(probe_params, features) -> dict`` of the SST headline scores (:data:`HEADLINE_SCORES`).

  The same numbers :func:`sst_scores` gives at the summary depths, from one
  masked pass per summary depth instead of one per state.
  """
  depths = summary_depths(config.gate, len(model.state_dims), config.layers)
  evaluator = make_evaluator(model, frozen_params, probe, dm_config, depths)

  def score(probe_params, features) -> dict:
    result = run_evaluation(evaluator, probe_params, features, config.eval_batch_size)
    # the evaluator masks the summary depths only: their summary is the one over all it returns
    scores = sst_scores(result, features, config.gate, layers=None)
    return {name: scores[name] for name in HEADLINE_SCORES}

  return score


def selection_rank(scores: dict, agreement_bar: float) -> tuple[bool, float]:
  """Orders held-out ``scores``: at or above ``agreement_bar`` first, by masking; else by agreement."""
  meets = scores['agreement'] >= agreement_bar
  return meets, scores['masked_fraction'] if meets else scores['agreement']


class ProbeSelection:
  """Scores the probe on held-out SST sentences during training and keeps the best one.

  An instance is the ``validate`` hook of :func:`dmx.train.fit`. Each call
  scores the probe's deterministic gates on the held-out features with
  ``scorer`` (:func:`make_headline_scorer`: as the evaluation split is
  scored) and returns ``masked_fraction``, ``agreement``,
  ``macro_f1_masked`` and ``step``. With an ``agreement_bar``, a probe replaces the kept one when it
  ranks higher: any probe at or above the bar ranks above every probe below
  it; above the bar more masking ranks higher, below it more agreement
  (:func:`selection_rank`; ties keep the earlier probe). The kept probe is saved to
  ``out_dir/selected_probe`` at once, so a resumed run continues the
  selection where the interrupted one left it.
  """

  def __init__(self, agreement_bar: float | None, scorer, features, out_dir: Path,
               log: Callable[[str], None] = print):
    self.scorer = scorer
    self.features = features
    self.path = Path(out_dir) / SELECTED_CHECKPOINT
    self.agreement_bar = agreement_bar
    self.log = log
    self.best: dict | None = None
    if checkpoint.exists(self.path):
      if checkpoint.exists(Path(out_dir) / TRAIN_CHECKPOINT):
        self.best = checkpoint.read_metadata(self.path)['validation']
      else:  # left by another run in this folder: the training starts afresh, so does this
        log(f'{self.path} has no train checkpoint beside it: starting the selection afresh')
        shutil.rmtree(self.path)

  def __call__(self, state: train.DiffMaskState) -> dict:
    scores = dict(self.scorer(state.probe_params, self.features), step=int(state.step))
    if self.agreement_bar is not None and (
        self.best is None or selection_rank(scores, self.agreement_bar)
        > selection_rank(self.best, self.agreement_bar)):
      checkpoint.save(self.path, jax.device_get(state.probe_params),
                      dict(validation=scores, agreement_bar=self.agreement_bar))
      self.best = scores
    self.log(f"held-out step {scores['step']}: masked {scores['masked_fraction']:.3f}, "
             f"agreement {scores['agreement']:.3f}"
             + ('' if self.best is None else f" (kept: step {self.best['step']})"))
    return scores

  @property
  def meets_bar(self) -> bool:
    return self.best is not None and self.best['agreement'] >= self.agreement_bar

  def selected_params(self, template):
    """The kept probe's parameters (``template``: any probe parameters of the same shapes)."""
    return checkpoint.restore(self.path, template)


def make_probe(config: TextDiffMaskConfig, model: BertModel) -> probes.DiffMaskProbe:
  """The run's probe: one vote per state, the original's width (hidden size / 4) by default."""
  state_dims = tuple(model.state_dims)
  return probes.DiffMaskProbe(gate=config.gate, state_dims=state_dims, form=config.probe_form,
                              hidden_size=config.probe_hidden_size or max(state_dims[0] // 4, 1),
                              weight_norm=config.probe_weight_norm)


def train_probe(config: TextDiffMaskConfig, model: BertModel, frozen_params, tokenizer,
                train_features, batch_size: int, out_dir: Path, progress: bool = True,
                log: Callable[[str], None] = print,
                dm_config: train.DiffMaskConfig | None = None,
                buckets: list[dict] | None = None,
                selection: ProbeSelection | None = None) -> TrainedProbe:
  """Trains the run's probe (resuming ``out_dir/train_checkpoint``) and saves ``probe_<gate>/``.

  ``dm_config`` replaces ``config.diffmask_config()`` (settings the command
  line does not offer, such as a relaxation's own parameters). ``buckets``:
  :func:`training_buckets` of ``train_features`` already computed (for several
  probes on the same data); computed here when ``None``. ``selection``
  scores the probe on held-out sentences every ``config.validate_every``
  steps; with ``config.select_agreement`` its kept probe is the one saved
  and returned.
  """
  dm_config = config.diffmask_config() if dm_config is None else dm_config
  state_dims = tuple(model.state_dims)
  probe = make_probe(config, model)
  hidden_size = probe.hidden_size
  if buckets is None:
    buckets = training_buckets(config, model, frozen_params, train_features, batch_size, log,
                               progress)
  batches = bucketed_batches(buckets, batch_size, config.seed)
  probe_key, run_key = jax.random.split(jax.random.key(config.seed))
  # frozen parameters go in as arguments: closed over, jit would bake them in as constants
  init_probe = jax.jit(lambda frozen, key, batch: train.init_probe_params(key, model, probe, frozen,
                                                                          batch))
  first_batch = next(batches)
  probe_params = probes.set_baselines(
      init_probe(frozen_params, probe_key, first_batch),
      initial_baselines(config, model, frozen_params, tokenizer, first_batch))
  initial_probe_params = probe_params
  state = train.init_state(dm_config, probe_params, len(state_dims))
  train_started = time.time()
  description = f'diffmask {config.task} {config.gate}'
  if config.relaxation != 'hard_concrete':
    description += f' {config.relaxation}'
  state, history = train.fit(model, frozen_params, probe, dm_config, state, batches, config.steps,
                             run_key, progress=progress, description=description,
                             log_every=min(500, max(config.steps // 20, 50)),
                             checkpoint_dir=out_dir / TRAIN_CHECKPOINT,
                             checkpoint_every=config.checkpoint_every,
                             run_info=resume_fingerprint(config),
                             retired_run_info=TRAINER_CHECKED_FIELDS, validate=selection,
                             validate_every=config.validate_every)
  jax.block_until_ready(state.params)
  probe_params, selected_step = state.probe_params, None
  if selection is not None and selection.best is not None:
    probe_params = selection.selected_params(state.probe_params)
    selected_step = selection.best['step']
  # the history's clock counts earlier invocations of a resumed run too (checkpoints
  # written before the history had a clock: this invocation's time only)
  seconds = (history[-1]['seconds'] if history and 'seconds' in history[-1]
             else time.time() - train_started)
  checkpoint.save(out_dir / f'probe_{config.gate}', probe_params, dict(
      task=config.task, gate=config.gate, form=config.probe_form, hidden_size=hidden_size,
      weight_norm=probe.weight_norm, initial_logit=probe.initial_logit, state_dims=list(state_dims),
      model=str(Path(config.model).expanduser().absolute()), head=TASK_HEADS[config.task],
      max_length=config.max_length, steps=int(state.step), selected_step=selected_step,
      diffmask_config=jsonable(dataclasses.asdict(dm_config))))
  return TrainedProbe(probe, dm_config, initial_probe_params, state, history, seconds,
                      probe_params, selected_step)


def run_text_diffmask(config: TextDiffMaskConfig, out_dir: str | Path, *, progress: bool = True,
                      log: Callable[[str], None] = print) -> dict:
  """Trains and evaluates one DiffMask probe on SST or SQuAD; writes everything to ``out_dir``.

  Writes ``report.json``, ``keep_prob.npz``, ``heatmap_<gate>_<i>.png``, for
  SST ``layers_by_sentiment_<gate>.png``, and the probe checkpoint
  ``probe_<gate>/`` (its metadata holds the probe config and the model path).
  Returns the report.
  """
  out_dir = Path(out_dir)
  started = time.time()
  model, frozen_params, tokenizer = load_frozen_model(config, log)
  train_features, eval_examples, eval_features = load_task_data(config, tokenizer)
  held_out = None
  if config.validation_sentences:
    train_features, held_out = hold_out(train_features, config.validation_sentences)
    log(f'{len(held_out)} training sentences held out to score the probe on')
  batch_size = config.batch_size
  if len(train_features) < batch_size:
    log(f'only {len(train_features)} training sequences: batch size {batch_size} -> '
        f'{len(train_features)}')
    batch_size = len(train_features)
  out_dir.mkdir(parents=True, exist_ok=True)
  log(f'{config.task}: {len(train_features)} training and {len(eval_features)} evaluation '
      f'sequences of {config.max_length} tokens; {model.config.num_states} states')

  dm_config = config.diffmask_config()
  probe = make_probe(config, model)
  evaluator = make_evaluator(model, frozen_params, probe, dm_config)
  scorer = selection = None
  if held_out is not None:
    scorer = make_headline_scorer(config, model, frozen_params, probe, dm_config)
    selection = ProbeSelection(config.select_agreement, scorer, held_out, out_dir, log)
  trained = train_probe(config, model, frozen_params, tokenizer, train_features, batch_size,
                        out_dir, progress, log, dm_config=dm_config, selection=selection)
  state, history = trained.state, trained.history
  state_dims = tuple(model.state_dims)

  eval_started = time.time()
  result = run_evaluation(evaluator, trained.probe_params, eval_features, config.eval_batch_size)
  last_iterate = None
  if config.probe_average_decay > 0 and config.task == 'sst':
    # the same run's last iterate, scored the same way: what the averaging changed
    last_scorer = scorer or make_headline_scorer(config, model, frozen_params, probe, dm_config)
    last_iterate = last_scorer(state.last_iterate_params, eval_features)
  eval_seconds = time.time() - eval_started
  names = state_names(len(state_dims))
  save_keep_probabilities(out_dir / KEEP_PROB_FILE, result, eval_features, names)
  if config.task == 'sst':
    scores = sst_scores(result, eval_features, config.gate, config.layers)
    figures = write_sst_heatmaps(out_dir, result, eval_features, tokenizer, names, config.gate,
                                 config.num_heatmap_examples)
    aggregate = layers_by_sentiment(result, eval_features, config.layers)
    sentiment_figure = f'layers_by_sentiment_{config.gate}.png'
    write_sentiment_figure(out_dir / sentiment_figure, aggregate, config.gate,
                           len(aggregate['depths'] or state_dims))
    figures.append(sentiment_figure)
    scores['layers_by_sentiment'] = aggregate
  else:
    scores = squad_scores(result, eval_features, eval_examples, config.gate, config.layers)
    figures = write_squad_heatmaps(out_dir, result, eval_features, tokenizer, names, config.gate,
                                   config.num_heatmap_examples)
  for depth, layer in enumerate(scores['per_layer']):
    layer.update(state=names[depth],
                 multiplier=float(state.lagrange_multipliers[depth]),
                 train_steps=int(state.running_steps[depth]),
                 running_agreement=float(state.running_agreement[depth]),
                 running_keep_fraction=float(state.running_l0[depth]))

  report = {
      'task': config.task,
      'gate': config.gate,
      'summary_depth': _summary_depth(config.gate, len(state_dims), config.layers),
      'summary_note': _summary_note(config.gate, len(state_dims), config.layers),
      **scores,
      'config': jsonable(dataclasses.asdict(config)),
      'diffmask_config': jsonable(dataclasses.asdict(dm_config)),
      'data': {'train_split': config.train_split, 'eval_split': config.eval_split,
               'num_train_sequences': len(train_features),
               'num_eval_examples': len(eval_examples),
               'num_eval_sequences': len(eval_features), 'batch_size': batch_size,
               'max_length': config.max_length},
      'model': {'path': config.model, 'num_states': len(state_dims),
                'hidden_size': state_dims[0], 'num_layers': model.config.num_layers},
      'files': {'keep_prob': KEEP_PROB_FILE, 'probe_checkpoint': f'probe_{config.gate}',
                'figures': figures},
      'selection': (None if selection is None else selection_report(
          config, selection, trained, history, scorer, eval_features)),
      'training': history,
      'timing': {'train_seconds': trained.seconds,
                 'steps_per_second': config.steps / trained.seconds if config.steps else None,
                 'eval_seconds': eval_seconds, 'total_seconds': time.time() - started},
  }
  if last_iterate is not None:
    report['last_iterate'] = last_iterate
  if selection is not None:
    write_validation_figure(out_dir / f'validation_{config.gate}.png', history,
                            config.select_agreement, trained.selected_step)
    report['files']['figures'].append(f'validation_{config.gate}.png')
  (out_dir / REPORT_FILE).write_text(json.dumps(jsonable(report), indent=2))
  log(format_summary(report))
  return report


def selection_report(config: TextDiffMaskConfig, selection: ProbeSelection, trained: TrainedProbe,
                     history: list[dict], scorer, eval_features) -> dict:
  """The report's ``selection``: the held-out scores, the kept step, and the final iterate.

  ``final_iterate`` scores the last step's probe on the evaluation split, so
  that the selection's effect can be read off (the headline numbers are the
  kept probe's); it is absent when the kept probe is the last one. With
  ``--probe-average-decay`` every probe scored here is an iterate average.
  """
  validations = [entry['validation'] for entry in history if 'validation' in entry]
  block = dict(validation_sentences=config.validation_sentences,
               select_agreement=config.select_agreement,
               validate_every=config.validate_every or config.checkpoint_every,
               selected_step=trained.selected_step,
               final_step=int(trained.state.step),
               selected_validation=selection.best,
               final_validation=validations[-1] if validations else None)
  if config.select_agreement is None:
    return block
  block['meets_bar'] = selection.meets_bar
  if trained.selected_step is not None and trained.selected_step != int(trained.state.step):
    block['final_iterate'] = scorer(trained.state.probe_params, eval_features)
  return block


def write_validation_figure(path: Path, history: list[dict], agreement_bar: float | None,
                            selected_step: int | None) -> None:
  """Held-out masked fraction and agreement against the training step, the kept step marked."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  entries = [entry['validation'] for entry in history if 'validation' in entry]
  steps = [entry['step'] for entry in entries]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot(steps, [entry['masked_fraction'] for entry in entries], 'o-', label='masked fraction')
  ax.plot(steps, [entry['agreement'] for entry in entries], 's-', label='agreement')
  if agreement_bar is not None:
    ax.axhline(agreement_bar, color='tab:orange', ls=':', lw=1, label='agreement bar')
  if selected_step is not None:
    ax.axvline(selected_step, color='gray', ls='--', lw=1, label=f'kept: step {selected_step}')
  ax.set_ylim(0, 1.02)
  ax.set_xlabel('training step')
  ax.set_ylabel('on the held-out training sentences')
  ax.set_title('DiffMask probe on held-out sentences during training', fontsize=10)
  ax.legend(fontsize=8)
  viz.save_figure(fig, path)


# options that only change the evaluation: a resumed run may change them
EVAL_ONLY_FIELDS = ('eval_split', 'eval_batch_size', 'max_eval_examples', 'num_heatmap_examples',
                    'checkpoint_every', 'clean_pass_cache_gb')
# options a resumed run may change because the trainer checks them itself:
# more steps continue a run (dmx.train.resume_checkpoint), fewer are refused.
# Checkpoints written before they left the fingerprint still carry them.
TRAINER_CHECKED_FIELDS = ('steps',)
# options the checkpoint's DiffMaskConfig already fingerprints, with defaults for
# checkpoints written before the option existed (dmx.train fills those in)
IN_DIFFMASK_CONFIG_FIELDS = ('relaxation', 'layers', 'divergence_tail', 'probe_average_decay',
                             'flip_penalty')
# options added after runs were checkpointed: left out of the fingerprint at
# their defaults, so those runs still resume; any other value is fingerprinted
FINGERPRINTED_UNLESS_DEFAULT = {'validation_sentences': 0, 'select_agreement': None,
                                'validate_every': None, 'hidden_baseline_init': 'zeros',
                                'probe_weight_norm': False}


def resume_fingerprint(config: TextDiffMaskConfig) -> dict:
  """The options a run resumed from ``train_checkpoint`` must share with the one that saved it."""
  fields = dataclasses.asdict(config)
  fields['model'] = str(Path(config.model).expanduser().absolute())
  return jsonable({name: value for name, value in fields.items()
                    if name not in EVAL_ONLY_FIELDS + IN_DIFFMASK_CONFIG_FIELDS
                    + TRAINER_CHECKED_FIELDS
                    and not (name in FINGERPRINTED_UNLESS_DEFAULT
                             and value == FINGERPRINTED_UNLESS_DEFAULT[name])})


def format_summary(report: dict) -> str:
  """A few lines: the headline numbers and where they were taken."""
  lines = [f"DiffMask {report['task']}, {report['summary_note']}",
           f"  masked fraction {report['masked_fraction']:.3f}, "
           f"agreement {report['agreement']:.3f}"]
  if report['task'] == 'sst':
    lines.append(f"  macro-F1 {report['macro_f1_original']:.3f} -> "
                 f"{report['macro_f1_masked']:.3f}")
    selection = report.get('selection')
    if selection and selection.get('selected_step') is not None:
      kept = selection['selected_validation']
      lines.append(f"  probe of step {selection['selected_step']} of {selection['final_step']}: "
                   f"held-out agreement {kept['agreement']:.3f}, masked "
                   f"{kept['masked_fraction']:.3f}"
                   + ('' if selection['meets_bar'] else
                      f" (no probe reached the bar {selection['select_agreement']})"))
    if 'last_iterate' in report:
      last = report['last_iterate']
      lines.append(f"  (the average of the iterates, decay "
                   f"{report['diffmask_config']['probe_average_decay']}; the last iterate: masked "
                   f"{last['masked_fraction']:.3f}, agreement {last['agreement']:.3f}, "
                   f"macro-F1 {last['macro_f1_masked']:.3f})")
  else:
    lines.append(f"  EM {report['exact_match_original']:.1f} -> "
                 f"{report['exact_match_masked']:.1f}, "
                 f"F1 {report['f1_original']:.1f} -> {report['f1_masked']:.1f}")
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Command-line adapter (``dmx diffmask sst|squad``)


def add_arguments(parser: argparse.ArgumentParser, task: str) -> None:
  """Adds the options of ``dmx diffmask <task>`` to ``parser``."""
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')
  defaults = TASK_DEFAULTS[task]
  what = 'SST-5 classifier' if task == 'sst' else 'SQuAD question-answering model'
  parser.add_argument('--model', required=True,
                      help=f'Hugging Face folder of the fine-tuned {what}')
  parser.add_argument('--gate', choices=probes.GATES, default='input',
                      help='input: mask input tokens; hidden: mask the hidden states of one layer')
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--data', default=None,
                      help=f'data folder holding {task}/ (default ../shared/data or $DMX_DATA_DIR)')
  parser.add_argument('--train-split', choices=TRAIN_SPLITS[task], default='train')
  parser.add_argument('--eval-split', choices=EVAL_SPLITS[task], default='dev')
  parser.add_argument('--steps', type=int, default=defaults['steps'],
                      help='DiffMask training steps')
  parser.add_argument('--batch-size', type=int, default=defaults['batch_size'])
  parser.add_argument('--eval-batch-size', type=int, default=defaults['eval_batch_size'])
  parser.add_argument('--max-length', type=int, default=defaults['max_length'],
                      help='tokens per sequence')
  parser.add_argument('--margin', type=float, default=defaults['margin'],
                      help='tolerated divergence (paper: SST 0.1, SQuAD 1)')
  parser.add_argument('--divergence-tail', type=float, default=1.0, metavar='FRACTION',
                      help='bound the mean divergence of the worst FRACTION of each batch '
                           '(default 1: the batch mean, as in the paper)')
  parser.add_argument('--flip-penalty', type=float, default=0.0, metavar='WEIGHT',
                      help='add WEIGHT times the log-probability ratio by which a masked pass '
                           'beats the clean prediction to the constrained divergence, so that '
                           'near-ties cannot flip for free (default 0: the paper\'s objective)')
  parser.add_argument('--probe-average-decay', type=float, default=0.0, metavar='DECAY',
                      help='evaluate and save the moving average of the probe\'s iterates '
                           'with this decay, e.g. 0.999 (default 0: the last iterate, as the '
                           'original)')
  parser.add_argument('--hidden-baseline-init', choices=HIDDEN_BASELINE_INITS, default='zeros',
                      help='where hidden gates\' baselines start: zeros (the original), '
                           'each depth\'s mean clean state over the first training batch, or '
                           '[MASK] at h0 and zeros elsewhere (mask_at_h0)')
  parser.add_argument('--warmup-steps', type=int, default=1200)
  parser.add_argument('--probe-learning-rate', type=float, default=3e-4)
  parser.add_argument('--baseline-learning-rate', type=float, default=1e-3)
  parser.add_argument('--sparsity', choices=objective.SPARSITY_LOSSES, default='log_l0')
  parser.add_argument('--relaxation', choices=relaxations.NAMES, default='hard_concrete',
                      help='gate distribution (paper: Hard Concrete); see dmx.relaxations')
  parser.add_argument('--probe-form', choices=probes.VOTE_FORMS, default='mlp')
  parser.add_argument('--probe-hidden-size', type=int, default=None,
                      help='width of the probe MLP (default hidden size / 4)')
  parser.add_argument('--probe-weight-norm', action='store_true',
                      help="weight-normalise the probe MLP's layers, as the original does")
  parser.add_argument('--max-train-examples', type=int, default=None,
                      help='train on the first N sentences / questions')
  parser.add_argument('--max-eval-examples', type=int, default=defaults['max_eval_examples'],
                      help='evaluate on the first N sentences / questions')
  parser.add_argument('--num-heatmaps', type=int, default=4, help='heatmap figures to draw')
  parser.add_argument('--checkpoint-every', type=int, default=500,
                      help='save the train state every N steps; rerun the command to resume')
  parser.add_argument('--bucket-width', type=int, default=16,
                      help='training batches pad to a multiple of this many tokens')
  parser.add_argument('--clean-pass-cache-gb', type=float, default=6.0,
                      help='cache the clean pass over the training set when it fits (0: never)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of the frozen model')
  parser.add_argument('--allow-random-head', action='store_true',
                      help='accept a model without a trained head (smoke tests only)')
  parser.add_argument('--layers', type=int, nargs='+', default=None, metavar='DEPTH',
                      help='train the probe at these depths only (default: every depth); '
                           'input gates take the headline at the deepest one')
  parser.add_argument('--seed', type=int, default=0)
  if task == 'sst':
    parser.add_argument('--validation-sentences', type=int, default=0, metavar='N',
                        help='hold N training sentences out of the probe\'s training and '
                             'score it on them during training')
    parser.add_argument('--select-agreement', type=float, default=None, metavar='A',
                        help='report the probe with the most masking whose held-out '
                             'agreement is >= A (default: the last one)')
    parser.add_argument('--validate-every', type=int, default=None, metavar='STEPS',
                        help='score on the held-out sentences every STEPS steps '
                             '(default --checkpoint-every)')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def config_from_args(args: argparse.Namespace, task: str) -> TextDiffMaskConfig:
  """The run's config from parsed ``add_arguments`` options; ValueError on bad values."""
  return TextDiffMaskConfig(
      task=task, model=args.model, gate=args.gate, data_dir=args.data,
      train_split=args.train_split, eval_split=args.eval_split, steps=args.steps,
      batch_size=args.batch_size, max_length=args.max_length,
      eval_batch_size=args.eval_batch_size, max_train_examples=args.max_train_examples,
      max_eval_examples=args.max_eval_examples, margin=args.margin,
      divergence_tail=args.divergence_tail, flip_penalty=args.flip_penalty,
      probe_average_decay=args.probe_average_decay,
      hidden_baseline_init=args.hidden_baseline_init, warmup_steps=args.warmup_steps,
      probe_learning_rate=args.probe_learning_rate,
      baseline_learning_rate=args.baseline_learning_rate, sparsity=args.sparsity,
      relaxation=args.relaxation, probe_form=args.probe_form,
      probe_hidden_size=args.probe_hidden_size, probe_weight_norm=args.probe_weight_norm,
      num_heatmap_examples=args.num_heatmaps,
      bucket_width=args.bucket_width, clean_pass_cache_gb=args.clean_pass_cache_gb,
      checkpoint_every=args.checkpoint_every,
      allow_random_head=args.allow_random_head, dtype=args.dtype, layers=args.layers,
      seed=args.seed, validation_sentences=getattr(args, 'validation_sentences', 0),
      select_agreement=getattr(args, 'select_agreement', None),
      validate_every=getattr(args, 'validate_every', None))


def run_from_args(args: argparse.Namespace, task: str) -> dict:
  """Runs ``dmx diffmask <task>`` from parsed options and returns the report.

  Bad input (missing model folder, a model without the task's head, missing
  data, nonsense numbers) raises ValueError with a one-line message.
  """
  config = config_from_args(args, task)
  out = checked_output_folder(args.out)
  return run_text_diffmask(config, out, progress=not args.no_progress)
