"""Tests for dmx.models.bert and dmx.models.hf_import.

Parity with transformers' PyTorch BERT / RoBERTa (random tiny models with
padding in the batch, and the real all-MiniLM-L6-v2 weights), the resumed
pass ``forward_from`` (identity, one compilation for every depth, gradients,
no influence from states outside the injection point), the QA head's -inf
padding, bfloat16, and every loader error.
"""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx import objective, probes
from dmx.models import bert as bert_lib
from dmx.models import hf_import
from dmx.models.bert import BertConfig, BertModel
from dmx.models.hf_import import ModelLoadError, load_pretrained

PARITY_TOLERANCE = 1e-4
PADDING_TOLERANCE = 1e-3
LENGTHS = (10, 7, 4)  # a full row and two padded rows
MINILM_SENTENCES = (
    'DiffMask learns which tokens a frozen model can do without.',
    'The movie was surprisingly good.',
    'Short one.',
)
identity = lambda index, state: state


def padded_batch(vocab_size: int, pad_token_id: int, lengths=LENGTHS, seed: int = 0,
                 token_types: bool = True) -> dict[str, np.ndarray]:
  """Random ids (never the pad id) with trailing padding: ``(batch, max(lengths))`` each."""
  rng = np.random.default_rng(seed)
  seq_len = max(lengths)
  mask = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
  input_ids = rng.integers(pad_token_id + 1, vocab_size, (len(lengths), seq_len))
  batch = {'input_ids': np.where(mask, input_ids, pad_token_id).astype(np.int32), 'mask': mask}
  if token_types:
    batch['token_type_ids'] = (rng.integers(0, 2, mask.shape) * mask).astype(np.int32)
  return batch


# ---------------------------------------------------------------------------
# Parity with transformers (PyTorch)


def tiny_hf_model(architecture: str):
  """A random tiny transformers model with every weight (LayerNorm, biases too) perturbed."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  sizes = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, num_labels=2 if 'QuestionAnswering' in architecture else 3)
  if architecture.startswith('Roberta'):
    # RoBERTa: pad 1, positions from 2, one token type, tanh GELU for activation coverage
    config = transformers.RobertaConfig(max_position_embeddings=42, type_vocab_size=1,
                                        pad_token_id=1, hidden_act='gelu_new', **sizes)
  else:
    config = transformers.BertConfig(max_position_embeddings=40, **sizes)
  torch.manual_seed(0)
  model = getattr(transformers, architecture)(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  return model


def parity_errors(torch_model, model: BertModel, params, batch) -> dict[str, float]:
  """Max |dmx - transformers| over real tokens for ``h0..h_{L+1}`` and the outputs.

  ``'padding'`` holds the max over padded positions of every state.
  """
  import torch

  as_torch = lambda name: torch.as_tensor(np.asarray(batch[name], np.int64))
  inputs = dict(input_ids=as_torch('input_ids'), attention_mask=as_torch('mask'))
  if 'token_type_ids' in batch:
    inputs['token_type_ids'] = as_torch('token_type_ids')
  with torch.no_grad():
    reference = torch_model(**inputs, output_hidden_states=True)
    word_embedded = torch_model.base_model.embeddings.word_embeddings(inputs['input_ids'])
  # accelerators may run float32 matmuls in TF32 / bf16 passes by default; parity wants full float32
  with jax.default_matmul_precision('float32'):
    outputs, states = jax.jit(model.forward)(params, batch)
  # HF's hidden_states[0] is the embedding output, our h1; our h0 is the raw lookup
  references = [word_embedded] + list(reference.hidden_states)
  mask = np.asarray(batch['mask'], bool)
  differences = [np.abs(np.asarray(state) - expected.numpy())
                 for state, expected in zip(states, references, strict=True)]
  errors = {f'h{k}': float(difference[mask].max()) for k, difference in enumerate(differences)}
  # States at padded positions feed nothing (their keys are masked) and are
  # ill-conditioned in deep layers: transformers' own eager and sdpa attention
  # differ there by ~5e-5 on MiniLM. They get a looser, separate check.
  errors['padding'] = float(max(difference[~mask].max() for difference in differences))
  if model.config.head == 'classification':
    errors['logits'] = float(np.max(np.abs(np.asarray(outputs) - reference.logits.numpy())))
  elif model.config.head == 'question_answering':
    expected = np.stack([reference.start_logits.numpy(), reference.end_logits.numpy()], axis=1)
    real = np.broadcast_to(mask[:, None, :], expected.shape)
    errors['logits'] = float(np.max(np.abs(np.asarray(outputs)[real] - expected[real])))
    assert np.all(np.isneginf(np.asarray(outputs)[~real]))
  else:
    difference = np.abs(np.asarray(outputs) - reference.last_hidden_state.numpy())
    errors['outputs'] = float(difference[mask].max())
  return errors


def assert_parity(errors: dict[str, float]) -> None:
  """Real tokens and logits within 1e-4; padded positions' states within 1e-3."""
  assert errors['padding'] <= PADDING_TOLERANCE, errors
  real_token_errors = [value for name, value in errors.items() if name != 'padding']
  assert max(real_token_errors) <= PARITY_TOLERANCE, errors


