"""``dmx explain``: what a trained DiffMask probe keeps of one sentence, depth by depth.

Given a probe checkpoint written by ``dmx diffmask sst`` (the ``probe_<gate>/``
folder, or the run folder holding exactly one of them) and a sentence, this
runs the frozen model once and the probe once: no optimisation. The result is
the keep probability ``P(z != 0)`` of every token at every depth ``h0..h_{L+1}``
(input gates: the product of the votes up to that depth, so it never grows with
depth; hidden gates: each depth's own gate), the model's prediction, and for
input gates the tokens the deterministic gates mask at the deepest depth.

The probe's metadata names the model folder it was trained on; ``--model``
overrides it when the folder has moved. Only SST classifiers are supported; a
SQuAD probe is refused with a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from dmx import attribute, checkpoint, probes, train, viz
from dmx.data import sst as sst_data
from dmx.models.hf_import import load_pretrained, tokenize
from dmx.pipelines.diffmask_text import state_names

PROBE_PREFIX = 'probe_'
SUPPORTED_TASKS = ('sst',)


class Explanation(NamedTuple):
  """The probe's reading of one sentence.

  Attributes:
    tokens: the ``seq`` wordpieces, special tokens included.
    keep_prob: ``(num_states, seq)`` keep probability of each token at each depth.
    gates: ``(num_states, seq)`` deterministic (median) gates; 0 means masked.
    state_names: ``num_states`` display names, ``h0 words`` first.
    prediction: the clean model's predicted label.
    probabilities: ``(num_labels,)`` the clean model's softmax.
    label_names: a name per label.
    gate: ``'input'`` or ``'hidden'``.
    task: the probe's task (``'sst'``).
  """
  tokens: list[str]
  keep_prob: np.ndarray
  gates: np.ndarray
  state_names: list[str]
  prediction: int
  probabilities: np.ndarray
  label_names: list[str]
  gate: str
  task: str


def find_probe_folder(path: str | Path) -> Path:
  """The probe checkpoint folder: ``path`` itself, or its single ``probe_*`` subfolder.

  Raises ValueError (one line) when ``path`` is missing, or is a run folder
  holding no probe or several.
  """
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise ValueError(f'--probe {path}: folder does not exist')
  if (folder / 'metadata.json').is_file():
    return folder
  # '.saving' / '.previous' are checkpoint.save's staging copies, not probes
  candidates = sorted(child for child in folder.glob(f'{PROBE_PREFIX}*')
                      if child.is_dir() and (child / 'metadata.json').is_file()
                      and not child.name.endswith(('.saving', '.previous')))
  if not candidates:
    raise ValueError(f'--probe {path}: no probe checkpoint here (expected a probe_<gate> folder '
                     'written by dmx diffmask, or the run folder holding one)')
  if len(candidates) > 1:
    names = ', '.join(child.name for child in candidates)
    raise ValueError(f'--probe {path}: several probes here ({names}); pass one of them')
  return candidates[0]


def diffmask_config_from_metadata(metadata: dict) -> train.DiffMaskConfig:
  """The trainer's config from the metadata (JSON turned tuples into lists)."""
  known = {field.name for field in dataclasses.fields(train.DiffMaskConfig)}
  values = {name: tuple(value) if isinstance(value, list) else value
            for name, value in metadata.get('diffmask_config', {}).items() if name in known}
  values['gate'] = metadata['gate']
  return train.DiffMaskConfig(**values)


