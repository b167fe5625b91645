"""``dmx sweep toy|sst``: K DiffMask probes that differ in seed in one program, and what it saves.

``dmx sweep sst`` (:func:`run_sst_sweep`) is the paper's stability experiment
(the spread of attributions over 5 seeds) on a fine-tuned SST-5 classifier,
with ``dmx diffmask sst``'s options; ``dmx sweep toy``:

1. generate the toy data and train (or reuse) the toy classifier exactly as
   ``dmx toy`` does (same seed, same checkpoint folder layout),
2. for each gate, train K probes that differ in seed (and optionally margin)
   with :func:`dmx.sweep.fit_sweep`: one compiled, ``vmap``-ed step,
3. unless ``--no-separate``, train the same K probes one after another with
   :func:`dmx.train.fit` on the same batches, key streams and (by default
   shared) depth schedule, to measure the
   cost of K separate runs and to check that each sweep member trains like
   its separate run,
4. write ``report.json``: the spread of attributions across seeds (std over
   members of each token's keep probability, mean over validation tokens,
   the paper's stability number), per-member D_KL / D_JS against the ground
   truth at the feed-forward state, and the wall time of both ways.
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

from dmx import metrics, probes, sweep, train
from dmx.data.common import bucketed_batches, endless_batches
from dmx.data.toy import generate_toy_data, ground_truth_attribution, split_toy_data
from dmx.models.toy import STATE_NAMES, accuracy
from dmx.pipelines import checked_output_folder, diffmask_text, jsonable
from dmx.pipelines import toy as toy_pipeline


@dataclasses.dataclass(frozen=True)
class ToySweepConfig:
  """What ``dmx sweep toy`` runs.

  Attributes:
    toy: the toy experiment whose classifier the probes explain.
    seeds: one member per seed.
    margins: optional margin per member (``None``: the toy margin for all).
    gates: the gate types to sweep.
    steps: DiffMask steps per member (``None``: ``toy.diffmask_steps``).
    separate: also train the members one by one, for the cost comparison.
    data_seed: seeds the shared batch order.
    shared_depths: the members train the same depth at each step, drawn with
      ``depth_seed`` (:mod:`dmx.sweep`: one program then costs less than K
      runs for hidden gates too); ``False``: each member draws its own.
    depth_seed: seeds the shared depth schedule.
  """
  toy: toy_pipeline.ToyExperimentConfig = toy_pipeline.ToyExperimentConfig()
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  margins: tuple[float, ...] | None = None
  gates: tuple[str, ...] = ('input', 'hidden')
  steps: int | None = None
  separate: bool = True
  data_seed: int = 1
  shared_depths: bool = True
  depth_seed: int = 2

  def __post_init__(self):
    if len(self.seeds) < 2:
      raise ValueError(f'a sweep needs at least 2 seeds, got {list(self.seeds)}')
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'seeds must be distinct, got {list(self.seeds)}')
    if self.margins is not None:
      if len(self.margins) != len(self.seeds):
        raise ValueError(f'{len(self.margins)} margins for {len(self.seeds)} seeds: give one each')
      if any(not margin >= 0 for margin in self.margins):
        raise ValueError(f'margins must be >= 0, got {list(self.margins)}')
    if not self.gates or any(gate not in probes.GATES for gate in self.gates):
      raise ValueError(f'gates must be among {probes.GATES}, got {list(self.gates)}')
    if self.steps is not None and self.steps < 1:
      raise ValueError(f'steps must be >= 1, got {self.steps}')

  @property
  def num_steps(self) -> int:
    return self.toy.diffmask_steps if self.steps is None else self.steps


def run_toy_sweep(config: ToySweepConfig, out_dir: str | Path, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
  """Runs the sweep for every gate in ``config.gates``; writes and returns ``report.json``."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  toy = config.toy
  data = generate_toy_data(toy.seed, toy.num_examples, toy.max_length)
  train_data, validation = split_toy_data(data, toy.validation_fraction)
  model, frozen_params, _ = toy_pipeline.load_or_train_model(toy, train_data,
                                                             out_dir / 'toy_model', progress, log)
  log(f'toy model validation accuracy: {accuracy(model, frozen_params, validation):.4f}')
  reference = ground_truth_attribution(validation)
  val_batch = validation.as_batch()
  seeds = list(config.seeds)
  report = {'task': 'toy', 'seeds': seeds,
            'margins': None if config.margins is None else list(config.margins),
            'steps': config.num_steps, 'devices': [str(device) for device in jax.devices()],
            'depths': 'shared' if config.shared_depths else 'independent', 'gates': {}}
  depth_key = jax.random.key(config.depth_seed) if config.shared_depths else None
  for gate in config.gates:
    dm_config = toy_pipeline.toy_diffmask_config(gate, toy.sparsity)
    probe = probes.DiffMaskProbe(gate=gate, state_dims=model.state_dims, form=toy.probe_form,
                                 hidden_size=toy.probe_hidden_size)
    batches = lambda: endless_batches(train_data, toy.diffmask_batch_size, config.data_seed)
    first_batch = next(batches())

    started = time.perf_counter()
    states = sweep.init_sweep(model, frozen_params, probe, dm_config, first_batch, seeds)
    states, _ = sweep.fit_sweep(model, frozen_params, probe, dm_config, states, batches(),
                                config.num_steps, seeds, margins=config.margins,
                                depth_key=depth_key, progress=progress,
                                description=f'sweep {gate} x{len(seeds)}')
    jax.block_until_ready(states)
    sweep_seconds = time.perf_counter() - started
    keep_probs = sweep.sweep_keep_probs(model, frozen_params, probe, dm_config, states, val_batch)
    spread = sweep.attribution_spread(keep_probs, validation.mask)
    members = [_member_scores(reference, keep_probs[index], validation.mask, seed)
               for index, seed in enumerate(seeds)]
    gate_report = dict(
        std_of_attributions=spread['std'],
        std_per_state=dict(zip(STATE_NAMES, spread['std_per_state'])),
        members=members, sweep_seconds=sweep_seconds)

    if config.separate:
      started = time.perf_counter()
      separate_states = []
      for index, seed in enumerate(seeds):
        member_config = dm_config if config.margins is None else dataclasses.replace(
            dm_config, margin=float(config.margins[index]))
        probe_key, run_key = sweep.member_keys(seed)
        params = train.init_probe_params(probe_key, model, probe, frozen_params, first_batch)
        state = train.init_state(member_config, params, len(model.state_dims))
        state, _ = train.fit(model, frozen_params, probe, member_config, state, batches(),
                             config.num_steps, run_key, progress=progress,
                             description=f'separate {gate} seed {seed}', depth_key=depth_key)
        jax.block_until_ready(state)
        separate_states.append(state)
      separate_seconds = time.perf_counter() - started
      # stacked like a sweep's members: one clean pass scores every separate run
      separate_keep = sweep.sweep_keep_probs(model, frozen_params, probe, dm_config,
                                             sweep.stack_members(separate_states), val_batch)
      difference = np.abs(separate_keep - keep_probs)
      gate_report.update(
          separate_seconds=separate_seconds,
          sweep_cost_relative_to_separate=sweep_seconds / separate_seconds,
          max_keep_prob_difference_sweep_vs_separate=float(difference.max()),
          mean_keep_prob_difference_sweep_vs_separate=float(difference.mean()))
    report['gates'][gate] = gate_report
    log(format_gate(gate, gate_report, len(seeds)))
  (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
  return report


def _member_scores(reference: np.ndarray, keep_prob: np.ndarray, mask: np.ndarray,
                   seed: int) -> dict:
  """D_KL / D_JS of one member's feed-forward attribution against the ground truth."""
  scores = metrics.attribution_divergences(reference, keep_prob[toy_pipeline.FEEDFORWARD_STATE],
                                           mask)
  return dict(seed=seed, kl=scores['kl'], js=scores['js'],
              mean_keep_prob=float(keep_prob[:, mask.astype(bool)].mean()))


def format_gate(gate: str, report: dict, num_members: int) -> str:
  """A few lines per gate: spread, per-member scores, the cost of both ways."""
  lines = [f'{gate} gates, {num_members} seeds: std of attributions across seeds '
           f'{report["std_of_attributions"]:.4f} (per state: ' +
           ', '.join(f'{name} {value:.4f}' for name, value in report['std_per_state'].items()) +
           ')']
  lines += [f'  seed {m["seed"]}: D_KL {m["kl"]:.4f}  D_JS {m["js"]:.4f}' for m in
            report['members']]
  lines.append(f'  one program: {report["sweep_seconds"]:.1f} s')
  if 'separate_seconds' in report:
    lines.append(f'  {num_members} separate runs: {report["separate_seconds"]:.1f} s '
                 f'(sweep costs {report["sweep_cost_relative_to_separate"]:.2f}x; largest '
                 f'keep-probability difference member vs its separate run '
                 f'{report["max_keep_prob_difference_sweep_vs_separate"]:.2e})')
  return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx sweep toy``."""
  defaults = ToySweepConfig()
  parser.add_argument('--out', required=True, help='output folder (created if missing)')
  parser.add_argument('--seeds', type=int, nargs='+', default=list(defaults.seeds),
                      help='one probe per seed (default 0 1 2 3 4)')
  parser.add_argument('--margins', type=float, nargs='+', default=None,
                      help='one margin per seed (default: the toy margin 0.05 for all)')
  parser.add_argument('--gate', choices=probes.GATES + ('both',), default='both')
  parser.add_argument('--steps', type=int, default=None,
                      help=f'DiffMask steps per member (default {defaults.toy.diffmask_steps})')
  parser.add_argument('--toy-seed', type=int, default=defaults.toy.seed,
                      help='seed of the toy data and classifier (as dmx toy --seed)')
  parser.add_argument('--no-separate', action='store_true',
                      help='skip the K separate runs (no cost comparison)')
  parser.add_argument('--independent-depths', action='store_true',
                      help='each member samples its own depth at each step (default: one '
                      'depth per step for all members; cheaper for hidden gates)')
  parser.add_argument('--tiny', action='store_true', help='a seconds-long smoke run')
  parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def config_from_args(args: argparse.Namespace) -> ToySweepConfig:
  """The sweep's config from parsed options; ValueError on bad values."""
  toy_config = (toy_pipeline.ToyExperimentConfig.tiny(seed=args.toy_seed) if args.tiny
                else toy_pipeline.ToyExperimentConfig(seed=args.toy_seed))
  gates: Sequence[str] = probes.GATES if args.gate == 'both' else (args.gate,)
  return ToySweepConfig(toy=toy_config, seeds=tuple(args.seeds),
                        margins=None if args.margins is None else tuple(args.margins),
                        gates=tuple(gates), steps=args.steps, separate=not args.no_separate,
                        shared_depths=not args.independent_depths)


# ---------------------------------------------------------------------------
# ``dmx sweep sst``: the paper's 5-seed stability experiment on a fine-tuned classifier

SST_CHECKPOINT = 'sweep_checkpoint'
SST_DEPTH_SEED = 2  # seeds the depth schedule the members share, as ToySweepConfig.depth_seed


TIMING_WARMUP = 2  # untimed steps (compilation) before each timing


def _time_steps(step_fn, states, arguments, num_steps: int) -> float:
  """Seconds per step of ``step_fn(states, *arguments(t))`` after ``TIMING_WARMUP`` untimed steps.

  Runs on a copy of ``states`` (the step donates it); the results are dropped.
  """
  states = jax.tree_util.tree_map(jnp.copy, states)
  for step in range(TIMING_WARMUP):
    states, _ = step_fn(states, *arguments(step))
  jax.block_until_ready(states)
  started = time.perf_counter()
  for step in range(TIMING_WARMUP, TIMING_WARMUP + num_steps):
    states, _ = step_fn(states, *arguments(step))
  jax.block_until_ready(states)
  return (time.perf_counter() - started) / num_steps


def run_sst_sweep(config, seeds: Sequence[int], out_dir: str | Path, *, timing_steps: int = 10,
                  shared_depths: bool = True, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
  """K probes of ``dmx diffmask sst`` that differ in seed, trained in one program; the spread.

  Args:
    config: a :class:`dmx.pipelines.diffmask_text.TextDiffMaskConfig` for
      ``task='sst'``: the model, data, gate and training settings every member
      shares; its ``seed`` seeds the shared batch order.
    seeds: one member per seed (probe initialisation and gate noise, as
      ``dmx diffmask sst --seed``; the members share the batches, so a member
      is not the run ``dmx diffmask sst`` makes with its seed).
    timing_steps: after training, time this many steps of the sweep program
      and of each member alone (copies of the trained states, results
      dropped), for the cost against K separate runs; 0 skips it.
    shared_depths: one depth per step for all members (see :mod:`dmx.sweep`).

  Writes ``report.json``: the spread of attributions across seeds (per
  state and its mean: the paper's stability number, 0.0553 input / 0.0302
  hidden for BERT-base), every member's headline numbers as ``dmx diffmask
  sst`` reports them, and the timing. The stacked train state is saved to
  ``OUT/sweep_checkpoint`` every ``config.checkpoint_every`` steps: rerun the
  same command to resume.
  """
  if config.task != 'sst':
    raise ValueError(f'dmx sweep sst needs an SST config, got task {config.task!r}')
  if len(seeds) < 2 or len(set(seeds)) != len(seeds):
    raise ValueError(f'a sweep needs at least 2 distinct seeds, got {list(seeds)}')
  if timing_steps < 0:
    raise ValueError(f'--timing-steps must be >= 0, got {timing_steps}')
  out_dir = Path(out_dir)
  started = time.time()
  model, frozen_params, tokenizer = diffmask_text.load_frozen_model(config, log)
  train_features, _, eval_features = diffmask_text.load_task_data(config, tokenizer)
  batch_size = min(config.batch_size, len(train_features))
  out_dir.mkdir(parents=True, exist_ok=True)
  log(f'sst: {len(train_features)} training and {len(eval_features)} evaluation sequences; '
      f'{len(seeds)} members, {config.gate} gates, {config.steps} steps')
  dm_config = config.diffmask_config()
  probe = diffmask_text.make_probe(config, model)
  buckets = diffmask_text.training_buckets(config, model, frozen_params, train_features,
                                           batch_size, log, progress)
  batches = bucketed_batches(buckets, batch_size, config.seed)
  first_batch = next(batches)
  states = sweep.init_sweep(model, frozen_params, probe, dm_config, first_batch, seeds,
                            baselines=diffmask_text.initial_baselines(
                                config, model, frozen_params, tokenizer, first_batch))
  depth_key = jax.random.key(SST_DEPTH_SEED) if shared_depths else None
  train_started = time.perf_counter()
  states, _ = sweep.fit_sweep(
      model, frozen_params, probe, dm_config, states, batches, config.steps, seeds,
      depth_key=depth_key, progress=progress, description=f'sweep sst {config.gate} '
      f'x{len(seeds)}', checkpoint_dir=out_dir / SST_CHECKPOINT,
      checkpoint_every=config.checkpoint_every,
      run_info=diffmask_text.resume_fingerprint(config),
      retired_run_info=diffmask_text.TRAINER_CHECKED_FIELDS)
  jax.block_until_ready(states)
  train_seconds = time.perf_counter() - train_started

  evaluator = diffmask_text.make_evaluator(model, frozen_params, probe, dm_config)
  keep_probs, members = [], []
  for index, seed in enumerate(seeds):
    result = diffmask_text.run_evaluation(evaluator, sweep.member(states, index).probe_params,
                                          eval_features, config.eval_batch_size)
    keep_probs.append(result['keep_prob'])
    scores = diffmask_text.sst_scores(result, eval_features, config.gate, config.layers)
    members.append(dict(seed=int(seed), **{name: scores[name] for name in (
        'masked_fraction', 'agreement', 'macro_f1_original', 'macro_f1_masked')}))
  spread = sweep.attribution_spread(np.stack(keep_probs), eval_features.mask)
  names = diffmask_text.state_names(len(model.state_dims))
  report = dict(task='sst', gate=config.gate, seeds=[int(seed) for seed in seeds],
                depths='shared' if shared_depths else 'independent',
                std_of_attributions=spread['std'],
                std_per_state=dict(zip(names, spread['std_per_state'])),
                paper_std_of_attributions={'input': 0.0553, 'hidden': 0.0302}[config.gate],
                members=members, config=jsonable(dataclasses.asdict(config)),
                timing=dict(train_seconds=train_seconds))

  if timing_steps:
    # one training batch; keys made before the clock starts, so both ways time only their steps
    timing_batch = next(bucketed_batches(buckets, batch_size, config.seed))
    base_keys = jnp.stack([sweep.member_keys(seed)[1] for seed in seeds])
    step_keys = [jax.vmap(jax.random.fold_in, in_axes=(0, None))(base_keys, step)
                 for step in range(TIMING_WARMUP + timing_steps)]
    sweep_step = sweep.make_sweep_step(model, probe, dm_config)
    sweep_seconds = _time_steps(
        sweep_step, states,
        lambda step: (frozen_params, timing_batch, step_keys[step], depth_key), timing_steps)
    single_step = jax.jit(train.make_train_step(model, probe, dm_config), donate_argnums=0)
    separate_seconds = sum(
        _time_steps(single_step, sweep.member(states, index),
                    lambda step, index=index: (frozen_params, timing_batch,
                                               step_keys[step][index], None, None, depth_key),
                    timing_steps)
        for index in range(len(seeds)))
    report['timing'].update(
        timing_steps=timing_steps, timing_sequence_length=int(timing_batch['mask'].shape[1]),
        sweep_seconds_per_step=sweep_seconds, separate_seconds_per_step=separate_seconds,
        sweep_cost_relative_to_separate=sweep_seconds / separate_seconds)
  report['timing']['total_seconds'] = time.time() - started
  (out_dir / 'report.json').write_text(json.dumps(jsonable(report), indent=2))
  log(format_sst_sweep(report))
  return report


def format_sst_sweep(report: dict) -> str:
  """The spread, each member's headline numbers and the cost, a few lines."""
  per_state = ', '.join(f'{name} {value:.4f}' for name, value in report['std_per_state'].items())
  lines = [f"{report['gate']} gates, {len(report['seeds'])} seeds ({report['depths']} depths): "
           f"std of attributions across seeds {report['std_of_attributions']:.4f} "
           f"(paper, BERT-base: {report['paper_std_of_attributions']}); per state: {per_state}"]
  for member_report in report['members']:
    lines.append(f"  seed {member_report['seed']}: masked {member_report['masked_fraction']:.3f}, "
                 f"agreement {member_report['agreement']:.3f}, macro-F1 "
                 f"{member_report['macro_f1_original']:.3f} -> "
                 f"{member_report['macro_f1_masked']:.3f}")
  timing = report['timing']
  lines.append(f"  training: {timing['train_seconds']:.1f} s")
  if 'sweep_seconds_per_step' in timing:
    lines.append(f"  one step: {timing['sweep_seconds_per_step']:.3f} s for all members, "
                 f"{timing['separate_seconds_per_step']:.3f} s for {len(report['seeds'])} "
                 f"separate steps (sweep costs {timing['sweep_cost_relative_to_separate']:.2f}x)")
  return '\n'.join(lines)


def add_sst_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``dmx sweep sst``: ``dmx diffmask sst``'s, plus the members."""
  diffmask_text.add_arguments(parser, 'sst')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4],
                      help='one probe per seed (default 0 1 2 3 4); --seed orders the batches')
  parser.add_argument('--timing-steps', type=int, default=10,
                      help='steps timed for the cost against K separate runs (0: skip)')
  parser.add_argument('--independent-depths', action='store_true',
                      help='each member samples its own depth at each step')


def run_sst_from_args(args: argparse.Namespace) -> dict:
  """Runs ``dmx sweep sst`` from parsed options; ValueError (one line) on bad input."""
  config = diffmask_text.config_from_args(args, 'sst')
  return run_sst_sweep(config, tuple(args.seeds), checked_output_folder(args.out),
                       timing_steps=args.timing_steps,
                       shared_depths=not args.independent_depths, progress=not args.no_progress)