@pytest.mark.parametrize('architecture, expected_head', [
    ('BertModel', None),
    ('BertForSequenceClassification', 'classification'),
    ('BertForQuestionAnswering', 'question_answering'),
    ('RobertaModel', None),
    ('RobertaForSequenceClassification', 'classification'),
    ('RobertaForQuestionAnswering', 'question_answering'),
])
def test_parity_with_transformers(architecture, expected_head, tmp_path):
  torch_model = tiny_hf_model(architecture)
  torch_model.save_pretrained(tmp_path)
  assert (tmp_path / 'model.safetensors').is_file()
  with pytest.warns(UserWarning, match='no tokenizer'):
    model, params, tokenizer = load_pretrained(tmp_path, head='auto')
  assert tokenizer is None
  assert model.config.head == expected_head
  assert len(model.state_dims) == 4  # 2 layers: h0, h1 (embeddings), h2, h3
  is_roberta = architecture.startswith('Roberta')
  if is_roberta:
    assert (model.config.position_offset, model.config.classifier_style) == (2, 'roberta')
  batch = padded_batch(99, torch_model.config.pad_token_id, token_types=not is_roberta)
  errors = parity_errors(torch_model, model, params, batch)
  print(f'{architecture}: max |dmx - transformers| = {errors}')
  assert_parity(errors)


def test_parity_from_pytorch_bin(tmp_path):
  torch = pytest.importorskip('torch')
  torch_model = tiny_hf_model('BertForSequenceClassification')
  torch_model.config.save_pretrained(tmp_path)
  torch.save(torch_model.state_dict(), tmp_path / 'pytorch_model.bin')
  model, params, _ = load_pretrained(tmp_path, head='classification', with_tokenizer=False)
  errors = parity_errors(torch_model, model, params, padded_batch(99, 0))
  print(f'pytorch_model.bin: max |dmx - transformers| = {errors}')
  assert_parity(errors)


@pytest.fixture(scope='module')
def minilm(minilm_folder):
  """``(model, params, tokenizer, batch)`` for all-MiniLM-L6-v2 on three real sentences."""
  model, params, tokenizer = load_pretrained(minilm_folder)
  batch = hf_import.tokenize(tokenizer, MINILM_SENTENCES)
  return model, params, tokenizer, batch


def test_minilm_config_and_tokenizer(minilm):
  model, _, tokenizer, batch = minilm
  assert model.config == BertConfig.minilm(dtype='float32')
  assert model.state_dims == (384,) * 8
  assert tokenizer.is_fast
  assert batch['input_ids'].dtype == np.int32 and batch['mask'].dtype == bool
  assert batch['mask'].sum(axis=1).min() < batch['mask'].shape[1]  # the batch has padding


