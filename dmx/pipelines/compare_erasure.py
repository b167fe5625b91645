"""``dmx compare sst-erasure``: per-example DiffMask and REINFORCE against exact erasure (paper Table 2).

The paper's sec. 4.2.1 checks that DiffMask's relaxation can *find* good
discrete masks: without amortisation (free gate logits per sentence, see
:mod:`dmx.baselines.per_example`) the optimum is known, because exact erasure
search enumerates it. This pipeline:

1. trains (or loads) the recurrent SST-5 classifier of
   :mod:`dmx.models.recurrent`, whose forward pass is cheap enough for exact
   search, or loads a fine-tuned BERT-family classifier (a Hugging Face
   folder, as ``dmx finetune sst`` writes), and reports its dev accuracy;
2. selects SST sentences of at most ``max_tokens`` tokens (a fixed random
   sample of ``num_sentences`` of them, ``sentence_seed``). The tokens are
   what the classifier's ``h0`` has a row for: words for the recurrent
   model; word pieces, ``[CLS]`` and ``[SEP]`` included, for BERT;
3. runs exact erasure on the token embeddings ``h0``
   (:func:`dmx.baselines.erasure_search`), keeping *every* optimal subset: the
   smallest sets of kept tokens whose erasure of all other tokens (to the
   ``baseline`` vector, zeros by default) keeps the prediction (argmax).
   Sentences whose search passes ``max_evaluations`` model evaluations are
   excluded and counted; so are sentences whose all-erased input already gets
   the clean prediction (the empty set is optimal: precision is undefined);
4. finds per-example DiffMask and REINFORCE masks on the same sentences with
   the same baseline vector, for each seed in ``seeds``;
5. scores each method's deterministic mask against the *closest* optimal
   set (the one with the best F1 with the mask; ties: the first in
   lexicographic order): token precision, recall and F1 of the kept tokens,
   sparsity (fraction of the tokens erased) and sentence-level optimality (the
   mask is one of the optimal sets: it keeps the prediction with the optimal
   number of tokens). Averages are over sentences (macro), then mean and
   standard deviation over seeds; ``stability`` is the fraction of sentences
   whose mask is the same for every seed.

Because both methods solve DiffMask's constrained problem (``KL(clean ||
masked) <= margin``) and erasure keeps the argmax only, ``own_objective``
(on by default) also scores them against the exact optimum of that very
problem (the smallest sets keeping the argmax *and* the KL within the
margin), which separates how well a method searches from how far its
objective is from erasure's.

Writes ``report.json`` and ``report.md`` (the paper's Table 2 side by side);
a recurrent classifier trained here is cached under ``OUT/recurrent_model``.
Exact search costs up to ``C(n, k)`` forward passes per sentence of ``n``
tokens whose optimal sets keep ``k``: cheap on the recurrent model, hours for
BERT on a CPU unless ``max_tokens`` is small.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from dmx import checkpoint
from dmx.baselines.erasure import erasure_search, make_subset_evaluator
from dmx.baselines.per_example import REWARDS, per_example_diffmask, per_example_reinforce
from dmx.data import sst
from dmx.models import recurrent
from dmx.models.base import MaskableModel
from dmx.models.hf_import import load_pretrained
from dmx.objective import SPARSITY_LOSSES
from dmx.pipelines import compare_sst, finetune

METHODS = ('reinforce', 'diffmask')
METRICS = ('precision', 'recall', 'f1', 'sparsity', 'optimality')
# paper Table 2, in percent
PAPER_TABLE2 = {'reinforce': dict(precision=78.13, recall=86.40, f1=77.31, sparsity=78.57,
                                  optimality=15.67),
                'diffmask': dict(precision=87.12, recall=91.68, f1=87.15, sparsity=76.58,
                                 optimality=45.33)}
DESCRIPTIONS = {'reinforce': 'REINFORCE, moving-average baseline (per example)',
                'diffmask': 'DiffMask, Hard Concrete (per example, not amortised)'}
REWARD_DESCRIPTIONS = {
    'lagrangian': "the multiplier times the divergence minus its bias-corrected moving average "
                  "(dmx's estimator of the Lagrangian)",
    'original': "the divergence minus the margin minus its uncorrected moving average, without "
                "the multiplier (the original code's estimator: a fixed weight of 1 on the "
                "divergence)"}
MODEL_FOLDER = 'recurrent_model'


@dataclasses.dataclass(frozen=True)
class ErasureComparisonConfig:
  """Settings of the Table 2 comparison.

  Attributes:
    split: the SST split the sentences come from.
    max_tokens: longest sentence kept, in the classifier's tokens (the
      paper: 25 tokens).
    num_sentences: how many eligible sentences to use (a fixed random sample;
      ``None``: all of them).
    sentence_seed: seed of that sample.
    max_evaluations: erasure budget per sentence (model evaluations).
    erasure_group: sentences per erasure call (bounds the memory of one size's
      subsets).
    erasure_pairs_per_call: (sentence, subset) pairs per compiled evaluation.
    seeds: keys of the per-example methods' gate noise, one run each.
    steps, margin, learning_rate, samples, initial_logit, sparsity,
      logit_bound, flip_penalty, multiplier_learning_rate, baseline_decay: the per-example
      search (see :func:`dmx.baselines.per_example.per_example_masks`), the
      same for both methods. The original's per-example code starts every
      logit at 5, clips them to [-10, 10] and penalises the mean
      ``log P(z != 0)`` (``sparsity='log_l0'``); dmx's defaults are 2, no
      bound and the expected L0. ``flip_penalty > 0`` (not the paper's problem)
      makes a sample that changes the prediction pay for the flip, which
      moves both methods' problem towards exact erasure's.
    reinforce_reward: REINFORCE's estimator, ``'lagrangian'`` (dmx's: the
      multiplier scales the reward) or ``'original'`` (the original code's: a
      fixed weight of 1 on the divergence, its baseline uncorrected; it used
      ``baseline_decay=0.99``). See
      :func:`dmx.baselines.per_example.reinforce_reward`.
    batch_size: sentences per per-example call.
    own_objective: also score against the exact optimum of the constrained
      problem both methods solve (argmax kept and KL within ``margin``).
    model_seed, model_epochs, embedding_dim, hidden_dim, cell: the recurrent
      classifier (trained on SST train, the best dev epoch kept).
    pretrained_embeddings: a BERT-family model (folder, hub id or
      ``'bundled-minilm'``) whose tokenizer and frozen word embeddings the
      recurrent classifier reads instead of its own words: the original's
      recurrent SST model, a unidirectional GRU as wide as the embeddings
      (``embedding_dim`` and ``hidden_dim`` are then ignored). ``None``: words.
  """
  split: str = 'dev'
  max_tokens: int = 25
  num_sentences: int | None = 200
  sentence_seed: int = 0
  max_evaluations: int = 200_000
  erasure_group: int = 32
  erasure_pairs_per_call: int = 512
  seeds: tuple[int, ...] = (0, 1, 2)
  steps: int = 300
  margin: float = 0.1
  learning_rate: float = 0.1
  samples: int = 2
  initial_logit: float = 2.0
  sparsity: str = 'l0'
  logit_bound: float | None = None
  flip_penalty: float = 0.0
  multiplier_learning_rate: float = 0.1
  baseline_decay: float = 0.9
  reinforce_reward: str = 'lagrangian'
  batch_size: int = 256
  own_objective: bool = True
  model_seed: int = 0
  model_epochs: int = 5
  embedding_dim: int = 64
  hidden_dim: int = 64
  cell: str = 'gru'
  pretrained_embeddings: str | None = None

  def __post_init__(self):
    if min(self.max_tokens, self.max_evaluations, self.erasure_group,
           self.erasure_pairs_per_call) < 1:
      raise ValueError('max_tokens, max_evaluations, erasure_group and erasure_pairs_per_call '
                       'must be >= 1')
    if self.num_sentences is not None and self.num_sentences < 1:
      raise ValueError(f'num_sentences must be >= 1, got {self.num_sentences}')
    if not self.seeds:
      raise ValueError('seeds must name at least one seed')
    if self.steps < 1 or self.samples < 1 or self.batch_size < 1:
      raise ValueError('steps, samples and batch_size must be >= 1')
    if not self.margin >= 0:
      raise ValueError(f'margin must be >= 0, got {self.margin}')
    if self.reinforce_reward not in REWARDS:
      raise ValueError(f'reinforce_reward must be one of {REWARDS}, got '
                       f'{self.reinforce_reward!r}')
    if not 0.0 <= self.baseline_decay < 1.0:
      raise ValueError(f'baseline_decay must lie in [0, 1), got {self.baseline_decay}')
    if self.sparsity not in SPARSITY_LOSSES:
      raise ValueError(f'sparsity must be one of {SPARSITY_LOSSES}, got {self.sparsity!r}')
    if self.logit_bound is not None and not self.logit_bound > 0:
      raise ValueError(f'logit_bound must be > 0, got {self.logit_bound}')
    if not (self.flip_penalty >= 0 and math.isfinite(self.flip_penalty)):
      raise ValueError(f'flip_penalty must be a finite number >= 0, got {self.flip_penalty}')
    if self.logit_bound is not None and abs(self.initial_logit) > self.logit_bound:
      raise ValueError(f'initial_logit {self.initial_logit} lies outside the logit bound '
                       f'[-{self.logit_bound}, {self.logit_bound}]')

  def model_fingerprint(self) -> dict:
    """What the cached classifier depends on."""
    return dict(model_seed=self.model_seed, model_epochs=self.model_epochs,
                embedding_dim=self.embedding_dim, hidden_dim=self.hidden_dim, cell=self.cell,
                pretrained_embeddings=self.pretrained_embeddings)

  def method_options(self) -> dict:
    return dict(steps=self.steps, margin=self.margin, learning_rate=self.learning_rate,
                samples=self.samples, initial_logit=self.initial_logit,
                sparsity=self.sparsity, logit_bound=self.logit_bound,
                flip_penalty=self.flip_penalty,
                multiplier_learning_rate=self.multiplier_learning_rate)


def score_against_optimal(mask: np.ndarray, optimal_keeps: np.ndarray) -> dict:
  """One sentence's mask against its optimal kept sets.

  Args:
    mask: ``(seq,)`` 1 on the words the method keeps (0 on padding).
    optimal_keeps: ``(num_optimal, seq)`` the optimal sets (at least one,
      none empty).

  Returns:
    ``precision``, ``recall``, ``f1`` against the optimal set with the best
    F1 (ties: the first), and ``optimality``: 1.0 when the mask is one of the
    optimal sets. A mask that keeps nothing has precision 0.
  """
  mask = np.asarray(mask, np.float64)
  optimal_keeps = np.asarray(optimal_keeps, np.float64)
  if optimal_keeps.ndim != 2 or len(optimal_keeps) == 0:
    raise ValueError(f'need at least one optimal set, got shape {optimal_keeps.shape}')
  optimal_sizes = optimal_keeps.sum(axis=1)
  if np.any(optimal_sizes == 0):
    raise ValueError('an optimal set is empty: precision and recall are undefined')
  kept = mask.sum()
  overlap = optimal_keeps @ mask
  f1 = 2.0 * overlap / (kept + optimal_sizes)
  best = int(np.argmax(f1))
  return dict(precision=float(overlap[best] / kept) if kept > 0 else 0.0,
              recall=float(overlap[best] / optimal_sizes[best]), f1=float(f1[best]),
              optimality=float(np.any(np.all(optimal_keeps == mask[None], axis=1))))


def select_sentences(token_counts: np.ndarray, max_tokens: int, num_sentences: int | None,
                     seed: int) -> tuple[list[int], int]:
  """Indices (in file order) of a random sample of the sentences of at most ``max_tokens`` tokens.

  ``token_counts`` ``(N,)`` holds each sentence's tokens. Returns the indices
  and the number of eligible sentences.
  """
  eligible = [int(index) for index in np.flatnonzero(np.asarray(token_counts) <= max_tokens)]
  if not eligible:
    raise ValueError(f'no sentence has at most {max_tokens} tokens')
  if num_sentences is None or num_sentences >= len(eligible):
    return eligible, len(eligible)
  chosen = np.random.default_rng(seed).choice(len(eligible), num_sentences, replace=False)
  return [eligible[i] for i in sorted(chosen)], len(eligible)


class ErasureClassifier(NamedTuple):
  """The frozen SST-5 classifier whose token embeddings ``h0`` are erased, and its tokenisation.

  Attributes:
    model, params: the classifier (outputs ``(batch, 5)``).
    token_counts: sentences -> ``(N,)`` tokens per sentence (``h0`` rows).
    encode: sentences -> the model's batch, padded to the longest of them.
    token_name: what one token is, for the report (``'word'``, ``'word piece'``).
    summary: ``description``, ``source``, ``dev_accuracy`` and details, for the report.
  """
  model: MaskableModel
  params: Any
  token_counts: Callable[[Sequence[sst.SstExample]], np.ndarray]
  encode: Callable[[Sequence[sst.SstExample]], dict]
  token_name: str
  summary: dict


def is_hugging_face_folder(path: str | Path | None) -> bool:
  """Whether ``path`` is a Hugging Face model folder (it has ``config.json``)."""
  return path is not None and (Path(path).expanduser() / 'config.json').is_file()


def load_bert_classifier(model_dir: str | Path, data_dir) -> ErasureClassifier:
  """A fine-tuned BERT-family SST-5 classifier; its tokens are word pieces with ``[CLS]``/``[SEP]``."""
  frozen = compare_sst.load_classifier(str(model_dir))
  if frozen.model.config.num_labels != sst.NUM_CLASSES:
    raise ValueError(f'--model {model_dir}: a {frozen.model.config.num_labels}-way classifier, '
                     f'not an SST-5 one ({sst.NUM_CLASSES} classes)')
  limit = frozen.model.config.max_sequence_length
  dev = sst.encode_sst(sst.load_sst('dev', data_dir), frozen.tokenizer, limit)
  dev_scores = finetune.evaluate(finetune.make_predict(frozen.model), frozen.params, dev)

  def encode(examples):  # padded to the longest sentence, so nothing is truncated
    longest = int(sst.token_lengths(examples, frozen.tokenizer).max())
    return sst.encode_sst(examples, frozen.tokenizer, longest).as_batch()

  summary = dict(
      source=str(model_dir), dev_accuracy=dev_scores['accuracy'],
      description=(f'BERT-family ({frozen.model.config.num_layers} layers, hidden '
                   f'{frozen.model.config.hidden_size}), fine-tuned'))
  return ErasureClassifier(frozen.model, frozen.params,
                           lambda examples: sst.token_lengths(examples, frozen.tokenizer),
                           encode, 'word piece', summary)


def load_or_train_model(config: ErasureComparisonConfig, out_dir: Path,
                        model_dir: str | Path | None, data_dir, progress: bool,
                        log: Callable[[str], None]) -> ErasureClassifier:
  """The classifier of ``model_dir``, or the recurrent one cached in ``OUT/recurrent_model``, or a new one.

  ``model_dir`` is a Hugging Face folder (a fine-tuned BERT) or a saved
  recurrent classifier, used as it is. A cached recurrent model is reused only
  when its training settings match the config's.
  """
  if is_hugging_face_folder(model_dir):
    return load_bert_classifier(model_dir, data_dir)
  cached = out_dir / MODEL_FOLDER
  if model_dir is not None:
    trained, metadata = recurrent.load_recurrent(model_dir)
    source = str(model_dir)
  elif checkpoint.exists(cached) and checkpoint.read_metadata(cached).get(
      'fingerprint') == config.model_fingerprint():
    trained, metadata = recurrent.load_recurrent(cached)
    source = f'{cached} (cached)'
  else:
    train_examples = sst.load_sst('train', data_dir)
    dev_examples = sst.load_sst('dev', data_dir)
    overrides = dict(embedding_dim=config.embedding_dim, hidden_dim=config.hidden_dim,
                     cell=config.cell)
    tokenizer = frozen_embeddings = None
    if config.pretrained_embeddings is not None:
      tokenizer, frozen_embeddings = pretrained_word_embeddings(config.pretrained_embeddings)
      # the original's recurrent model: one direction, as wide as the embeddings
      overrides.update(hidden_dim=frozen_embeddings.shape[1], bidirectional=False)
    log(f'training the recurrent classifier on {len(train_examples)} SST train sentences')
    started = time.monotonic()
    trained = recurrent.train_recurrent_classifier(
        [e.words for e in train_examples], [e.label for e in train_examples],
        [e.words for e in dev_examples], [e.label for e in dev_examples],
        config_overrides=overrides, seed=config.model_seed, epochs=config.model_epochs,
        progress=progress, tokenizer=tokenizer, frozen_embeddings=frozen_embeddings)
    seconds = time.monotonic() - started
    recurrent.save_recurrent(cached, trained, dict(fingerprint=config.model_fingerprint(),
                                                   train_seconds=seconds))
    metadata = checkpoint.read_metadata(cached)
    source = f'{cached} (trained in {seconds:.0f} s)'
  model_config = trained.model.config
  summary = dict(
      source=source, config=dataclasses.asdict(model_config), dev_accuracy=trained.dev_accuracy,
      vocabulary_size=model_config.vocab_size, history=trained.history,
      train_seconds=metadata.get('train_seconds'),
      description=(f'recurrent ({model_config.cell.upper()}, '
                   f'{"bidirectional" if model_config.bidirectional else "unidirectional"}, '
                   f'embedding {model_config.embedding_dim}, hidden {model_config.hidden_dim}, '
                   + (f'vocabulary {model_config.vocab_size} words)' if trained.tokenizer is None
                      else f'frozen pretrained embeddings of {model_config.vocab_size} word '
                           'pieces)')))
  words = lambda examples: [example.words for example in examples]
  return ErasureClassifier(trained.model, trained.params,
                           lambda examples: trained.token_counts(words(examples)),
                           lambda examples: trained.encode(words(examples)),
                           'word' if trained.tokenizer is None else 'word piece', summary)


def pretrained_word_embeddings(model: str) -> tuple[object, np.ndarray]:
  """``(tokenizer, word embeddings (vocab, width))`` of a BERT-family model (or ``'bundled-minilm'``)."""
  folder = finetune.resolve_model(model)
  _, params, tokenizer = load_pretrained(folder, head=None)
  if tokenizer is None:
    raise ValueError(f'{model}: the folder has no tokenizer, so its embeddings cannot be read')
  return tokenizer, np.asarray(params['embeddings']['word_embeddings']['embedding'])


def exact_erasure(classifier: ErasureClassifier, batch: dict, config: ErasureComparisonConfig,
                  max_divergence: float | None, progress: bool, description: str):
  """Erasure with every optimal set, in groups of ``erasure_group`` sentences, one compiled evaluator.

  Returns ``(sizes (N,), optimal_keeps list, found (N,), evaluations, seconds)``;
  size 0 means the empty set keeps the prediction.
  """
  evaluator = make_subset_evaluator(classifier.model, 0)
  num = len(batch['mask'])
  sizes = np.full(num, -1)
  found = np.zeros(num, bool)
  optimal_keeps: list = [None] * num
  evaluations = 0
  started = time.monotonic()
  for start in tqdm(range(0, num, config.erasure_group), desc=description, unit='group',
                    disable=not progress):
    rows = np.arange(start, min(start + config.erasure_group, num))
    group = {name: value[rows] for name, value in batch.items()}
    result = erasure_search(classifier.model, classifier.params, group, min_size=0,
                            max_evaluations=10**12, pairs_per_call=config.erasure_pairs_per_call,
                            on_budget='flag',
                            max_evaluations_per_example=config.max_evaluations,
                            max_divergence=max_divergence, return_optimal=True,
                            evaluator=evaluator)
    evaluations += result.evaluations
    for offset, row in enumerate(rows):
      sizes[row], found[row] = result.size[offset], result.found[offset]
      optimal_keeps[row] = result.optimal_keeps[offset]
  return sizes, optimal_keeps, found, evaluations, time.monotonic() - started


def run_methods(classifier: ErasureClassifier, batch: dict, config: ErasureComparisonConfig,
                progress: bool) -> dict:
  """``{method: {seed: (masks (N, seq), keeps_prediction (N,), divergence (N,), seconds)}}``."""
  functions = {'diffmask': per_example_diffmask, 'reinforce': per_example_reinforce}
  extra = {'diffmask': {}, 'reinforce': dict(baseline_decay=config.baseline_decay,
                                              reward=config.reinforce_reward)}
  num = len(batch['mask'])
  results = {}
  for method in METHODS:
    results[method] = {}
    for seed in config.seeds:
      started = time.monotonic()
      parts = []
      for start in range(0, num, config.batch_size):
        rows = {name: value[start:start + config.batch_size] for name, value in batch.items()}
        found = functions[method](classifier.model, classifier.params, rows,
                                  key=jax.random.key(seed),
                                  progress=progress, description=f'{method} seed {seed}',
                                  **extra[method], **config.method_options())
        parts.append(jax.device_get((found.mask, found.keeps_prediction, found.divergence)))
      masks, keeps, divergence = (np.concatenate(arrays) for arrays in zip(*parts))
      results[method][seed] = (masks, keeps, divergence, time.monotonic() - started)
  return results


def score_method(masks: np.ndarray, keeps_prediction: np.ndarray, lengths: np.ndarray,
                 optimal_keeps: Sequence[np.ndarray], optimal_sizes: np.ndarray,
                 included: np.ndarray) -> dict:
  """Macro averages (percent) of :func:`score_against_optimal` over the ``included`` sentences.

  Also ``sparsity`` (percent of tokens erased), ``keeps_prediction`` (percent)
  and ``optimality_by_size`` (keeps the prediction with the optimal number of
  tokens), which must equal ``optimality``.
  """
  rows = np.flatnonzero(included)
  scores = [score_against_optimal(masks[i], optimal_keeps[i]) for i in rows]
  kept = masks[rows].sum(axis=1)
  by_size = keeps_prediction[rows] & (kept == optimal_sizes[rows])
  summary = {name: 100.0 * float(np.mean([s[name] for s in scores])) for name in
             ('precision', 'recall', 'f1', 'optimality')}
  summary['sparsity'] = 100.0 * float(np.mean(1.0 - kept / lengths[rows]))
  summary['keeps_prediction'] = 100.0 * float(np.mean(keeps_prediction[rows]))
  summary['optimality_by_size'] = 100.0 * float(np.mean(by_size))
  summary['mean_kept_tokens'] = float(np.mean(kept))
  return summary


def _mean(values) -> float | None:
  """The mean as a float, ``None`` for no values."""
  values = np.asarray(values, np.float64)
  return float(values.mean()) if values.size else None


def _spread(per_seed: list[dict]) -> dict:
  names = per_seed[0].keys()
  return {name: dict(mean=float(np.mean([s[name] for s in per_seed])),
                     std=float(np.std([s[name] for s in per_seed])),
                     per_seed=[s[name] for s in per_seed]) for name in names}


def run_compare_erasure(config: ErasureComparisonConfig, out_dir: str | Path, *,
                        model_dir: str | Path | None = None, data_dir: str | Path | None = None,
                        progress: bool = True, log: Callable[[str], None] = print,
                        command: str = 'dmx compare sst-erasure') -> dict:
  """Runs the comparison; writes ``report.json`` and ``report.md`` to ``out_dir``; returns the report."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.monotonic()
  classifier = load_or_train_model(config, out_dir, model_dir, data_dir, progress, log)
  model_summary = classifier.summary
  log(f'classifier: {model_summary["description"]}, dev accuracy '
      f'{model_summary["dev_accuracy"]:.4f} ({model_summary["source"]})')
  examples = sst.load_sst(config.split, data_dir)
  indices, num_eligible = select_sentences(classifier.token_counts(examples), config.max_tokens,
                                           config.num_sentences, config.sentence_seed)
  chosen = [examples[i] for i in indices]
  batch = classifier.encode(chosen)
  lengths = np.asarray(batch['mask']).sum(axis=1)
  log(f'{len(chosen)} of {num_eligible} {config.split} sentences of <= {config.max_tokens} '
      f'{classifier.token_name}s ({len(examples)} in all)')

  sizes, optimal_keeps, found, evaluations, erasure_seconds = exact_erasure(
      classifier, batch, config, None, progress, 'exact erasure')
  empty_optimal = found & (sizes == 0)
  included = found & (sizes > 0)
  log(f'erasure: {int(included.sum())} sentences scored, {int((~found).sum())} over the budget, '
      f'{int(empty_optimal.sum())} with the empty set optimal ({erasure_seconds:.0f} s)')

  method_results = run_methods(classifier, batch, config, progress)

  def score_all(optimal, sizes_, included_):
    if not included_.any():  # nothing to score against: say so rather than average nothing
      return {method: dict(metrics=None, stability=None) for method in METHODS}
    scored = {}
    for method in METHODS:
      per_seed = [score_method(masks, keeps, lengths, optimal, sizes_, included_)
                  for masks, keeps, _, _ in method_results[method].values()]
      stacked = np.stack([masks for masks, _, _, _ in method_results[method].values()])
      same = np.all(stacked == stacked[:1], axis=(0, 2))
      scored[method] = dict(metrics=_spread(per_seed),
                            stability=100.0 * float(np.mean(same[included_])))
    return scored

  methods = score_all(optimal_keeps, sizes, included)
  for method in METHODS:
    methods[method]['seconds'] = [entry[3] for entry in method_results[method].values()]
  erasure_summary = dict(
      scored_sentences=int(included.sum()), over_budget=int((~found).sum()),
      empty_set_optimal=int(empty_optimal.sum()), evaluations=int(evaluations),
      seconds=erasure_seconds,
      sparsity=_mean(100.0 * (1.0 - sizes[included] / lengths[included])),
      mean_optimal_size=_mean(sizes[included]),
      mean_optimal_sets=_mean([len(optimal_keeps[i]) for i in np.flatnonzero(included)]))

  own = None
  if config.own_objective:
    own_sizes, own_keeps, own_found, own_evaluations, own_seconds = exact_erasure(
        classifier, batch, config, config.margin, progress, 'exact erasure within the margin')
    own_included = own_found & (own_sizes > 0)
    own = dict(scored_sentences=int(own_included.sum()), over_budget=int((~own_found).sum()),
               empty_set_optimal=int((own_found & (own_sizes == 0)).sum()),
               evaluations=int(own_evaluations), seconds=own_seconds,
               sparsity=_mean(100.0 * (1.0 - own_sizes[own_included] / lengths[own_included])),
               methods=score_all(own_keeps, own_sizes, own_included))

  if included.any():
    means = {method: {name: methods[method]['metrics'][name]['mean'] for name in METRICS}
             for method in METHODS}
    checks = dict(diffmask_beats_reinforce_f1=means['diffmask']['f1'] > means['reinforce']['f1'],
                  diffmask_beats_reinforce_optimality=(means['diffmask']['optimality']
                                                       > means['reinforce']['optimality']))
  else:
    checks = dict(diffmask_beats_reinforce_f1=None, diffmask_beats_reinforce_optimality=None)
  report = dict(
      command=command, config=dataclasses.asdict(config), model=model_summary,
      data=dict(split=config.split, sentences=len(chosen), eligible=num_eligible,
                total=len(examples), indices=indices, token=classifier.token_name,
                mean_tokens=float(np.mean(lengths))),
      baseline=f'zeros: an erased {classifier.token_name} embedding h0 becomes the zero vector '
               '(erasure and both methods alike)',
      erasure=erasure_summary, methods=methods, own_objective=own,
      paper=dict(table2=PAPER_TABLE2), checks=checks,
      seconds=time.monotonic() - started)
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  (out_dir / 'report.md').write_text(format_markdown(report))
  return report