def load_probe(probe_dir: str | Path) -> tuple[probes.DiffMaskProbe, dict, dict, Path]:
  """``(probe, probe_params, metadata, folder)`` of the checkpoint at (or under) ``probe_dir``."""
  folder = find_probe_folder(probe_dir)
  try:
    metadata = checkpoint.read_metadata(folder)
  except checkpoint.CheckpointError as error:
    raise ValueError(str(error)) from None
  missing = [key for key in ('task', 'gate', 'form', 'hidden_size', 'state_dims', 'model')
             if key not in metadata]
  if missing:
    raise ValueError(f'--probe {folder}: not a dmx diffmask probe (metadata lacks '
                     f'{", ".join(missing)})')
  if metadata['task'] not in SUPPORTED_TASKS:
    raise ValueError(f'--probe {folder}: a {metadata["task"]} probe; dmx explain supports '
                     f'{", ".join(SUPPORTED_TASKS)} classifiers only (SQuAD is not supported yet)')
  state_dims = tuple(int(dim) for dim in metadata['state_dims'])
  probe = probes.DiffMaskProbe(gate=metadata['gate'], state_dims=state_dims, form=metadata['form'],
                               hidden_size=int(metadata['hidden_size']),
                               weight_norm=bool(metadata.get('weight_norm', False)),
                               initial_logit=float(metadata.get('initial_logit', 5.0)))
  # restore needs the structure and shapes only; a one-token batch gives them
  dummy_states = [np.zeros((1, 1, dim), np.float32) for dim in state_dims]
  target = probe.init(jax.random.key(0), dummy_states)
  try:
    probe_params = checkpoint.restore(folder, target)
  except checkpoint.CheckpointError as error:
    raise ValueError(f'--probe {folder}: {error}'.splitlines()[0]) from None
  return probe, probe_params, metadata, folder


def load_model(metadata: dict, model: str | Path | None = None):
  """``(model, params, tokenizer)`` the probe was trained on (``model`` overrides the path)."""
  path = Path(model if model is not None else metadata['model']).expanduser()
  if not path.is_dir():
    if model is not None:
      raise ValueError(f'--model {model}: model folder does not exist')
    raise ValueError(f'the probe\'s model folder {path} does not exist (moved?); '
                     'pass --model DIR to point at it')
  # a random head would differ from the one the probe was trained against: refuse it
  frozen_model, params, tokenizer = load_pretrained(
      path, head=metadata.get('head', 'classification'), random_head=False)
  if tokenizer is None:
    raise ValueError(f'--model {path}: the folder has no tokenizer')
  if tuple(frozen_model.state_dims) != tuple(metadata['state_dims']):
    raise ValueError(f'--model {path}: states {list(frozen_model.state_dims)} do not match the '
                     f'probe\'s {list(metadata["state_dims"])} (a different model?)')
  return frozen_model, params, tokenizer


def explain(probe_dir: str | Path, sentence: str, model: str | Path | None = None) -> Explanation:
  """Keep probabilities of every token of ``sentence`` at every depth, from one forward pass.

  Args:
    probe_dir: a ``probe_<gate>`` checkpoint folder written by ``dmx diffmask sst``, or the
      run folder holding exactly one.
    sentence: the text to explain (tokenised as ``[CLS] sentence [SEP]``).
    model: the model folder, when it is no longer where the probe's metadata says.

  Returns:
    An :class:`Explanation`; ``keep_prob`` and ``gates`` are ``(num_states, seq)``.

  Raises:
    ValueError (one line): missing probe or model folder, a SQuAD probe, an empty
    sentence, or one longer than the probe's ``max_length`` or the model's positions.
  """
  if not sentence.strip():
    raise ValueError('the sentence is empty')
  probe, probe_params, metadata, _ = load_probe(probe_dir)
  frozen_model, frozen_params, tokenizer = load_model(metadata, model)
  batch = tokenize(tokenizer, [sentence])
  length = batch['input_ids'].shape[1]
  limits = [('the model', frozen_model.config.max_sequence_length)]
  if metadata.get('max_length'):
    limits.append(('the probe\'s max_length', int(metadata['max_length'])))
  for what, limit in limits:
    if length > limit:
      raise ValueError(f'the sentence has {length} tokens (special tokens included) but {what} '
                       f'allows {limit}; shorten it')
  dm_config = diffmask_config_from_metadata(metadata)
  result = jax.device_get(attribute.attribute(frozen_model, frozen_params, probe, probe_params,
                                              dm_config, batch))
  logits = np.asarray(result.outputs[0], np.float64)
  probabilities = np.exp(logits - logits.max())
  probabilities /= probabilities.sum()
  num_labels = probabilities.shape[-1]
  label_names = (list(sst_data.LABEL_NAMES) if num_labels == sst_data.NUM_CLASSES
                 else [f'label {k}' for k in range(num_labels)])
  return Explanation(
      tokens=tokenizer.convert_ids_to_tokens(batch['input_ids'][0].tolist()),
      keep_prob=np.asarray(result.keep_prob[:, 0], np.float32),
      gates=np.asarray(result.gates[:, 0], np.float32),
      state_names=state_names(len(probe.state_dims)), prediction=int(probabilities.argmax()),
      probabilities=probabilities.astype(np.float32), label_names=label_names,
      gate=metadata['gate'], task=metadata['task'])