def test_minilm_parity_with_transformers(minilm, minilm_folder):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model, params, _, batch = minilm
  torch_model = transformers.BertModel.from_pretrained(str(minilm_folder)).eval()
  errors = parity_errors(torch_model, model, params, batch)
  print(f'all-MiniLM-L6-v2: max |dmx - transformers| = {errors}')
  assert_parity(errors)


def test_bfloat16_forward_is_close_to_float32(minilm):
  model, params, _, batch = minilm
  model_bf16 = BertModel(dataclasses.replace(model.config, dtype='bfloat16'))
  outputs, states = jax.jit(model.forward)(params, batch)
  outputs_bf16, states_bf16 = jax.jit(model_bf16.forward)(params, batch)
  assert all(state.dtype == jnp.bfloat16 for state in states_bf16)
  assert outputs_bf16.dtype == jnp.float32
  assert all(np.all(np.isfinite(np.asarray(state, np.float32))) for state in states_bf16)
  real = np.asarray(batch['mask'], bool)
  difference = np.abs(np.asarray(outputs_bf16) - np.asarray(outputs))[real]
  scale = np.abs(np.asarray(outputs))[real].max()
  cosine = jnp.sum(outputs * outputs_bf16, -1) / (
      jnp.linalg.norm(outputs, axis=-1) * jnp.linalg.norm(outputs_bf16, axis=-1))
  print(f'bfloat16 vs float32 MiniLM encoder output: max |diff| = {difference.max():.4f}, '
        f'mean |diff| = {difference.mean():.4f}, max |h| = {scale:.2f}, '
        f'min cosine = {float(jnp.min(cosine[real])):.5f}')
  assert difference.max() < 0.1 * scale
  assert float(jnp.min(cosine[real])) > 0.99
  # the resumed pass runs in bfloat16 too, with the traced index
  resumed = jax.jit(
      lambda index: model_bf16.forward_from(params, batch, states_bf16, index, identity))
  assert np.all(np.isfinite(np.asarray(resumed(jnp.int32(3)))[real]))


# ---------------------------------------------------------------------------
# forward_from: the resumed pass


@pytest.fixture(scope='module')
def tiny_classifier():
  """``(model, params, batch, outputs, states)`` of a random tiny 3-class classifier."""
  model = BertModel(BertConfig.tiny(head='classification', num_labels=3))
  params = model.init(jax.random.key(0), 10)
  # larger weights than BERT's 0.02 init, so every layer visibly moves the logits
  params = jax.tree.map(lambda p: p * 5.0 if p.ndim >= 2 else p, params)
  batch = padded_batch(128, 0)
  outputs, states = jax.jit(model.forward)(params, batch)
  return model, params, batch, outputs, states


def test_forward_from_identity_reproduces_forward_static(tiny_classifier):
  model, params, batch, outputs, states = tiny_classifier
  for layer_index in range(len(model.state_dims)):
    resumed = model.forward_from(params, batch, states, layer_index, identity)
    np.testing.assert_allclose(resumed, outputs, atol=1e-5, err_msg=f'layer {layer_index}')


def test_classifier_last_layer_computes_only_the_first_position(tiny_classifier):
  model, params, batch, outputs, states = tiny_classifier
  config = model.config
  last = config.num_layers  # h_L is the last layer's input
  jaxpr = jax.make_jaxpr(lambda: model.forward_from(params, batch, states, last, identity))()
  feed_forward_inputs = [eqn.invars[0].aval.shape for eqn in jaxpr.eqns
                         if eqn.primitive.name == 'dot_general'
                         and eqn.invars[1].aval.shape == (config.hidden_size,
                                                          config.intermediate_size)]
  assert feed_forward_inputs == [(len(batch['mask']), 1, config.hidden_size)]
  resumed = model.forward_from(params, batch, states, last, identity)
  np.testing.assert_allclose(resumed, outputs, atol=1e-5)