SPARSITY_NAMES = {'l0': 'the expected L0', 'log_l0': "the mean log P(gate open) (the original's)"}


def _bound_text(bound: float | None) -> str:
  return 'unbounded' if bound is None else f'clipped to [-{bound}, {bound}]'


def _flip_text(flip_penalty: float) -> str:
  if not flip_penalty:
    return 'the KL alone bounded (the paper\'s problem)'
  return f'KL + {flip_penalty} x the size of a flipped prediction bounded (not the paper\'s problem)'


def _number(value, digits: int = 2) -> str:
  return '—' if value is None else f'{value:.{digits}f}'


def _cell(method_entry: dict, name: str) -> str:
  """``mean ± std`` over seeds of metric ``name`` ('—' when nothing was scored)."""
  if method_entry['metrics'] is None:
    return '—'
  entry = method_entry['metrics'][name]
  if len(entry['per_seed']) == 1:
    return f'{entry["mean"]:.2f}'
  return f'{entry["mean"]:.2f} ± {entry["std"]:.2f}'


def format_markdown(report: dict) -> str:
  """``report.md``: the setup, Table 2 next to the paper's, the checks and the definitions."""
  config, model, data, erasure = (report['config'], report['model'], report['data'],
                                  report['erasure'])
  reinforce, diffmask = report['methods']['reinforce'], report['methods']['diffmask']
  token = data['token']
  lines = [
      '# SST, Table 2: per-example DiffMask and REINFORCE against exact erasure', '',
      f'Command: `{report["command"]}`.', '',
      f'Classifier: {model["description"]}, SST-5 dev accuracy {model["dev_accuracy"]:.4f}; '
      f'{model["source"]}.', '',
      f'Data: {data["sentences"]} of the {data["eligible"]} {data["split"]} sentences of at most '
      f'{config["max_tokens"]} {token}s ({data["total"]} in all; sample seed '
      f'{config["sentence_seed"]}; {data["mean_tokens"]:.1f} {token}s on average).', '',
      f'Erasure of {token} embeddings (an erased {token}\'s embedding becomes the zero vector, '
      f'for erasure and both methods alike): {erasure["scored_sentences"]} sentences scored; '
      f'excluded: {erasure["over_budget"]} over the budget of {config["max_evaluations"]} '
      f'evaluations per sentence, {erasure["empty_set_optimal"]} whose all-erased input already '
      f'keeps the prediction (the empty set is optimal). Optimal sets keep '
      f'{_number(erasure["mean_optimal_size"])} {token}s on average; '
      f'{_number(erasure["mean_optimal_sets"])} optimal sets per sentence.', '',
      f'Per-example search: {config["steps"]} steps, margin {config["margin"]}, learning rate '
      f'{config["learning_rate"]} (Adam), {config["samples"]} gate samples per step, '
      f'initial logit {config["initial_logit"]}, sparsity term {SPARSITY_NAMES[config["sparsity"]]}, '
      f'logits {_bound_text(config["logit_bound"])}, '
      f'{_flip_text(config["flip_penalty"])}, seeds '
      f'{", ".join(map(str, config["seeds"]))} (mean ± std over seeds). REINFORCE\'s reward: '
      f'{REWARD_DESCRIPTIONS[config["reinforce_reward"]]}, baseline decay '
      f'{config["baseline_decay"]}.', '',
      '| metric (%) | REINFORCE | DiffMask | paper REINFORCE | paper DiffMask | erasure |',
      '| --- | --- | --- | --- | --- | --- |',
  ]
  for name in METRICS:
    erasure_value = _number(erasure['sparsity']) if name == 'sparsity' else '100'
    lines.append(f'| {name} | {_cell(reinforce, name)} | {_cell(diffmask, name)} | '
                 f'{PAPER_TABLE2["reinforce"][name]:.2f} | {PAPER_TABLE2["diffmask"][name]:.2f} | '
                 f'{erasure_value} |')
  lines += [
      f'| mask keeps the prediction | {_cell(reinforce, "keeps_prediction")} | '
      f'{_cell(diffmask, "keeps_prediction")} | | | 100 |',
      f'| kept {token}s (mean) | {_cell(reinforce, "mean_kept_tokens")} | '
      f'{_cell(diffmask, "mean_kept_tokens")} | | | {_number(erasure["mean_optimal_size"])} |',
      f'| same mask for every seed | {_number(reinforce["stability"])} | '
      f'{_number(diffmask["stability"])} | | | |',
      '', '## Checks (the issue\'s must-show: DiffMask beats REINFORCE)', '']
  for name, value in report['checks'].items():
    lines.append(f'- `{name}`: {value}')
  own = report.get('own_objective')
  if own:
    lines += [
        '', '## Against the exact optimum of the problem both methods solve', '',
        f'Smallest kept sets that keep the prediction *and* KL(clean || erased) <= margin '
        f'{config["margin"]}: {own["scored_sentences"]} sentences scored ({own["over_budget"]} '
        f'over the budget, {own["empty_set_optimal"]} with the empty set optimal); '
        f'their sparsity {_number(own["sparsity"])}%.', '',
        '| metric (%) | REINFORCE | DiffMask |', '| --- | --- | --- |']
    for name in METRICS:
      lines.append(f'| {name} | {_cell(own["methods"]["reinforce"], name)} | '
                   f'{_cell(own["methods"]["diffmask"], name)} |')
  lines += [
      '', '## Definitions', '',
      'Every metric is computed per sentence and averaged over the scored sentences (macro). '
      f'Precision, recall and F1 compare the {token}s a method keeps (its deterministic mask, '
      '1[P(gate open) > 1/2]) with the optimal set closest to it (best F1 among all optimal sets; '
      f'a mask keeping nothing has precision 0). Sparsity is the fraction of a sentence\'s '
      f'{token}s erased. Optimality: the mask is one of the optimal sets, i.e. it keeps the '
      f'prediction with the fewest {token}s possible. Stability: the fraction of sentences whose '
      'mask is the same for every seed. Seconds per run: `report.json`.',
  ]
  return '\n'.join(lines) + '\n'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx compare sst-erasure``."""
  defaults = ErasureComparisonConfig()
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--model', default=None,
                      help='a fine-tuned SST-5 classifier: a Hugging Face folder (BERT family, '
                      'as dmx finetune sst writes) or a saved recurrent classifier folder; '
                      'default: train a recurrent one (or reuse OUT/recurrent_model)')
  parser.add_argument('--data', default=None, dest='data_dir',
                      help='folder holding sst/{train,dev}.txt (default ../shared/data)')
  parser.add_argument('--split', choices=('train', 'dev', 'test'), default=defaults.split)
  parser.add_argument('--sentences', type=int, default=defaults.num_sentences,
                      help='eligible sentences sampled (0: all)')
  parser.add_argument('--max-tokens', type=int, default=defaults.max_tokens,
                      help='longest sentence kept, in the classifier\'s tokens (words for the '
                      'recurrent model, word pieces with [CLS] and [SEP] for BERT)')
  parser.add_argument('--max-evaluations', type=int, default=defaults.max_evaluations,
                      help='erasure budget per sentence (model evaluations)')
  parser.add_argument('--seeds', type=int, nargs='+', default=list(defaults.seeds))
  parser.add_argument('--steps', type=int, default=defaults.steps)
  parser.add_argument('--margin', type=float, default=defaults.margin)
  parser.add_argument('--learning-rate', type=float, default=defaults.learning_rate)
  parser.add_argument('--samples', type=int, default=defaults.samples,
                      help='gate samples per example and step')
  parser.add_argument('--initial-logit', type=float, default=defaults.initial_logit,
                      help="every gate logit's start (the original's per-example code: 5)")
  parser.add_argument('--sparsity', choices=SPARSITY_LOSSES, default=defaults.sparsity,
                      help='; '.join(f"'{name}': {text}" for name, text in SPARSITY_NAMES.items()))
  parser.add_argument('--logit-bound', type=float, default=defaults.logit_bound,
                      help='clip every gate logit to [-B, B] after each step (the original\'s '
                           'per-example code: 10; default: no bound)')
  parser.add_argument('--flip-penalty', type=float, default=defaults.flip_penalty,
                      metavar='WEIGHT',
                      help='both methods bound KL + WEIGHT * the size of a flipped prediction '
                           'instead of the KL alone (default 0: the paper\'s problem)')
  parser.add_argument('--reinforce-reward', choices=REWARDS,
                      default=defaults.reinforce_reward,
                      help="REINFORCE's estimator: 'lagrangian' (the multiplier scales the "
                           "reward) or 'original' (the original code's fixed weight of 1; use "
                           "it with --baseline-decay 0.99, its value)")
  parser.add_argument('--baseline-decay', type=float, default=defaults.baseline_decay,
                      help="decay of REINFORCE's moving-average baseline")
  parser.add_argument('--model-epochs', type=int, default=defaults.model_epochs)
  parser.add_argument('--pretrained-embeddings', default=None, metavar='MODEL',
                      help='train the recurrent classifier as the original did: a '
                      'unidirectional GRU over the frozen word-piece embeddings of MODEL (a '
                      'BERT-family folder, a hub id or bundled-minilm)')
  parser.add_argument('--no-own-objective', action='store_true',
                      help='skip the comparison with the exact optimum of the KL-constrained problem')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def command_line(args: argparse.Namespace) -> str:
  """The ``dmx compare sst-erasure`` command ``args`` stand for, every option spelled out."""
  parts = ['dmx compare sst-erasure', f'--out {args.out}']
  if args.model is not None:
    parts.append(f'--model {args.model}')
  if args.data_dir is not None:
    parts.append(f'--data {args.data_dir}')
  parts += [f'--split {args.split}', f'--sentences {args.sentences}',
            f'--max-tokens {args.max_tokens}', f'--max-evaluations {args.max_evaluations}',
            f'--seeds {" ".join(map(str, args.seeds))}', f'--steps {args.steps}',
            f'--margin {args.margin}', f'--learning-rate {args.learning_rate}',
            f'--samples {args.samples}', f'--initial-logit {args.initial_logit}',
            f'--sparsity {args.sparsity}', f'--reinforce-reward {args.reinforce_reward}',
            f'--baseline-decay {args.baseline_decay}', f'--model-epochs {args.model_epochs}']
  if args.logit_bound is not None:
    parts.append(f'--logit-bound {args.logit_bound}')
  if args.flip_penalty:
    parts.append(f'--flip-penalty {args.flip_penalty}')
  if args.pretrained_embeddings is not None:
    parts.append(f'--pretrained-embeddings {args.pretrained_embeddings}')
  if args.no_own_objective:
    parts.append('--no-own-objective')
  return ' '.join(parts)


def config_from_args(args: argparse.Namespace) -> ErasureComparisonConfig:
  """The :class:`ErasureComparisonConfig` of ``args`` (ValueError for bad values)."""
  if args.sentences is not None and args.sentences < 0:
    raise ValueError(f'--sentences must be >= 0, got {args.sentences}')
  if args.model is not None and args.pretrained_embeddings is not None:
    raise ValueError('--pretrained-embeddings says how to train a new classifier; --model '
                     'names a trained one: give one of them')
  return ErasureComparisonConfig(
      split=args.split, max_tokens=args.max_tokens,
      num_sentences=None if not args.sentences else args.sentences,
      max_evaluations=args.max_evaluations, seeds=tuple(args.seeds), steps=args.steps,
      margin=args.margin, learning_rate=args.learning_rate, samples=args.samples,
      initial_logit=args.initial_logit, sparsity=args.sparsity, logit_bound=args.logit_bound,
      flip_penalty=args.flip_penalty,
      model_epochs=args.model_epochs, own_objective=not args.no_own_objective,
      reinforce_reward=args.reinforce_reward, baseline_decay=args.baseline_decay,
      pretrained_embeddings=args.pretrained_embeddings)


def run_from_args(args: argparse.Namespace) -> dict:
  """Builds the config from ``args`` and runs :func:`run_compare_erasure`.

  A missing SST file or model folder is a one-line ``ValueError``.
  """
  try:
    return run_compare_erasure(config_from_args(args), args.out, model_dir=args.model,
                               data_dir=args.data_dir, progress=not args.no_progress,
                               command=command_line(args))
  except FileNotFoundError as error:
    raise ValueError(str(error)) from None