def format_explanation(explanation: Explanation) -> str:
  """A table (tokens as rows, depths as columns, keep probabilities to 2 decimals) and a summary."""
  e = explanation
  token_width = max(len('token'), *(len(token) for token in e.tokens))
  column_width = max(5, *(len(name) for name in e.state_names))
  header = 'token'.ljust(token_width) + ''.join(f'  {name:>{column_width}}'
                                                for name in e.state_names)
  lines = [f'DiffMask {e.gate} gates ({e.task}): keep probability of each token at each depth',
           header, '-' * len(header)]
  for position, token in enumerate(e.tokens):
    lines.append(token.ljust(token_width) + ''.join(
        f'  {e.keep_prob[depth, position]:>{column_width}.2f}'
        for depth in range(len(e.state_names))))
  lines.append(f'prediction: {e.prediction} ({e.label_names[e.prediction]}); probabilities ' +
               ', '.join(f'{label}: {p:.2f}' for label, p in enumerate(e.probabilities)))
  deepest = e.gates[-1] == 0
  if e.gate == 'input':
    masked = [token for token, closed in zip(e.tokens, deepest) if closed]
    lines.append(f'masked at the deepest depth {e.state_names[-1]}: {len(masked)} of '
                 f'{len(e.tokens)} tokens' + (f': {" ".join(masked)}' if masked else ''))
  else:
    counts = ', '.join(f'{name} {int((e.gates[depth] == 0).sum())}'
                       for depth, name in enumerate(e.state_names))
    lines.append(f'hidden states masked per depth (of {len(e.tokens)}): {counts}')
  return '\n'.join(lines)


def plot_explanation(explanation: Explanation, path: str | Path | None = None):
  """The tokens x depths heatmap of ``explanation``; saved to ``path`` (and closed) when given."""
  e = explanation
  what = 'input tokens' if e.gate == 'input' else 'hidden states'
  title = f'prediction {e.prediction} ({e.label_names[e.prediction]})'
  fig = viz.keep_probability_heatmaps(e.keep_prob[:, None, :], [e.tokens], e.state_names,
                                      [title], suptitle=f'DiffMask {e.gate} gates: keep '
                                      f'probability of {what} at each depth')
  if path is not None:
    viz.save_figure(fig, path)
  return fig


# ---------------------------------------------------------------------------
# Command-line adapter (``dmx explain``)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the options of ``dmx explain`` to ``parser``."""
  parser.add_argument('sentence', help='the sentence to explain')
  parser.add_argument('--probe', required=True,
                      help='probe_<gate> folder written by dmx diffmask sst, or its run folder')
  parser.add_argument('--model', default=None,
                      help='the fine-tuned model folder (default: the one in the probe metadata)')
  parser.add_argument('--out', default=None,
                      help='heatmap PNG to write (default explain_<gate>.png here)')
  parser.add_argument('--no-plot', action='store_true', help='print the table only')


def run_from_args(args: argparse.Namespace) -> int:
  """Runs ``dmx explain``: prints the table and writes the heatmap; returns the exit code 0.

  Bad input raises ValueError with a one-line message.
  """
  out = None
  if not args.no_plot and args.out is not None:
    out = Path(args.out)
    if out.suffix.lower() != '.png':
      raise ValueError(f'--out {args.out}: expected a .png file name')
    if out.parent.exists() and not out.parent.is_dir():
      raise ValueError(f'--out {args.out}: {out.parent} is not a folder')
  explanation = explain(args.probe, args.sentence, model=args.model)
  print(format_explanation(explanation))
  if not args.no_plot:
    out = out or Path(f'explain_{explanation.gate}.png')
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_explanation(explanation, out)
    print(f'wrote {out}')
  return 0