def test_forward_from_traced_index_compiles_once(tiny_classifier):
  model, params, batch, outputs, states = tiny_classifier
  traces, seen_indices = [], []

  def record(index, state):
    seen_indices.append(index)
    return state

  @jax.jit
  def resumed(params, states, layer_index):
    traces.append(layer_index)  # runs once per trace, not per call
    return model.forward_from(params, batch, states, layer_index, record)

  for layer_index in range(len(model.state_dims)):
    np.testing.assert_allclose(resumed(params, states, jnp.int32(layer_index)), outputs,
                               atol=1e-5, err_msg=f'layer {layer_index}')
  assert len(traces) == 1
  assert isinstance(seen_indices[0], jax.core.Tracer)  # the intervention sees the traced index


def test_forward_from_traced_matches_static_and_has_gradients(tiny_classifier):
  model, params, batch, outputs, states = tiny_classifier
  baseline = jax.random.normal(jax.random.key(1), (model.config.hidden_size,))
  mask = jnp.asarray(batch['mask'])

  def divergence(gates, baseline, layer_index):
    intervention = lambda index, state: probes.replace_with_baseline(state, gates, baseline)
    masked = model.forward_from(params, batch, states, layer_index, intervention)
    return objective.output_divergence('kl', outputs, masked).sum(), masked

  gates = jnp.full(mask.shape, 0.5)
  gradient = jax.jit(jax.grad(divergence, argnums=(0, 1), has_aux=True))
  for layer_index in range(len(model.state_dims)):
    (gate_grad, baseline_grad), masked = gradient(gates, baseline, jnp.int32(layer_index))
    _, static_masked = divergence(gates, baseline, layer_index)
    np.testing.assert_allclose(masked, static_masked, atol=1e-5, err_msg=f'layer {layer_index}')
    for name, grad in (('gates', gate_grad), ('baseline', baseline_grad)):
      assert np.all(np.isfinite(grad)), (layer_index, name)
      assert float(jnp.max(jnp.abs(grad))) > 1e-8, (layer_index, name)


def test_input_intervention_recomputes_position_and_type_embeddings(tiny_classifier):
  model, params, batch, _, states = tiny_classifier
  zeroed = model.forward_from(params, batch, states, 0, lambda index, state: jnp.zeros_like(state))
  # the same as a clean pass of a model whose word embeddings are all zero
  zero_words = jax.tree.map(lambda p: p, params)
  zero_words['embeddings']['word_embeddings']['embedding'] = jnp.zeros_like(
      params['embeddings']['word_embeddings']['embedding'])
  expected, _ = model.forward(zero_words, batch)
  np.testing.assert_allclose(zeroed, expected, atol=1e-5)


def test_states_other_than_the_injection_point_do_not_matter(tiny_classifier):
  model, params, batch, outputs, states = tiny_classifier
  resumed = jax.jit(
      lambda states, index: model.forward_from(params, batch, states, index, identity))
  noise = [10.0 * jax.random.normal(jax.random.key(k), state.shape)
           for k, state in enumerate(states)]
  for layer_index in range(len(states)):
    others_perturbed = tuple(state if k == layer_index else state + noise[k]
                             for k, state in enumerate(states))
    np.testing.assert_array_equal(resumed(others_perturbed, jnp.int32(layer_index)),
                                  resumed(states, jnp.int32(layer_index)))
    own_perturbed = tuple(state + noise[k] if k == layer_index else state
                          for k, state in enumerate(states))
    assert not np.allclose(resumed(own_perturbed, jnp.int32(layer_index)), outputs, atol=1e-3)


