"""``dmx compare sst``: faithfulness of every attribution method on SST sentences, and Figure 5.

Every method attributes the frozen classifier's predicted label to the word
embeddings ``h0`` of one sentence (the same injection point DiffMask's input
gates use) and is scored the same way, by ERASER's comprehensiveness and
sufficiency at fixed fractions of the sentence's words, and their AOPC (see
:func:`dmx.metrics.erasure_curves`):

* ``random``: uniform random scores, the control every method must beat;
* ``gradient`` (L2 norm of the input gradient) and ``gradient_times_input``;
* ``integrated_gradients`` from the erasure baseline to the input;
* ``schulz`` (information bottleneck, capacity in bits; noise statistics of
  ``h0`` over the compared sentences' real tokens) and ``guan`` (1 / sigma);
* ``occlusion`` (leave-one-out) and ``lime``, both erasing to the erasure baseline;
* ``attention``: the last layer's attention from ``[CLS]``, averaged over
  heads. The classifier reads only the last layer's ``[CLS]`` state, and that
  row is how the last layer mixes the positions into it; it is attention,
  not an input attribution proper (the last layer mixes states, not words);
* ``diffmask_input``: a trained DiffMask input-gate probe's keep probability
  at the deepest depth (the product of every depth's vote), one forward pass.

Decisions, the same for every method:

* Erasure replaces the ``h0`` of an erased word piece by ONE baseline vector:
  the ``[MASK]`` word embedding by default (``--erasure-baseline``): the
  pretrained model's own "unknown word" token, so an erased sentence stays
  closer to the model's input distribution than with zeros; it is also where
  DiffMask's input baseline starts. ``[CLS]`` and ``[SEP]`` are never erased
  nor ranked; the attention mask is unchanged.
* Ranking unit (``--unit``): whole words by default. A word's score is the
  mean of its word pieces' scores (:func:`dmx.data.sst.pool_word_scores`), and
  erasing a word erases all its pieces (erasing half of ``un ##watch ##able``
  would leak the word). ``--unit wordpiece`` ranks word pieces instead.
* Signed scores (gradient x input, integrated gradients, occlusion, LIME) are
  ranked by their signed value: evidence for the predicted label first.
* ``k = ceil(f * n)`` units of ``n`` (at least one), ties to the leftmost.

Per-example optimisers (Schulz, Guan, LIME) cost hundreds of passes per
sentence: the default number of sentences is sized for a CPU. The sentences
are a seeded random sample of the split; batches group sentences of similar
length. ``--figure5-sentence`` also draws the paper's Figure 5 for one
sentence: per-depth attributions to every hidden state by raw attention,
integrated gradients, Schulz et al., Guan et al. and DiffMask's hidden gates
(``--hidden-probe``), each row normalised by its largest value.

Writes ``report.json``, ``report.md``, ``per_example.npz`` and, with a
figure sentence, ``figure5.png`` and ``figure5.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dmx import attribute, baselines, metrics, viz
from dmx.data import sst as sst_data
from dmx.data.common import length_sorted_index_batches
from dmx.models.hf_import import load_pretrained, tokenize
from dmx.pipelines import checked_output_folder
from dmx.pipelines.diffmask_text import state_names
from dmx.pipelines.explain import diffmask_config_from_metadata, load_probe

METHODS = ('random', 'gradient', 'gradient_times_input', 'integrated_gradients', 'schulz', 'guan',
           'occlusion', 'lime', 'attention', 'diffmask_input')
DESCRIPTIONS = {
    'random': 'random scores (control)',
    'gradient': 'input gradient, L2 norm',
    'gradient_times_input': 'gradient x input',
    'integrated_gradients': 'integrated gradients',
    'schulz': 'Schulz et al. (2020), capacity in bits',
    'guan': 'Guan et al. (2019), 1 / sigma',
    'occlusion': 'occlusion (leave-one-out)',
    'lime': 'LIME',
    'attention': 'attention from [CLS], last layer, mean over heads',
    'diffmask_input': 'DiffMask input gates, keep probability at the deepest depth',
}
UNITS = ('word', 'wordpiece')
ERASURE_BASELINES = ('mask', 'pad', 'zeros')
FIGURE5_PANELS = ('attention', 'integrated_gradients', 'schulz', 'guan', 'diffmask_hidden')


@dataclasses.dataclass(frozen=True)
class CompareSstConfig:
  """Settings of ``dmx compare sst`` (the command-line options, one field each)."""
  model: str
  probe: str | None = None
  hidden_probe: str | None = None
  data_dir: str | None = None
  split: str = 'dev'
  num_examples: int = 64
  seed: int = 0
  batch_size: int = 16
  max_length: int = 84
  length_bucket: int = 16
  fractions: tuple[float, ...] = metrics.ERASER_FRACTIONS
  unit: str = 'word'
  erasure_baseline: str = 'mask'
  methods: tuple[str, ...] = METHODS
  ig_steps: int = 50
  ig_path_batch: int = 10
  schulz_steps: int = 10
  schulz_beta: float = 10.0
  schulz_learning_rate: float = 1.0
  guan_steps: int = 100
  guan_learning_rate: float = 0.1
  guan_entropy_weight: float = 5e-4
  lime_samples: int = 200
  lime_samples_per_call: int = 25
  figure5_sentence: str | None = None

  def __post_init__(self):
    for name in ('num_examples', 'batch_size', 'max_length', 'length_bucket', 'ig_steps',
                 'ig_path_batch', 'schulz_steps', 'guan_steps', 'lime_samples_per_call'):
      if getattr(self, name) < 1:
        raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(self, name)}')
    if self.lime_samples < 2:
      raise ValueError(f'--lime-samples must be >= 2, got {self.lime_samples}')
    if self.unit not in UNITS:
      raise ValueError(f'--unit must be one of {UNITS}, got {self.unit!r}')
    if self.erasure_baseline not in ERASURE_BASELINES:
      raise ValueError(f'--erasure-baseline must be one of {ERASURE_BASELINES}, '
                       f'got {self.erasure_baseline!r}')
    unknown = [name for name in self.methods if name not in METHODS]
    if unknown or not self.methods:
      raise ValueError(f'--methods: unknown {unknown}; choose from {", ".join(METHODS)}'
                       if unknown else '--methods: need at least one method')
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f'--methods names a method twice: {list(self.methods)}')
    metrics.check_fractions(self.fractions)
    if self.split not in sst_data.SPLITS:
      raise ValueError(f'--split must be one of {sst_data.SPLITS}, got {self.split!r}')
    if self.figure5_sentence is not None and not self.figure5_sentence.strip():
      raise ValueError('--figure5-sentence is empty')


# ---------------------------------------------------------------------------
# Model, probes, data


class Frozen(NamedTuple):
  """The classifier under study: ``model``, ``params``, ``tokenizer``."""
  model: object
  params: dict
  tokenizer: object


def load_classifier(path: str) -> Frozen:
  """The fine-tuned classifier at ``path``; one-line ``ValueError`` when it is not one."""
  if not Path(path).expanduser().is_dir():
    raise ValueError(f'--model {path}: model folder does not exist')
  model, params, tokenizer = load_pretrained(path, head='classification', random_head=False)
  if tokenizer is None:
    raise ValueError(f'--model {path}: the folder has no tokenizer')
  return Frozen(model, params, tokenizer)


def load_matching_probe(probe_dir: str, gate: str, frozen: Frozen):
  """``(probe, probe_params, diffmask_config)`` of a ``gate`` probe trained on ``frozen``."""
  probe, probe_params, metadata, folder = load_probe(probe_dir)
  if metadata['gate'] != gate:
    option = '--probe' if gate == 'input' else '--hidden-probe'
    raise ValueError(f'{option} {probe_dir}: a {metadata["gate"]}-gate probe, expected {gate}')
  if tuple(metadata['state_dims']) != tuple(frozen.model.state_dims):
    raise ValueError(f'probe {folder}: states {metadata["state_dims"]} do not match the model\'s '
                     f'{list(frozen.model.state_dims)} (trained on another model?)')
  return probe, probe_params, diffmask_config_from_metadata(metadata)


def erasure_vector(frozen: Frozen, choice: str) -> np.ndarray:
  """``(hidden,)`` float32: the ``[MASK]`` or ``[PAD]`` word embedding, or zeros."""
  table = np.asarray(frozen.params['embeddings']['word_embeddings']['embedding'], np.float32)
  if choice == 'zeros':
    return np.zeros(table.shape[1], np.float32)
  token_id = (frozen.tokenizer.mask_token_id if choice == 'mask'
              else frozen.tokenizer.pad_token_id)
  if token_id is None:
    raise ValueError(f'--erasure-baseline {choice}: the tokenizer has no '
                     f'{"[MASK]" if choice == "mask" else "[PAD]"} token')
  return table[token_id]


def choose_examples(config: CompareSstConfig) -> tuple[list, np.ndarray]:
  """``(examples, indices)``: a seeded random sample of the split, indices into the split file."""
  try:
    examples = sst_data.load_sst(config.split, config.data_dir)
  except FileNotFoundError as error:  # a user's wrong --data: one line, not a traceback
    raise ValueError(f'--data: {error}') from None
  count = min(config.num_examples, len(examples))
  indices = np.sort(np.random.default_rng(config.seed).permutation(len(examples))[:count])
  return [examples[i] for i in indices], indices


class Batch(NamedTuple):
  """One padded batch of sentences.

  Attributes:
    inputs: the model's batch dict, ``(batch_size, seq)`` arrays.
    unit_ids: ``(batch_size, seq)`` int32 ranking unit of each position, -1 where never erased.
    word_ids: ``(batch_size, seq)`` int32 word of each word piece, -1 on specials and padding.
    rows: ``(batch_size,)`` the example each row holds (into the chosen examples); -1 fills a
      short last batch (a copy of row 0, dropped from every result).
  """
  inputs: dict
  unit_ids: np.ndarray
  word_ids: np.ndarray
  rows: np.ndarray


def make_batches(features: sst_data.SstFeatures, batch_size: int, length_bucket: int,
                 unit: str) -> list[Batch]:
  """Sentences grouped by length into fixed-size batches, each padded to a multiple of
  ``length_bucket`` (so few shapes are compiled)."""
  batches = []
  for rows, seq in length_sorted_index_batches(features.mask.sum(axis=1), batch_size,
                                               length_bucket, features.input_ids.shape[1]):
    valid = len(rows)
    rows = np.concatenate([rows, np.full(batch_size - valid, rows[0])])  # one batch shape
    chosen = features.take(rows)
    inputs = {name: value[:, :seq] for name, value in chosen.as_batch().items()}
    word_ids = chosen.word_ids[:, :seq]
    unit_ids = word_ids if unit == 'word' else metrics.wordpiece_units(word_ids >= 0)
    rows = np.where(np.arange(batch_size) < valid, rows, -1)
    batches.append(Batch(inputs, unit_ids.astype(np.int32), word_ids, rows))
  return batches


def unit_scores(token_scores: np.ndarray, batch: Batch, unit: str, num_words: int) -> np.ndarray:
  """``(batch_size, num_units)`` float32 scores of the ranking units from word-piece scores.

  Words: the mean over their pieces; a word without any piece (truncated) gets 0 and is never
  ranked (it owns no position).
  """
  token_scores = np.asarray(token_scores, np.float64)
  if unit == 'wordpiece':
    return np.where(batch.unit_ids >= 0, token_scores, 0.0).astype(np.float32)
  pooled = sst_data.pool_word_scores(token_scores, batch.word_ids, num_words, 'mean')
  rows, columns = np.nonzero(batch.unit_ids >= 0)
  if np.any(np.isnan(pooled[rows, batch.unit_ids[rows, columns]])):
    raise ValueError('a word owning a position has no pooled score (word ids disagree?)')
  return np.nan_to_num(pooled, nan=0.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Methods: one interface, (batch, key) -> (batch, seq) word-piece scores at h0


def last_layer_cls_attention(model, params, batch: dict) -> jax.Array:
  """``(batch, seq)`` the last layer's attention from ``[CLS]`` (query 0), mean over heads.

  Needs a model with ``forward_with_attention`` (:class:`dmx.models.bert.BertModel`).
  """
  attention = model.forward_with_attention(params, batch).attention  # (L, b, heads, q, k)
  return attention[-1, :, :, 0, :].mean(axis=1) * batch['mask'].astype(jnp.float32)


def method_scorers(config: CompareSstConfig, frozen: Frozen, erasure: np.ndarray,
                   noise_statistics: tuple[np.ndarray, np.ndarray] | None,
                   input_probe=None) -> dict[str, Callable]:
  """The jitted scorers of ``config.methods``: ``scorer(batch_dict, key) -> (batch, seq)``.

  Methods that cannot run (``diffmask_input`` without a probe, ``attention``
  on a model without explicit attention) are left out; see :func:`skipped_methods`.
  """
  model, params = frozen.model, frozen.params
  baseline = jnp.asarray(erasure)

  # one compiled program serves both gradient methods
  gradients = jax.jit(lambda batch: baselines.gradient_attribution(model, params, batch,
                                                                   layer_index=0))

  def diffmask_input(batch, key):
    probe, probe_params, dm_config = input_probe
    _, states = model.forward(params, batch)
    keep_prob, _ = attribute.keep_probs_and_gates(probe, probe_params, dm_config, states,
                                                  batch['mask'])
    return keep_prob[-1]

  def schulz(batch, key):
    mean, std = noise_statistics
    return baselines.information_bottleneck(
        model, params, batch, key, noise_mean=mean, noise_std=std, layer_index=0,
        beta=config.schulz_beta, steps=config.schulz_steps,
        learning_rate=config.schulz_learning_rate).token_scores

  every = {
      'random': lambda batch, key: jax.random.uniform(key, batch['mask'].shape) * batch['mask'],
      'gradient': lambda batch, key: gradients(batch).gradient_norm,
      'gradient_times_input': lambda batch, key: gradients(batch).gradient_times_input,
      'integrated_gradients': lambda batch, key: baselines.integrated_gradients(
          model, params, batch, layer_index=0, steps=config.ig_steps, baseline=baseline,
          path_batch_size=config.ig_path_batch).token_scores,
      'schulz': schulz,
      'guan': lambda batch, key: baselines.guan_noise_scales(
          model, params, batch, key, layer_index=0, steps=config.guan_steps,
          learning_rate=config.guan_learning_rate,
          entropy_weight=config.guan_entropy_weight).token_scores,
      'occlusion': lambda batch, key: baselines.occlusion(
          model, params, batch, layer_index=0, baseline=baseline).token_scores,
      'lime': lambda batch, key: baselines.lime(
          model, params, batch, key, layer_index=0, num_samples=config.lime_samples,
          baseline=baseline, samples_per_call=config.lime_samples_per_call).token_scores,
      'attention': lambda batch, key: last_layer_cls_attention(model, params, batch),
      'diffmask_input': diffmask_input,
  }
  skipped = skipped_methods(config, frozen, input_probe)
  already_jitted = ('gradient', 'gradient_times_input')
  return {name: every[name] if name in already_jitted else jax.jit(every[name])
          for name in config.methods if name not in skipped}


def skipped_methods(config: CompareSstConfig, frozen: Frozen, input_probe) -> dict[str, str]:
  """``{method: why}`` for the requested methods that cannot run."""
  skipped = {}
  if 'diffmask_input' in config.methods and input_probe is None:
    skipped['diffmask_input'] = 'no --probe given'
  if 'attention' in config.methods and not hasattr(frozen.model, 'forward_with_attention'):
    skipped['attention'] = 'the model does not expose its attention (forward_with_attention)'
  return skipped


# ---------------------------------------------------------------------------
# The comparison


def _method_settings(config: CompareSstConfig, name: str) -> dict:
  settings = {
      'integrated_gradients': dict(steps=config.ig_steps, rule='right', baseline='erasure',
                                   output='logit'),
      'schulz': dict(steps=config.schulz_steps, beta=config.schulz_beta,
                     learning_rate=config.schulz_learning_rate, optimizer='adam',
                     attribution='capacity', noise_statistics='h0 over the compared sentences'),
      'guan': dict(steps=config.guan_steps, learning_rate=config.guan_learning_rate,
                   optimizer='rmsprop', entropy_weight=config.guan_entropy_weight),
      'occlusion': dict(baseline='erasure', output='probability'),
      'lime': dict(num_samples=config.lime_samples, baseline='erasure', output='probability',
                   kernel_width=25.0),
      'gradient': dict(output='logit'), 'gradient_times_input': dict(output='logit'),
  }
  return settings.get(name, {})


def run_compare_sst(config: CompareSstConfig, out_dir: str | Path, *, progress: bool = True,
                    log: Callable[[str], None] = print,
                    command: str = 'dmx compare sst') -> dict:
  """Scores every method's faithfulness; writes ``report.json``, ``report.md``,
  ``per_example.npz`` (and Figure 5 when ``config.figure5_sentence`` is set)."""
  out_dir = checked_output_folder(out_dir)
  frozen = load_classifier(config.model)
  input_probe = (load_matching_probe(config.probe, 'input', frozen)
                 if config.probe is not None else None)
  hidden_probe = (load_matching_probe(config.hidden_probe, 'hidden', frozen)
                  if config.hidden_probe is not None else None)
  erasure = erasure_vector(frozen, config.erasure_baseline)
  examples, indices = choose_examples(config)
  features = sst_data.encode_sst(examples, frozen.tokenizer, config.max_length)
  if features.input_ids.shape[1] > frozen.model.config.max_sequence_length:
    raise ValueError(f'--max-length {config.max_length} exceeds the model\'s '
                     f'{frozen.model.config.max_sequence_length} positions')
  num_words = int(features.num_words.max())
  num_units = num_words if config.unit == 'word' else features.input_ids.shape[1]
  batches = make_batches(features, config.batch_size, config.length_bucket, config.unit)
  out_dir.mkdir(parents=True, exist_ok=True)
  log(f'{len(examples)} {config.split} sentences in {len(batches)} batches of '
      f'{config.batch_size}; methods: {", ".join(config.methods)}')

  # Schulz et al.'s noise statistics of every state, from one pass over the compared
  # sentences: h0's for the table, all of them for Figure 5
  statistics = None
  if 'schulz' in config.methods or config.figure5_sentence is not None:
    statistics = baselines.states_statistics(
        frozen.model, frozen.params, (batch.inputs for batch in batches),
        None if config.figure5_sentence is not None else (0,))
  scorers = method_scorers(config, frozen, erasure, None if statistics is None else statistics[0],
                           input_probe)
  skipped = skipped_methods(config, frozen, input_probe)
  for name, why in skipped.items():
    log(f'skipping {name}: {why}')

  def curves_for(params, batch, scores, unit_ids):
    return metrics.erasure_curves(frozen.model, params, batch, scores, unit_ids,
                                  fractions=config.fractions, baseline=erasure)

  curves_fn = jax.jit(curves_for)
  num = len(examples)
  fractions = config.fractions
  methods, per_example = {}, {}
  clean = dict(probability=np.zeros(num), prediction=np.zeros(num, np.int64))
  base_key = jax.random.key(config.seed)
  bar = tqdm(total=len(scorers) * len(batches), desc='compare sst', unit='batch',
             disable=not progress)
  for name, scorer in scorers.items():
    # a method's noise depends on its name, not on which other methods run
    method_key = jax.random.fold_in(base_key, zlib.crc32(name.encode()))
    comprehensiveness = np.zeros((len(fractions), num))
    sufficiency = np.zeros((len(fractions), num))
    attribution_seconds = evaluation_seconds = 0.0
    bar.set_postfix_str(name)
    for batch_index, batch in enumerate(batches):
      key = jax.random.fold_in(method_key, batch_index)
      start = time.perf_counter()
      token_scores = np.asarray(jax.device_get(scorer(batch.inputs, key)))
      attribution_seconds += time.perf_counter() - start
      scores = unit_scores(token_scores, batch, config.unit, num_units)
      metrics.check_unit_scores(scores, batch.unit_ids, name)
      start = time.perf_counter()
      curves = jax.device_get(curves_fn(frozen.params, batch.inputs, scores, batch.unit_ids))
      evaluation_seconds += time.perf_counter() - start
      valid = batch.rows >= 0
      rows = batch.rows[valid]
      comprehensiveness[:, rows] = np.asarray(curves.comprehensiveness)[:, valid]
      sufficiency[:, rows] = np.asarray(curves.sufficiency)[:, valid]
      clean['probability'][rows] = np.asarray(curves.full_probability)[valid]
      clean['prediction'][rows] = np.asarray(curves.target)[valid]
      bar.update(1)
    methods[name] = {
        **metrics.faithfulness_summary(comprehensiveness, sufficiency, fractions),
        'seconds': attribution_seconds, 'evaluation_seconds': evaluation_seconds,
        'description': DESCRIPTIONS[name], 'settings': _method_settings(config, name)}
    per_example[name] = (comprehensiveness, sufficiency)
    log(f'{name}: AOPC comprehensiveness {methods[name]["aopc_comprehensiveness"]:.4f}, '
        f'sufficiency {methods[name]["aopc_sufficiency"]:.4f} '
        f'({attribution_seconds:.1f} s + {evaluation_seconds:.1f} s scoring)')
  bar.close()

  labels = np.array([example.label for example in examples])
  num_labels = frozen.model.config.num_labels
  report = {
      'command': command,
      'config': {**dataclasses.asdict(config), 'fractions': list(config.fractions),
                 'methods': list(config.methods)},
      'data': {'split': config.split, 'num_examples': num, 'indices': indices.tolist(),
               'num_truncated': features.num_truncated,
               'mean_words': float(features.num_words.mean()),
               'mean_word_pieces': float((features.word_ids >= 0).sum(axis=1).mean())},
      'model': {'path': str(config.model), 'num_labels': num_labels,
                'accuracy_on_examples': (float(np.mean(clean['prediction'] == labels))
                                         if num_labels == sst_data.NUM_CLASSES and scorers
                                         else None),
                'mean_predicted_probability': float(clean['probability'].mean())
                                              if scorers else None},
      'erasure': {'baseline': config.erasure_baseline, 'unit': config.unit,
                  'word_score': 'mean of its word pieces' if config.unit == 'word' else None,
                  'count': 'ceil(fraction * units), at least 1',
                  'never_erased': '[CLS], [SEP], padding', 'ties': 'leftmost unit first',
                  'signed_scores': 'ranked by signed value'},
      'fractions': list(fractions),
      'methods': methods,
      'skipped': skipped,
      'files': {'per_example': 'per_example.npz'},
  }
  np.savez_compressed(out_dir / 'per_example.npz', indices=indices,
                      fractions=np.asarray(fractions), clean_probability=clean['probability'],
                      clean_prediction=clean['prediction'],
                      **{f'{name}_comprehensiveness': value[0]
                         for name, value in per_example.items()},
                      **{f'{name}_sufficiency': value[1] for name, value in per_example.items()})
  if config.figure5_sentence is not None:
    figure = figure5(config, frozen, statistics, hidden_probe, progress=progress, log=log)
    write_figure5(out_dir, figure)
    report['figure5'] = {'sentence': config.figure5_sentence, 'tokens': figure.tokens,
                         'prediction': figure.prediction, 'panels': list(figure.panels),
                         'skipped': figure.skipped, 'files': ['figure5.png', 'figure5.json']}
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  (out_dir / 'report.md').write_text(format_markdown(report))
  return report


def format_markdown(report: dict) -> str:
  """``report.md``: the faithfulness table and how it was computed."""
  fractions = report['fractions']
  data, model, erasure = report['data'], report['model'], report['erasure']
  percent = lambda f: f'{100 * f:g}%'
  lines = [
      f'# Faithfulness on SST {data["split"]}: ERASER comprehensiveness and sufficiency',
      '',
      f'Command: `{report["command"]}` (seed {report["config"]["seed"]}).',
      '',
      f'{data["num_examples"]} sentences ({data["mean_words"]:.1f} words, '
      f'{data["mean_word_pieces"]:.1f} word pieces on average; {data["num_truncated"]} '
      f'truncated). Classifier `{model["path"]}`'
      + (f': accuracy {model["accuracy_on_examples"]:.3f} on these sentences, mean p(predicted) '
         f'{model["mean_predicted_probability"]:.3f}.' if model['accuracy_on_examples'] is not None
         else '.'),
      '',
      'AOPC = mean over the fractions; ± one standard error over sentences. Comprehensiveness: '
      'higher is better; sufficiency: lower is better.',
      '',
      '| method | AOPC comprehensiveness ↑ | AOPC sufficiency ↓ | '
      + ' | '.join(f'comp. {percent(f)}' for f in fractions) + ' | '
      + ' | '.join(f'suff. {percent(f)}' for f in fractions) + ' | seconds |',
      '| --- | --- | --- | ' + ' | '.join(['---'] * (2 * len(fractions))) + ' | --- |',
  ]
  se = lambda value: '' if value is None else f' ± {value:.4f}'
  for name, entry in report['methods'].items():
    lines.append(
        f'| {entry["description"]} (`{name}`) | {entry["aopc_comprehensiveness"]:.4f}'
        f'{se(entry["aopc_comprehensiveness_se"])} | {entry["aopc_sufficiency"]:.4f}'
        f'{se(entry["aopc_sufficiency_se"])} | '
        + ' | '.join(f'{entry["comprehensiveness"][str(f)]:.4f}' for f in fractions) + ' | '
        + ' | '.join(f'{entry["sufficiency"][str(f)]:.4f}' for f in fractions)
        + f' | {entry["seconds"]:.1f} |')
  for name, why in report['skipped'].items():
    lines.append(f'\nSkipped `{name}`: {why}.')
  baseline_words = {'mask': 'the [MASK] word embedding', 'pad': 'the [PAD] word embedding',
                    'zeros': 'a zero vector'}[erasure['baseline']]
  unit_words = ('words (a word scores the mean of its word pieces; erasing a word erases all its '
                'pieces)' if erasure['unit'] == 'word' else 'word pieces')
  lines += [
      '', '## How it is computed', '',
      f'Every method attributes the predicted label to the word embeddings h0. Units ranked: '
      f'{unit_words}; '
      f'k = ceil(fraction × units), at least one; ties go to the leftmost unit; signed scores '
      f'are ranked by their signed value. Comprehensiveness = p(y|x) − p(y|x without the top-k '
      f'units); sufficiency = p(y|x) − p(y|only the top-k units), y the clean prediction. An '
      f'erased position\'s h0 becomes {baseline_words}, for every method; [CLS] and [SEP] are '
      f'never erased and the attention mask is unchanged. Integrated gradients, occlusion and '
      f'LIME use the same vector as their reference input; the DiffMask probe was trained with '
      f'its own learned baseline vector. `seconds`: attribution time (compilation included; '
      f'gradient x input reuses the gradient\'s compiled program), without the scoring passes. '
      f'Settings of each method: `report.json`, `methods.<name>.settings`; per-sentence '
      f'curves: `per_example.npz`.',
  ]
  if 'figure5' in report:
    lines += ['', f'Figure 5 (`figure5.png`) for "{report["figure5"]["sentence"]}".']
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Figure 5: attributions to every hidden state of one sentence


class Figure5(NamedTuple):
  """Per-depth attributions of one sentence, each ``(rows, seq)`` non-negative.

  Attributes:
    tokens: the sentence's word pieces, ``[CLS]`` and ``[SEP]`` included.
    prediction: the predicted label.
    panels: ``{name: (row_names, values (rows, seq))}``, raw values (not yet normalised).
    skipped: ``{name: why}`` for panels that could not be drawn.
  """
  tokens: list[str]
  prediction: int
  panels: dict
  skipped: dict


def figure5(config: CompareSstConfig, frozen: Frozen,
            statistics: Sequence[tuple[np.ndarray, np.ndarray]], hidden_probe,
            *, progress: bool = True, log: Callable[[str], None] = print) -> Figure5:
  """The paper's Figure 5 for ``config.figure5_sentence``, w.r.t. the predicted label.

  * raw attention: max over heads, mean over (real) query positions, one row
    per layer (layer ``k`` reads state ``h_k``);
  * integrated gradients (zero baseline, the paper's), ``|sum over features|``;
    Schulz et al. (capacity in bits; ``statistics``: each state's noise
    ``(mean, std)`` over the compared sentences' real tokens, from
    :func:`dmx.baselines.states_statistics`) and Guan et al. (1 / sigma), each applied
    with ``layer_index`` = every state ``h0 .. h_{L+1}``;
  * DiffMask hidden gates: the expected keep probability of each state.
  """
  model, params = frozen.model, frozen.params
  batch = tokenize(frozen.tokenizer, [config.figure5_sentence])
  if batch['input_ids'].shape[1] > model.config.max_sequence_length:
    raise ValueError(f'--figure5-sentence has {batch["input_ids"].shape[1]} tokens; the model '
                     f'allows {model.config.max_sequence_length}')
  tokens = frozen.tokenizer.convert_ids_to_tokens(batch['input_ids'][0].tolist())
  num_states = len(model.state_dims)
  names = state_names(num_states)
  outputs, _ = jax.jit(model.forward)(params, batch)
  prediction = int(np.argmax(np.asarray(outputs)[0]))
  panels, skipped = {}, {}
  if hasattr(model, 'forward_with_attention'):
    from dmx.baselines.attention import raw_attention  # pylint: disable=import-outside-toplevel
    attention = jax.jit(lambda p, b: raw_attention(model, p, b))(params, batch)
    panels['attention'] = ([f'layer {k} (reads h{k})' for k in range(1, model.config.num_layers
                                                                     + 1)],
                           np.asarray(attention)[0])
  else:
    skipped['attention'] = 'the model does not expose its attention'
  key = jax.random.key(config.seed)
  per_state = {
      'integrated_gradients': lambda p, b, k, layer: jnp.abs(baselines.integrated_gradients(
          model, p, b, layer_index=layer, steps=config.ig_steps,
          path_batch_size=config.ig_path_batch).token_scores),
      'schulz': lambda p, b, k, layer: baselines.information_bottleneck(
          model, p, b, k, noise_mean=statistics[layer][0], noise_std=statistics[layer][1],
          layer_index=layer, beta=config.schulz_beta, steps=config.schulz_steps,
          learning_rate=config.schulz_learning_rate).token_scores,
      'guan': lambda p, b, k, layer: baselines.guan_noise_scales(
          model, p, b, k, layer_index=layer, steps=config.guan_steps,
          learning_rate=config.guan_learning_rate,
          entropy_weight=config.guan_entropy_weight).token_scores,
  }
  for name, method in tqdm(per_state.items(), desc='figure 5', unit='method',
                           disable=not progress):
    # every state in one program: the baselines take a static layer index, and one compilation
    # of all depths costs less than one per depth
    every_state = jax.jit(lambda p, b, k, method=method: jnp.stack(
        [method(p, b, k, layer) for layer in range(num_states)]))
    panels[name] = (names, np.asarray(every_state(params, batch, key))[:, 0])
  if hidden_probe is not None:
    probe, probe_params, dm_config = hidden_probe
    result = jax.jit(lambda p, b: attribute.attribute(model, p, probe, probe_params, dm_config,
                                                      b))(params, batch)
    panels['diffmask_hidden'] = (names, np.asarray(result.keep_prob)[:, 0])
  else:
    skipped['diffmask_hidden'] = 'no --hidden-probe given'
  for name, why in skipped.items():
    log(f'figure 5: no {name} panel ({why})')
  return Figure5(tokens, prediction, panels, skipped)


FIGURE5_TITLES = {'attention': '(a) raw attention', 'integrated_gradients':
                  '(b) integrated gradients', 'schulz': '(c) Schulz et al.',
                  'guan': '(d) Guan et al.', 'diffmask_hidden': '(e) DiffMask (hidden gates)'}


def write_figure5(out_dir: Path, figure: Figure5) -> None:
  """Writes ``figure5.png`` (rows normalised by their max) and ``figure5.json`` (raw values)."""
  panels = [(FIGURE5_TITLES[name], row_names, values)
            for name, (row_names, values) in figure.panels.items()]
  fig = viz.layer_attribution_panels(
      panels, figure.tokens, suptitle=f'attributions to hidden states w.r.t. the predicted label '
      f'{figure.prediction}; each row normalised by its largest value')
  viz.save_figure(fig, out_dir / 'figure5.png')
  (out_dir / 'figure5.json').write_text(json.dumps({
      'tokens': figure.tokens, 'prediction': figure.prediction, 'skipped': figure.skipped,
      'panels': {name: {'rows': list(row_names), 'values': np.asarray(values).tolist()}
                 for name, (row_names, values) in figure.panels.items()}}, indent=1))


# ---------------------------------------------------------------------------
# Command-line adapter (``dmx compare sst``)


def _fractions(value: str) -> tuple[float, ...]:
  try:
    return metrics.check_fractions(float(part) for part in value.split(',') if part.strip())
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx compare sst``."""
  defaults = CompareSstConfig(model='')
  parser.add_argument('--model', required=True, help='the fine-tuned SST classifier folder')
  parser.add_argument('--probe', default=None,
                      help='a DiffMask input-gate probe (probe_input folder or its run folder); '
                      'without it the diffmask_input row is skipped')
  parser.add_argument('--hidden-probe', default=None,
                      help='a DiffMask hidden-gate probe, for Figure 5\'s DiffMask panel')
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--num-examples', type=int, default=defaults.num_examples,
                      help='sentences sampled from the split (seeded)')
  parser.add_argument('--data', default=None, help='data folder holding sst/<split>.txt')
  parser.add_argument('--split', default=defaults.split, choices=sst_data.SPLITS)
  parser.add_argument('--seed', type=int, default=defaults.seed,
                      help='sentence sample, random control, and noise of Schulz, Guan, LIME')
  parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
  parser.add_argument('--max-length', type=int, default=defaults.max_length,
                      help='word pieces per sentence, special tokens included (longer: truncated)')
  parser.add_argument('--length-bucket', type=int, default=defaults.length_bucket,
                      help='batches are padded to a multiple of this (fewer compilations)')
  parser.add_argument('--fractions', type=_fractions, default=defaults.fractions,
                      help='comma-separated fractions of units (default ERASER\'s '
                      '0.01,0.05,0.1,0.2,0.5)')
  parser.add_argument('--unit', choices=UNITS, default=defaults.unit,
                      help='rank and erase whole words (default) or word pieces')
  parser.add_argument('--erasure-baseline', choices=ERASURE_BASELINES,
                      default=defaults.erasure_baseline,
                      help='what an erased word piece\'s embedding becomes, for every method')
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'comma-separated subset of {",".join(METHODS)}')
  parser.add_argument('--ig-steps', type=int, default=defaults.ig_steps)
  parser.add_argument('--schulz-steps', type=int, default=defaults.schulz_steps)
  parser.add_argument('--guan-steps', type=int, default=defaults.guan_steps)
  parser.add_argument('--lime-samples', type=int, default=defaults.lime_samples)
  parser.add_argument('--figure5-sentence', default=None,
                      help='also draw the paper\'s Figure 5 for this sentence')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def command_line(args: argparse.Namespace) -> str:
  """The ``dmx compare sst`` command ``args`` stand for."""
  parts = ['dmx compare sst', f'--model {args.model}']
  for option in ('probe', 'hidden_probe', 'data'):
    if getattr(args, option) is not None:
      parts.append(f'--{option.replace("_", "-")} {getattr(args, option)}')
  parts += [f'--out {args.out}', f'--num-examples {args.num_examples}', f'--split {args.split}',
            f'--seed {args.seed}', f'--batch-size {args.batch_size}',
            f'--unit {args.unit}', f'--erasure-baseline {args.erasure_baseline}',
            f'--ig-steps {args.ig_steps}', f'--schulz-steps {args.schulz_steps}',
            f'--guan-steps {args.guan_steps}', f'--lime-samples {args.lime_samples}']
  if tuple(args.fractions) != metrics.ERASER_FRACTIONS:
    parts.append('--fractions ' + ','.join(f'{f:g}' for f in args.fractions))
  if args.methods != ','.join(METHODS):
    parts.append(f'--methods {args.methods}')
  if args.figure5_sentence is not None:
    parts.append(f'--figure5-sentence "{args.figure5_sentence}"')
  return ' '.join(parts)


def config_from_args(args: argparse.Namespace) -> CompareSstConfig:
  """The :class:`CompareSstConfig` of parsed ``args``; one-line ``ValueError`` on bad values."""
  methods = tuple(name.strip() for name in args.methods.split(',') if name.strip())
  return CompareSstConfig(
      model=args.model, probe=args.probe, hidden_probe=args.hidden_probe, data_dir=args.data,
      split=args.split, num_examples=args.num_examples, seed=args.seed,
      batch_size=args.batch_size, max_length=args.max_length, length_bucket=args.length_bucket,
      fractions=tuple(args.fractions), unit=args.unit, erasure_baseline=args.erasure_baseline,
      methods=methods, ig_steps=args.ig_steps, schulz_steps=args.schulz_steps,
      guan_steps=args.guan_steps, lime_samples=args.lime_samples,
      figure5_sentence=args.figure5_sentence)


def run_from_args(args: argparse.Namespace) -> dict:
  """Runs ``dmx compare sst`` from parsed ``args``; returns the report."""
  return run_compare_sst(config_from_args(args), args.out, progress=not args.no_progress,
                         command=command_line(args))
