"""A BERT / RoBERTa encoder in Flax Linen with DiffMask's explicit injection points.

transformers 5 dropped its Flax models, so dmx carries its own encoder. It
reproduces Hugging Face's ``BertModel`` and ``RobertaModel`` (post-LayerNorm
transformer, absolute position embeddings) and their sequence-classification
and extractive question-answering heads; :mod:`dmx.models.hf_import` reads
their checkpoints.

States, ``L + 2`` of them, all ``(batch, seq, hidden)``:

* ``h0``: the raw word-embedding lookup, before position and token-type
  embeddings and LayerNorm (the original DiffMask's input gate masks this);
* ``h1``: the embedding output, the input of layer 1;
* ``h_{k+1}``: the output of layer ``k``, so ``h_{L+1}`` is the encoder output.

:class:`BertModel` implements :class:`dmx.models.base.MaskableModel`. Its
``forward_from`` resumes at a state index that may be traced: the layers sit
stacked along a leading axis, and an unrolled loop runs them, each behind a
``lax.cond`` that skips layers below the injection point, so one compiled
program serves every depth and stays reverse-differentiable. A static index
(the input gate's 0) runs only the layers above it, without conds.

Attention, for attention-based explanations (:mod:`dmx.baselines.attention`),
has entry points of its own, so ``forward`` and ``forward_from`` stay as they
are: ``forward_with_attention`` also returns every layer's probabilities
``(num_layers, batch, heads, q, k)`` and optionally replaces one (static)
layer's probabilities by a caller's function of them and multiplies each
head's context by a ``(num_layers, heads)`` head mask;
``forward_from_attention`` does the same edit resumed from a clean pass's
states. Like the injection point, the edit is an explicit argument, not a hook.

Parameters are a plain dict ``{'embeddings', 'layers', 'head'?}``: each entry
is the ``'params'`` collection of one Linen module (``'layers'`` holds the
``num_layers`` transformer layers stacked on axis 0). Parameters stay float32;
``BertConfig.dtype = 'bfloat16'`` casts them for compute, keeps states in
bfloat16 and returns float32 outputs. Attention logits, softmax, residual sums
and LayerNorm statistics are float32 either way. (On GPU and TPU, XLA may run
float32 matmuls with reduced-precision passes by default; use
``jax.default_matmul_precision('float32')`` to match PyTorch to 1e-4.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmx.models.base import Intervention

HEADS = ('classification', 'question_answering')
CLASSIFIER_STYLES = ('bert', 'roberta')
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # erf form, HF's 'gelu'
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),  # tanh form
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Added to attention logits of padded keys. Finite, so a row without any real
# key gives uniform weights rather than NaN; applied in float32 so it survives
# bfloat16 compute.
ATTENTION_MASK_VALUE = -1e9

Params = dict[str, Any]
# ``(batch, heads, q, k)`` float32 attention probabilities -> the ones the layer should use
AttentionEdit = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and options of a BERT-family encoder and its optional head.

  ``position_offset`` is 0 for BERT (position ids ``0..S-1``). RoBERTa uses
  ``pad_token_id + 1 = 2``: as Hugging Face's
  ``create_position_ids_from_input_ids``, real tokens count from
  ``position_offset`` and pad tokens (``input_ids == pad_token_id``) get
  ``position_offset - 1``. ``classifier_style`` picks BERT's head (tanh pooler
  on ``[CLS]``, then a linear classifier) or RoBERTa's (dense, tanh, out_proj
  on ``<s>``).
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pad_token_id: int = 0
  position_offset: int = 0
  head: str | None = None
  num_labels: int = 2
  classifier_style: str = 'bert'
  dtype: str = 'float32'
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                 'max_position_embeddings', 'type_vocab_size', 'num_labels'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}')
    if not self.layer_norm_eps > 0:
      raise ValueError(f'layer_norm_eps must be > 0, got {self.layer_norm_eps}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act must be one of {tuple(ACTIVATIONS)}, got {self.hidden_act!r}')
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f'pad_token_id must be in [0, vocab_size={self.vocab_size}), '
                       f'got {self.pad_token_id}')
    if not 0 <= self.position_offset < self.max_position_embeddings:
      raise ValueError(f'position_offset must be in [0, max_position_embeddings='
                       f'{self.max_position_embeddings}), got {self.position_offset}')
    if self.head is not None and self.head not in HEADS:
      raise ValueError(f'head must be None (encoder only) or one of {HEADS}, got {self.head!r}')
    if self.classifier_style not in CLASSIFIER_STYLES:
      raise ValueError(f'classifier_style must be one of {CLASSIFIER_STYLES}, '
                       f'got {self.classifier_style!r}')
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f'dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.dtype!r}')
    if not self.initializer_range > 0:
      raise ValueError(f'initializer_range must be > 0, got {self.initializer_range}')

  @property
  def compute_dtype(self) -> jnp.dtype:
    return COMPUTE_DTYPES[self.dtype]

  @property
  def max_sequence_length(self) -> int:
    """The longest input the position embeddings cover."""
    return self.max_position_embeddings - self.position_offset

  @property
  def num_states(self) -> int:
    return self.num_layers + 2

  @classmethod
  def tiny(cls, **overrides) -> 'BertConfig':
    """A 2-layer, 32-wide encoder for tests."""
    return cls(**{**dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=64), **overrides})

  @classmethod
  def minilm(cls, **overrides) -> 'BertConfig':
    """all-MiniLM-L6-v2 / MiniLM-L6-H384-uncased: 6 layers, hidden 384, 12 heads."""
    return cls(**{**dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),
                  **overrides})

  @classmethod
  def base(cls, **overrides) -> 'BertConfig':
    """bert-base: 12 layers, hidden 768, 12 heads."""
    return cls(**overrides)

  @classmethod
  def large(cls, **overrides) -> 'BertConfig':
    """bert-large: 24 layers, hidden 1024, 16 heads."""
    return cls(**{**dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
                  **overrides})


def check_sequence_length(config: BertConfig, seq_len: int) -> None:
  """Raises ``ValueError`` when ``seq_len`` exceeds what the position embeddings cover."""
  if seq_len > config.max_sequence_length:
    raise ValueError(f'input length {seq_len} exceeds the model limit of '
                     f'{config.max_sequence_length} '
                     f'tokens (max_position_embeddings={config.max_position_embeddings}, '
                     f'position_offset={config.position_offset}); truncate the inputs')


def position_ids(input_ids: jax.Array, config: BertConfig) -> jax.Array:
  """Absolute position ids ``(batch, seq) int32``, as Hugging Face computes them."""
  if config.position_offset == 0:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
  is_real = (input_ids != config.pad_token_id).astype(jnp.int32)
  # RoBERTa: real tokens count from position_offset, pad tokens sit on position_offset - 1
  return jnp.cumsum(is_real, axis=1) * is_real + (config.position_offset - 1)


def attention_bias(mask: jax.Array) -> jax.Array:
  """``(batch, seq)`` real-token mask -> ``(batch, 1, 1, seq)`` float32 additive bias."""
  bias = jnp.where(mask.astype(bool), 0.0, ATTENTION_MASK_VALUE).astype(jnp.float32)
  return bias[:, None, None, :]


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=config.compute_dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.compute_dtype,
                      param_dtype=jnp.float32, name=name)


def _embed(config: BertConfig, rows: int, name: str) -> nn.Embed:
  return nn.Embed(rows, config.hidden_size, dtype=config.compute_dtype, param_dtype=jnp.float32,
                  embedding_init=nn.initializers.normal(config.initializer_range), name=name)


class Embeddings(nn.Module):
  """Word lookup (``h0``), then + token type + position and LayerNorm (``h1``)."""
  config: BertConfig

  def setup(self):
    c = self.config
    self.word_embeddings = _embed(c, c.vocab_size, 'word_embeddings')
    self.position_embeddings = _embed(c, c.max_position_embeddings, 'position_embeddings')
    self.token_type_embeddings = _embed(c, c.type_vocab_size, 'token_type_embeddings')
    self.layer_norm = _layer_norm(c, 'layer_norm')

  def lookup(self, input_ids: jax.Array) -> jax.Array:
    """``(batch, seq) int -> h0 (batch, seq, hidden)``."""
    return self.word_embeddings(input_ids)

  def combine(self, word_embedded: jax.Array, input_ids: jax.Array,
              token_type_ids: jax.Array) -> jax.Array:
    """``h0 (batch, seq, hidden) -> h1 (batch, seq, hidden)``; ids give positions and types."""
    # HF's order of sums: (words + token types) + positions; in float32 for bfloat16 models
    summed = (word_embedded.astype(jnp.float32)
              + self.token_type_embeddings(token_type_ids).astype(jnp.float32)
              + self.position_embeddings(position_ids(input_ids, self.config)).astype(jnp.float32))
    return self.layer_norm(summed)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    return self.combine(self.lookup(input_ids), input_ids, token_type_ids)


class SelfAttention(nn.Module):
  """Multi-head self-attention and its output projection (no residual)."""
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, bias: jax.Array,
               attention_edit: AttentionEdit | None = None,
               head_scale: jax.Array | None = None,
               first_query_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(batch, seq, hidden), (batch, 1, 1, seq) -> ((batch, q, hidden), weights)``.

    ``weights`` are the float32 attention probabilities ``(batch, heads, q, k)``
    the layer used: after ``attention_edit`` (a function of the softmax output,
    returning the same shape) when one is given. ``head_scale`` ``(heads,)``
    multiplies each head's context before the output projection (0 prunes a
    head). With neither, the computation is the plain layer's. ``q`` is
    ``seq``, or 1 with ``first_query_only``: only the first position attends
    (keys and values still come from every position), for a head that reads
    nothing else.
    """
    c = self.config
    head_dim = c.hidden_size // c.num_heads
    split_heads = lambda x: x.reshape(x.shape[:2] + (c.num_heads, head_dim))
    queried = hidden[:, :1] if first_query_only else hidden  # (batch, q, hidden)
    query = split_heads(_dense(c, c.hidden_size, 'query')(queried))  # (batch, q, heads, head_dim)
    key = split_heads(_dense(c, c.hidden_size, 'key')(hidden))
    value = split_heads(_dense(c, c.hidden_size, 'value')(hidden))
    logits = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits + bias, axis=-1)  # (batch, heads, q, k) float32
    if attention_edit is not None:
      edited = attention_edit(weights)
      if edited.shape != weights.shape:
        raise ValueError(f'attention_edit must return the shape it gets, {weights.shape}, '
                         f'got {edited.shape}')
      weights = edited.astype(jnp.float32)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(c.compute_dtype), value)
    if head_scale is not None:
      context = context * jnp.asarray(head_scale)[None, None, :, None].astype(context.dtype)
    return _dense(c, c.hidden_size, 'output')(context.reshape(queried.shape)), weights