def test_question_answering_head_masks_padding_and_kl_is_finite():
  model = BertModel(BertConfig.tiny(head='question_answering'))
  params = jax.tree.map(lambda p: p * 5.0 if p.ndim >= 2 else p, model.init(jax.random.key(0), 10))
  baseline = jax.random.normal(jax.random.key(1), (model.config.hidden_size,))
  batch = padded_batch(128, 0)
  outputs, states = jax.jit(model.forward)(params, batch)
  real = np.broadcast_to(np.asarray(batch['mask'])[:, None, :], outputs.shape)
  assert outputs.shape == (3, 2, 10)
  assert np.all(np.isneginf(np.asarray(outputs)[~real])) and np.all(np.isfinite(outputs[real]))
  np.testing.assert_allclose(objective.output_divergence('kl', outputs, outputs), 0.0, atol=1e-6)

  def divergence(gates, layer_index):
    intervention = lambda index, state: probes.replace_with_baseline(state, gates, baseline)
    masked = model.forward_from(params, batch, states, layer_index, intervention)
    return objective.output_divergence('kl', outputs, masked).sum()

  value, gate_grad = jax.jit(jax.value_and_grad(divergence))(jnp.full(real.shape[::2], 0.3),
                                                             jnp.int32(1))
  assert np.isfinite(value) and value > 0
  assert np.all(np.isfinite(gate_grad))


# ---------------------------------------------------------------------------
# Configuration and input errors


@pytest.mark.parametrize('overrides, message', [
    (dict(hidden_size=30), 'not divisible by num_heads'),
    (dict(num_layers=0), 'num_layers must be >= 1'),
    (dict(hidden_act='swish'), 'hidden_act must be one of'),
    (dict(head='tagging'), 'head must be None'),
    (dict(classifier_style='gpt'), 'classifier_style must be one of'),
    (dict(dtype='float16'), 'dtype must be one of'),
    (dict(position_offset=64), 'position_offset must be in'),
    (dict(pad_token_id=128), 'pad_token_id must be in'),
])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    BertConfig.tiny(**overrides)


def test_presets():
  assert BertConfig.base().num_states == 14 and BertConfig.base().hidden_size == 768
  assert (BertConfig.large().num_layers, BertConfig.large().hidden_size) == (24, 1024)
  assert BertConfig.minilm(head='classification').head == 'classification'


def test_too_long_input_names_length_and_limit():
  model = BertModel(BertConfig.tiny())  # 64 positions
  params = model.init(jax.random.key(0), 4)
  batch = {'input_ids': np.ones((1, 65), np.int32), 'mask': np.ones((1, 65), bool)}
  with pytest.raises(ValueError, match='input length 65 exceeds the model limit of 64'):
    model.forward(params, batch)
  roberta = BertModel(BertConfig.tiny(position_offset=2, pad_token_id=1))
  with pytest.raises(ValueError, match='input length 63 exceeds the model limit of 62'):
    roberta.forward_from(params, {**batch, 'input_ids': batch['input_ids'][:, :63],
                                  'mask': batch['mask'][:, :63]}, (), 0, identity)


# ---------------------------------------------------------------------------
# Loader errors and the torch-free round trip


@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
  """A saved tiny BERT-style classifier, ``(folder, model, params)``."""
  model = BertModel(BertConfig.tiny(head='classification', num_labels=3))
  params = model.init(jax.random.key(2), 8)
  folder = hf_import.save_pretrained(tmp_path_factory.mktemp('tiny') / 'model', model, params)
  return folder, model, params


def copy_folder(source: pathlib.Path, target: pathlib.Path, *, config_edit=None,
                drop_weights=False) -> pathlib.Path:
  target.mkdir()
  hf_config = json.loads((source / 'config.json').read_text())
  if config_edit is not None:
    config_edit(hf_config)
  (target / 'config.json').write_text(json.dumps(hf_config))
  if not drop_weights:
    (target / 'model.safetensors').write_bytes((source / 'model.safetensors').read_bytes())
  return target


def test_round_trip_without_torch(tiny_folder):
  folder, model, params = tiny_folder
  loaded_model, loaded_params, _ = load_pretrained(folder, head='auto', with_tokenizer=False)
  assert loaded_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


def test_missing_head_is_randomly_initialised_with_a_warning(tiny_folder, tmp_path):
  folder, _, _ = tiny_folder
  with pytest.warns(UserWarning, match='question_answering head .*randomly initialised'):
    model, params, _ = load_pretrained(folder, head='question_answering', with_tokenizer=False)
  outputs, _ = model.forward(params, padded_batch(128, 0))
  assert outputs.shape == (3, 2, 10)
  encoder = BertModel(BertConfig.tiny())
  encoder_folder = hf_import.save_pretrained(tmp_path / 'encoder', encoder, encoder.init(jax.random.key(0)))
  with pytest.warns(UserWarning, match='classification head .*classifier.weight'):
    model, _, _ = load_pretrained(encoder_folder, head='classification', num_labels=5,
                                  with_tokenizer=False)
  assert model.config.num_labels == 5


def edit(key, value):
  def apply(hf_config):
    hf_config[key] = value
  return apply


@pytest.mark.parametrize('make_folder, message', [
    (lambda src, tmp: tmp / 'absent', 'model folder .*absent does not exist'),
    (lambda src, tmp: src / 'config.json', 'is a file; expected a Hugging Face model folder'),
    (lambda src, tmp: (tmp / 'empty').mkdir() or tmp / 'empty', 'has no config.json'),
    (lambda src, tmp: copy_folder(src, tmp / 'w', drop_weights=True), 'has no weights file'),
    (lambda src, tmp: copy_folder(src, tmp / 'w', config_edit=edit('model_type', 'gpt2')),
     "unsupported model_type 'gpt2'"),
    (lambda src, tmp: copy_folder(src, tmp / 'w', config_edit=lambda c: c.pop('hidden_size')),
     'malformed: missing hidden_size'),
    (lambda src, tmp: copy_folder(src, tmp / 'w', config_edit=edit('hidden_act', 'swish')),
     'hidden_act must be one of'),
    (lambda src, tmp: copy_folder(src, tmp / 'w', config_edit=edit('hidden_size', 64)),
     r'shape mismatch for embeddings.word_embeddings.weight: checkpoint has \(128, 32\), '
     r'config implies \(128, 64\)'),
    (lambda src, tmp: copy_folder(src, tmp / 'w',
                                  config_edit=edit('position_embedding_type', 'relative_key')),
     "position_embedding_type 'relative_key' is not supported"),
])
def test_loader_errors(tiny_folder, tmp_path, make_folder, message):
  folder, _, _ = tiny_folder
  with pytest.raises(ModelLoadError, match=message):
    load_pretrained(make_folder(folder, tmp_path), with_tokenizer=False)