class TransformerLayer(nn.Module):
  """One post-LayerNorm BERT layer: ``h_k -> h_{k+1}``, and the attention it used."""
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, bias: jax.Array,
               attention_edit: AttentionEdit | None = None,
               head_scale: jax.Array | None = None,
               first_query_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(batch, seq, hidden), (batch, 1, 1, seq) -> ((batch, q, hidden), weights)``.

    ``weights``: ``(batch, heads, q, k)`` float32; see :class:`SelfAttention`
    for ``attention_edit``, ``head_scale`` and ``first_query_only`` (``q = 1``:
    only the first position's new state is computed). Callers that drop
    ``weights`` pay nothing for them: XLA removes the dead output.
    """
    c = self.config
    attended, weights = SelfAttention(c, name='attention')(hidden, bias, attention_edit,
                                                           head_scale, first_query_only)
    residual = hidden[:, :1] if first_query_only else hidden
    hidden = _layer_norm(c, 'attention_layer_norm')(
        attended.astype(jnp.float32) + residual.astype(jnp.float32))
    intermediate = ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, 'intermediate')(hidden))
    output = _dense(c, c.hidden_size, 'output')(intermediate)
    return _layer_norm(c, 'output_layer_norm')(
        output.astype(jnp.float32) + hidden.astype(jnp.float32)), weights


class ClassificationHead(nn.Module):
  """Sequence classification from the first token: ``(batch, seq, hidden) -> (batch, labels)``."""
  config: BertConfig
  # it reads nothing but position 0, so a pass may compute only that position's final state
  reads_first_position_only: ClassVar[bool] = True

  @nn.compact
  def __call__(self, final_states: jax.Array, mask: jax.Array) -> jax.Array:
    del mask  # the first token ([CLS] / <s>) is always real
    c = self.config
    first = final_states[:, 0]  # (batch, hidden)
    if c.classifier_style == 'bert':
      pooled = jnp.tanh(_dense(c, c.hidden_size, 'pooler')(first))
      logits = _dense(c, c.num_labels, 'classifier')(pooled)
    else:
      hidden = jnp.tanh(_dense(c, c.hidden_size, 'dense')(first))
      logits = _dense(c, c.num_labels, 'out_proj')(hidden)
    return logits.astype(jnp.float32)


class QuestionAnsweringHead(nn.Module):
  """Span start and end logits: ``(batch, seq, hidden) -> (batch, 2, seq)``, pads at -inf."""
  config: BertConfig
  reads_first_position_only: ClassVar[bool] = False

  @nn.compact
  def __call__(self, final_states: jax.Array, mask: jax.Array) -> jax.Array:
    logits = _dense(self.config, 2, 'qa_outputs')(final_states).astype(jnp.float32)  # (b, s, 2)
    logits = jnp.moveaxis(logits, -1, 1)
    # padding can never be an answer; dmx.objective's KL is safe for -inf logits
    return jnp.where(mask.astype(bool)[:, None, :], logits, -jnp.inf)


HEAD_MODULES = {'classification': ClassificationHead, 'question_answering': QuestionAnsweringHead}


class AttentionPass(NamedTuple):
  """A pass that also returns every layer's attention probabilities.

  Attributes:
    outputs: as :meth:`BertModel.forward`'s.
    states: ``h0..h_{L+1}``, each ``(batch, seq, hidden)``.
    attention: ``(num_layers, batch, heads, q, k)`` float32, the probabilities
      each layer used (after an edit, where one was applied). Index ``i`` is
      the layer that reads ``h_{i+1}`` and writes ``h_{i+2}``.
  """
  outputs: jax.Array
  states: tuple[jax.Array, ...]
  attention: jax.Array


def _layer_rows(layers_params: Params, index: int | slice) -> Params:
  """Layer ``index`` (or a slice of layers) of the stacked layer parameters.

  With a static index the slice is free at run time.
  """
  return jax.tree.map(lambda leaf: leaf[index], layers_params)


def _cond(predicate, true_fn: Callable, false_fn: Callable, operand):
  """``lax.cond``, decided while tracing when ``predicate`` is a Python bool (a static depth)."""
  if isinstance(predicate, (bool, np.bool_)):
    return true_fn(operand) if predicate else false_fn(operand)
  return jax.lax.cond(predicate, true_fn, false_fn, operand)


class BertModel:
  """A :class:`dmx.models.base.MaskableModel` over a BERT-family encoder.

  Batches are dicts with ``'input_ids'`` ``(batch, seq)`` int, ``'mask'``
  ``(batch, seq)`` true on real tokens, and optionally ``'token_type_ids'``
  ``(batch, seq)`` (zeros when absent). Outputs are float32: classification
  logits ``(batch, num_labels)``, QA logits ``(batch, 2, seq)`` (start, end;
  padding at ``-inf``), or, without a head, the encoder output
  ``(batch, seq, hidden)``.
  """

  def __init__(self, config: BertConfig):
    self.config = config
    self.embeddings = Embeddings(config)
    self.layer = TransformerLayer(config)
    self.head = HEAD_MODULES[config.head](config) if config.head is not None else None
    # one compiled program: far faster than dispatching every initialiser eagerly
    self._compiled_init = jax.jit(self._init, static_argnums=1)

  @property
  def state_dims(self) -> tuple[int, ...]:
    return (self.config.hidden_size,) * self.config.num_states

  def init(self, key: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters (normal(initializer_range) weights, zero biases, unit LayerNorm)."""
    check_sequence_length(self.config, seq_len)
    return self._compiled_init(key, seq_len)

  def _init(self, key: jax.Array, seq_len: int) -> Params:
    embeddings_key, layers_key, head_key = jax.random.split(key, 3)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    hidden = jnp.zeros((1, seq_len, self.config.hidden_size), self.config.compute_dtype)
    bias = attention_bias(jnp.ones((1, seq_len), bool))
    init_layer = lambda layer_key: self.layer.init(layer_key, hidden, bias)['params']
    params = {
        'embeddings': self.embeddings.init(embeddings_key, ids, ids)['params'],
        'layers': jax.vmap(init_layer)(jax.random.split(layers_key, self.config.num_layers)),
    }
    if self.head is not None:
      params['head'] = self.init_head(head_key)
    return params

  def init_head(self, key: jax.Array) -> Params:
    """Random parameters of the head alone (for a checkpoint that lacks them)."""
    if self.head is None:
      raise ValueError('this model has no head (config.head is None)')
    hidden = jnp.zeros((1, 1, self.config.hidden_size), self.config.compute_dtype)
    return self.head.init(key, hidden, jnp.ones((1, 1), bool))['params']

  def _inputs(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validated ``(input_ids, mask, token_type_ids)``, each ``(batch, seq)``."""
    input_ids = jnp.asarray(batch['input_ids'])
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    check_sequence_length(self.config, input_ids.shape[1])
    if 'mask' not in batch:
      raise KeyError("batch needs 'mask', (batch, seq) true on real tokens")
    mask = jnp.asarray(batch['mask']).astype(bool)
    token_type_ids = batch.get('token_type_ids')
    token_type_ids = (jnp.zeros_like(input_ids) if token_type_ids is None
                      else jnp.asarray(token_type_ids))
    return input_ids, mask, token_type_ids

  def _embed(self, params: Params, input_ids: jax.Array,
             token_type_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(h0, h1)``: the word-embedding lookup, then the embedding sum and LayerNorm."""
    word_embedded = self.embeddings.apply({'params': params['embeddings']}, input_ids,
                                          method=Embeddings.lookup)
    embedded = self.embeddings.apply({'params': params['embeddings']}, word_embedded, input_ids,
                                     token_type_ids, method=Embeddings.combine)
    return word_embedded, embedded

  def _run_layer(self, layer_params: Params, hidden: jax.Array, bias: jax.Array,
                 first_query_only: bool = False) -> jax.Array:
    return self.layer.apply({'params': layer_params}, hidden, bias, None, None,
                            first_query_only)[0]

  def _outputs(self, params: Params, final_states: jax.Array, mask: jax.Array) -> jax.Array:
    if self.head is None:
      return final_states.astype(jnp.float32)
    return self.head.apply({'params': params['head']}, final_states, mask)

  def forward(self, params: Params, batch: dict) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Clean pass: ``(outputs, (h0, ..., h_{L+1}))``, states ``(batch, seq, hidden)``."""
    input_ids, mask, token_type_ids = self._inputs(batch)
    bias = attention_bias(mask)
    word_embedded, embedded = self._embed(params, input_ids, token_type_ids)

    final, layer_outputs, _ = self._run_layers(params['layers'], embedded, bias)
    return self._outputs(params, final, mask), (word_embedded, embedded, *layer_outputs)

  def forward_from(self, params: Params, batch: dict, states: tuple[jax.Array, ...],
                   layer_index, intervention: Intervention) -> jax.Array:
    """Masked pass: ``h_l = intervention(l, states[l])``, then only what lies above ``h_l``.

    ``l = 0`` recomputes the embedding sum and LayerNorm from the new ``h0``,
    then every layer; ``l >= 1`` runs layers ``l..L`` from the new ``h_l``;
    ``l = L + 1`` only the head. ``layer_index`` may be a Python int or a
    traced int scalar: one compiled program serves every depth, and
    ``intervention`` receives the index as an int32 array. Under a head that
    reads only the first position (classification), the last layer computes
    only that position.
    """
    input_ids, mask, token_type_ids = self._inputs(batch)
    if len(states) != self.config.num_states:
      raise ValueError(f'expected {self.config.num_states} states, got {len(states)}')
    bias = attention_bias(mask)
    embedding_params = {'params': params['embeddings']}
    recombine = lambda word_embedded: self.embeddings.apply(
        embedding_params, word_embedded, input_ids, token_type_ids, method=Embeddings.combine)

    static = isinstance(layer_index, (int, np.integer))
    if static and not 0 <= layer_index < self.config.num_states:
      raise ValueError(f'layer_index must be in [0, {self.config.num_states}), got {layer_index}')
    # A traced depth gives one program for every depth, each layer behind a lax.cond that
    # skips it below the injection point; a static one (the input gate's 0) resolves the
    # same conditions while tracing, so only the layers above it are built. The loop is
    # unrolled rather than a lax.scan: on CPU the scan costs about 10% more than the layers
    # it runs (benchmarks/bench_layer.py --stack).
    replaced = intervention(jnp.asarray(layer_index, jnp.int32),
                            states[layer_index] if static else jnp.stack(states)[layer_index])
    hidden = _cond(layer_index == 0, recombine,
                   lambda state: state.astype(self.config.compute_dtype), replaced)
    num_layers = self.config.num_layers
    # When the head reads only the first position, the last layer computes only that
    # position's new state (its keys and values still see every position): about 5/6 of
    # its work, in the masked pass and its backward pass.
    head_reads_first_only = self.head is not None and self.head.reads_first_position_only
    for layer in range(1, num_layers + 1):
      layer_params = _layer_rows(params['layers'], layer - 1)
      first_only = head_reads_first_only and layer == num_layers
      # layer k maps h_k to h_{k+1}: layers below the injection point pass the state through
      hidden = _cond(layer >= layer_index,
                     lambda h, p=layer_params, f=first_only: self._run_layer(p, h, bias, f),
                     lambda h, f=first_only: h[:, :1] if f else h, hidden)
    return self._outputs(params, hidden, mask)

  # -- attention: read every layer's probabilities, edit one layer's, mask heads -----------------
  # Separate entry points, so forward and forward_from stay exactly as they were.

  def check_head_mask(self, head_mask) -> jax.Array | None:
    """``head_mask`` as float32 ``(num_layers, heads)``, or ``None``; ``ValueError`` on a bad shape."""
    if head_mask is None:
      return None
    head_mask = jnp.asarray(head_mask, jnp.float32)
    expected = (self.config.num_layers, self.config.num_heads)
    if head_mask.shape != expected:
      raise ValueError(f'head_mask must be (num_layers, heads) = {expected}, got {head_mask.shape}')
    return head_mask

  def check_attention_layer(self, attention_layer) -> int:
    """``attention_layer`` as a Python int in ``[0, num_layers)``; ``ValueError`` otherwise."""
    if isinstance(attention_layer, bool) or not isinstance(attention_layer, (int, np.integer)):
      raise ValueError(f'attention_layer must be a Python int (static), got {attention_layer!r}')
    if not 0 <= attention_layer < self.config.num_layers:
      raise ValueError(f'attention_layer must be in [0, {self.config.num_layers}), '
                       f'got {attention_layer}')
    return int(attention_layer)

  def _run_layers(self, layers_params: Params, hidden: jax.Array, bias: jax.Array,
                  head_mask: jax.Array | None = None):
    """Stacked layers in order, unrolled: ``(final, outputs, attention)``.

    ``outputs``: a list of each layer's ``(b, s, h)`` output; ``attention``: a
    list of each layer's ``(b, heads, q, k)`` probabilities (the layer
    computes them anyway; callers that drop them add nothing under ``jit``).
    The one loop of :meth:`forward` and the attention entry points, so their
    numbers agree exactly.
    """
    outputs, attention = [], []
    for layer in range(jax.tree.leaves(layers_params)[0].shape[0]):
      hidden, weights = self.layer.apply(
          {'params': _layer_rows(layers_params, layer)}, hidden, bias, None,
          None if head_mask is None else head_mask[layer])
      outputs.append(hidden)
      attention.append(weights)
    return hidden, outputs, attention

  def _layers_from(self, params: Params, hidden: jax.Array, bias: jax.Array, first: int,
                   head_mask: jax.Array | None, attention_edit: AttentionEdit | None):
    """Layers ``first..L-1`` (0-based) from ``first``'s input, ``attention_edit`` at ``first``.

    Returns ``(final, outputs, attention)``, lists of ``L - first`` layers as
    :meth:`_run_layers`'s.
    """
    hidden, weights = self.layer.apply(
        {'params': _layer_rows(params['layers'], first)}, hidden, bias, attention_edit,
        None if head_mask is None else head_mask[first])
    rest = slice(first + 1, None)
    final, outputs, attention = self._run_layers(
        _layer_rows(params['layers'], rest), hidden, bias,
        None if head_mask is None else head_mask[rest])
    return final, [hidden, *outputs], [weights, *attention]

  def forward_with_attention(self, params: Params, batch: dict, *, head_mask=None,
                             attention_layer: int | None = None,
                             attention_edit: AttentionEdit | None = None) -> AttentionPass:
    """A full pass that returns every layer's attention; optionally edited and head-masked.

    Args:
      params: the model's parameters.
      batch: as for :meth:`forward`.
      head_mask: ``(num_layers, heads)``; each head's context is multiplied by
        its entry before the output projection (0 prunes the head, 1 keeps it
        unchanged). ``None``: no mask.
      attention_layer: the layer (0-based, static) whose probabilities
        ``attention_edit`` replaces; required with ``attention_edit``.
      attention_edit: ``(batch, heads, q, k)`` float32 probabilities -> the
        probabilities that layer uses instead (same shape), e.g.
        ``lambda a: alpha * a``. ``None``: the plain pass.

    Returns:
      :class:`AttentionPass`. Without ``head_mask`` and ``attention_edit`` its
      outputs and states equal :meth:`forward`'s.
    """
    if (attention_layer is None) != (attention_edit is None):
      raise ValueError('attention_layer and attention_edit must be given together')
    head_mask = self.check_head_mask(head_mask)
    input_ids, mask, token_type_ids = self._inputs(batch)
    bias = attention_bias(mask)
    word_embedded, embedded = self._embed(params, input_ids, token_type_ids)
    if attention_edit is None:
      final, layer_outputs, attention = self._run_layers(params['layers'], embedded, bias,
                                                         head_mask)
    else:
      first = self.check_attention_layer(attention_layer)
      below = slice(0, first)
      hidden, below_outputs, below_attention = self._run_layers(
          _layer_rows(params['layers'], below), embedded, bias,
          None if head_mask is None else head_mask[below])
      final, above_outputs, above_attention = self._layers_from(params, hidden, bias, first,
                                                                head_mask, attention_edit)
      layer_outputs = below_outputs + above_outputs
      attention = below_attention + above_attention
    return AttentionPass(self._outputs(params, final, mask),
                         (word_embedded, embedded, *layer_outputs),
                         jnp.stack(attention))  # (num_layers, b, heads, q, k)

  def attention_probabilities(self, params: Params, batch: dict) -> jax.Array:
    """``(num_layers, batch, heads, q, k)`` float32 attention probabilities of the clean pass.

    Rows of real queries sum to 1 over keys; padded keys get 0.
    """
    return self.forward_with_attention(params, batch).attention

  def forward_from_attention(self, params: Params, batch: dict, states: tuple[jax.Array, ...],
                             attention_layer: int, attention_edit: AttentionEdit, *,
                             head_mask=None) -> jax.Array:
    """Outputs with layer ``attention_layer``'s probabilities edited, resumed from ``states``.

    The cheap form of :meth:`forward_with_attention` for many edits of one
    layer (integrated gradients over attention): layer ``attention_layer``
    (0-based, static) reads ``states[attention_layer + 1]`` and only it and
    the layers above are recomputed. ``states`` must come from a pass with the
    same ``head_mask`` below that layer (e.g. :meth:`forward` when ``None``).
    Returns the outputs, as :meth:`forward`'s.
    """
    first = self.check_attention_layer(attention_layer)
    if len(states) != self.config.num_states:
      raise ValueError(f'expected {self.config.num_states} states, got {len(states)}')
    head_mask = self.check_head_mask(head_mask)
    _, mask, _ = self._inputs(batch)
    bias = attention_bias(mask)
    hidden = states[first + 1].astype(self.config.compute_dtype)
    final, _, _ = self._layers_from(params, hidden, bias, first, head_mask, attention_edit)
    return self._outputs(params, final, mask)