def test_malformed_json_and_weights(tiny_folder, tmp_path):
  folder, _, _ = tiny_folder
  broken = copy_folder(folder, tmp_path / 'json')
  (broken / 'config.json').write_text('{"model_type": "bert",')
  with pytest.raises(ModelLoadError, match='config.json is malformed: not valid JSON'):
    load_pretrained(broken)
  corrupt = copy_folder(folder, tmp_path / 'weights')
  (corrupt / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(ModelLoadError, match='could not be read as safetensors'):
    load_pretrained(corrupt)


def test_missing_encoder_weight_and_label_mismatch(tiny_folder, tmp_path):
  from safetensors.numpy import load_file, save_file

  folder, _, _ = tiny_folder
  truncated = copy_folder(folder, tmp_path / 'w', drop_weights=True)
  state_dict = load_file(str(folder / 'model.safetensors'))
  del state_dict['bert.encoder.layer.1.output.dense.weight']
  save_file(state_dict, str(truncated / 'model.safetensors'))
  with pytest.raises(ModelLoadError, match='weight encoder.layer.1.output.dense.weight is missing'):
    load_pretrained(truncated, with_tokenizer=False)
  with pytest.raises(ModelLoadError, match=r'shape mismatch for classifier.weight: checkpoint has '
                                           r'\(3, 32\), config implies \(7, 32\)'):
    load_pretrained(folder, head='classification', num_labels=7, with_tokenizer=False)
  with pytest.raises(ValueError, match='head must be one of'):
    load_pretrained(folder, head='tagging')


def test_pytorch_bin_without_torch_is_a_clear_error(tiny_folder, tmp_path, monkeypatch):
  folder, _, _ = tiny_folder
  torch_folder = copy_folder(folder, tmp_path / 'bin', drop_weights=True)
  (torch_folder / 'pytorch_model.bin').write_bytes(b'\0')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(ModelLoadError, match='PyTorch checkpoint and reading it needs torch'):
    load_pretrained(torch_folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
  huggingface_hub = pytest.importorskip('huggingface_hub')

  def offline(*args, **kwargs):
    raise OSError('We could not connect to huggingface.co')

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  with pytest.raises(ModelLoadError, match="'org/some-bert' is not a local folder and could not be "
                                           r"downloaded from the Hugging Face Hub \(offline\?\)"):
    load_pretrained('org/some-bert')


def test_attention_bias_is_float32_and_finite():
  bias = bert_lib.attention_bias(jnp.array([[True, False]]))
  assert bias.dtype == jnp.float32 and bias.shape == (1, 1, 1, 2)
  assert bias[0, 0, 0, 0] == 0 and np.isfinite(bias).all() and bias[0, 0, 0, 1] < -1e8


def test_roberta_position_ids_follow_transformers():
  config = BertConfig.tiny(position_offset=2, pad_token_id=1)
  ids = jnp.array([[0, 5, 6, 2, 1, 1]])
  np.testing.assert_array_equal(bert_lib.position_ids(ids, config), [[2, 3, 4, 5, 1, 1]])
  np.testing.assert_array_equal(bert_lib.position_ids(ids, BertConfig.tiny()), [[0, 1, 2, 3, 4, 5]])


def test_resumed_pass_equals_full_pytorch_pass_with_the_replaced_state(tmp_path):
  """For every depth l, replacing h_l and resuming equals transformers' layers run from it.

  The reference is independent of dmx's code: PyTorch's own embedding module,
  encoder layers, pooler and classifier applied to the replaced state.
  """
  torch = pytest.importorskip('torch')
  torch_model = tiny_hf_model('BertForSequenceClassification')
  torch_model.save_pretrained(tmp_path)
  model, params, _ = load_pretrained(tmp_path, head='classification', with_tokenizer=False)
  batch = padded_batch(99, 0)
  _, states = jax.jit(model.forward)(params, batch)
  rng = np.random.default_rng(3)
  as_torch = lambda name: torch.as_tensor(np.asarray(batch[name], np.int64))
  # the additive (batch, 1, 1, seq) mask transformers' layers take: 0 on real keys, -inf-like on padding
  extended_mask = (1.0 - as_torch('mask')[:, None, None, :].float()) * torch.finfo(torch.float32).min
  layers = torch_model.bert.encoder.layer

  @jax.jit
  def resumed(layer_index, replacement):
    return model.forward_from(params, batch, states, layer_index, lambda index, state: replacement)

  for layer_index in range(len(model.state_dims)):
    replacement = rng.normal(size=states[layer_index].shape).astype(np.float32)
    with torch.no_grad():
      hidden = torch.as_tensor(replacement)
      if layer_index == 0:  # h0 is the word-embedding lookup: position/type/LayerNorm follow
        hidden = torch_model.bert.embeddings(inputs_embeds=hidden,
                                             token_type_ids=as_torch('token_type_ids'))
      for layer in layers[max(layer_index - 1, 0):]:
        hidden = layer(hidden, attention_mask=extended_mask)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
      expected = torch_model.classifier(torch_model.bert.pooler(hidden)).numpy()
    with jax.default_matmul_precision('float32'):
      got = np.asarray(resumed(jnp.int32(layer_index), jnp.asarray(replacement)))
    np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f'depth {layer_index}')
  assert resumed._cache_size() == 1  # one compiled program served every depth
