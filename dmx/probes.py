"""DiffMask probes: per-token vote logits from a frozen model's states, and baselines.

A probe ``g`` reads the clean pass's states ``h0..hL`` (one array per state,
``(batch, seq, dim_k)``, dims may differ between states) and gives every token
one vote logit per state: ``(num_states, batch, seq)``. Votes become gates
through a sample of a gate relaxation (:mod:`dmx.relaxations`; Hard Concrete
by default):

* input gate at depth ``l``: ``z = prod_{k <= l} v(k)`` masks the input ``h0``
  (paper eq. 2); ``log P(z != 0) = sum_{k <= l} log P(v(k) != 0)``;
* hidden gate at depth ``l``: ``z = v(l)`` masks the state ``h_l`` (eq. 3).

A masked state is ``z * h + (1 - z) * baseline`` with a learned baseline vector
(one for the input, one per state for hidden gates).

Two vote forms are offered, both reading ``[x_i; h_i]`` where ``x`` is the
input ``h0`` (input gates) or ``h_k`` itself (hidden gates):

* ``'mlp'``, the original code's default gate:
  ``scale * tanh(Dense(1)(tanh(Dense(hidden)([x_i; h_i])))) + bias``, logits
  bounded to ``initial_logit +- scale`` (5 +- 10), so gates start open
  (P(z != 0) ~ 0.995) and can never saturate beyond recovery;
* ``'bilinear'``, the paper's appendix A: ``x_i^T W1 h_i + W2 [x_i; h_i] + b``
  with ``b`` starting at ``initial_logit``, and input-gate logits averaged with
  the earlier layers' (eq. 9).

The original also wraps the MLP vote's Dense layers in weight normalisation
(``torch.nn.utils.weight_norm``); dmx offers it as ``weight_norm=True``
(:class:`WeightNormDense`), off by default.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmx import hard_concrete, relaxations

GATES = ('input', 'hidden')
VOTE_FORMS = ('mlp', 'bilinear')


class WeightNormDense(nn.Module):
  """A dense layer with weight normalisation (Salimans & Kingma, 2016), as torch's ``weight_norm``.

  ``kernel[:, j] = scale[j] * direction[:, j] / ||direction[:, j]||``: each
  output unit's weight vector is a learned length times a learned direction,
  so the optimiser moves the two separately. ``scale`` starts at the
  direction's norm, so at initialisation the layer equals a plain dense layer
  with kernel ``direction`` (torch initialises ``g`` the same way).
  """
  features: int

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``(..., d_in) -> (..., features)``."""
    direction = self.param('direction', nn.initializers.lecun_normal(),
                           (inputs.shape[-1], self.features), jnp.float32)
    scale = self.param('scale', lambda _: _column_norms(direction))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    kernel = direction * (scale / _column_norms(direction))
    return inputs @ kernel + bias


def _column_norms(matrix: jax.Array) -> jax.Array:
  """Euclidean norm of each column: ``(d_in, d_out) -> (d_out,)``."""
  # the floor keeps the gradient finite for an all-zero column (never reached in practice)
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(matrix), axis=0), 1e-30))


class MlpVote(nn.Module):
  """The original code's bounded vote: ``scale * tanh(MLP([a; h])) + bias``."""
  hidden_size: int
  initial_logit: float = 5.0
  logit_scale: float = 10.0
  weight_norm: bool = False

  @nn.compact
  def __call__(self, anchor: jax.Array, state: jax.Array) -> jax.Array:
    """``(batch, seq, d_anchor), (batch, seq, d) -> (batch, seq)``."""
    features = state if anchor is state else jnp.concatenate([anchor, state], axis=-1)
    dense = WeightNormDense if self.weight_norm else nn.Dense
    hidden = jnp.tanh(dense(self.hidden_size, name='hidden')(features))
    bounded = jnp.tanh(dense(1, name='out')(hidden)[..., 0])
    bias = self.param('bias', nn.initializers.constant(self.initial_logit), (), jnp.float32)
    return self.logit_scale * bounded + bias


class BilinearVote(nn.Module):
  """The paper's appendix-A vote: ``a^T W1 h + W2 [a; h] + b``."""
  initial_logit: float = 5.0

  @nn.compact
  def __call__(self, anchor: jax.Array, state: jax.Array) -> jax.Array:
    """``(batch, seq, d_anchor), (batch, seq, d) -> (batch, seq)``."""
    bilinear_kernel = self.param('bilinear', nn.initializers.lecun_normal(),
                                 (anchor.shape[-1], state.shape[-1]))
    bilinear = jnp.einsum('bsi,ij,bsj->bs', anchor, bilinear_kernel, state)
    linear = nn.Dense(1, name='linear', bias_init=nn.initializers.constant(self.initial_logit))
    return bilinear + linear(jnp.concatenate([anchor, state], axis=-1))[..., 0]


class DiffMaskProbe(nn.Module):
  """Amortised probe: vote logits for every state, plus the baseline vectors.

  Attributes:
    gate: ``'input'`` (mask ``h0`` from votes of all states up to depth l) or
      ``'hidden'`` (mask ``h_l`` from its own vote).
    state_dims: width of each state ``h0..hL``.
    form: ``'mlp'`` or ``'bilinear'`` (see the module docstring).
    hidden_size: width of the MLP vote's hidden layer.
    initial_logit: vote logit at initialisation (5: gates start open).
    weight_norm: weight-normalise the MLP vote's dense layers, as the original
      does (``'mlp'`` form only).
  """
  gate: str
  state_dims: tuple[int, ...]
  form: str = 'mlp'
  hidden_size: int = 64
  initial_logit: float = 5.0
  weight_norm: bool = False

  def setup(self):
    if self.gate not in GATES:
      raise ValueError(f'unknown gate {self.gate!r}; choose one of {GATES}')
    if self.form not in VOTE_FORMS:
      raise ValueError(f'unknown vote form {self.form!r}; choose one of {VOTE_FORMS}')
    if self.weight_norm and self.form != 'mlp':
      raise ValueError(f'weight normalisation applies to the mlp vote only, not {self.form!r}')
    vote_cls = MlpVote if self.form == 'mlp' else BilinearVote
    kwargs = {'initial_logit': self.initial_logit}
    if self.form == 'mlp':
      kwargs.update(hidden_size=self.hidden_size, weight_norm=self.weight_norm)
    self.votes = [vote_cls(name=f'vote_{k}', **kwargs) for k in range(len(self.state_dims))]
    self.baselines = _baseline_params(self, self.gate, self.state_dims)

  def __call__(self, states: Sequence[jax.Array]) -> jax.Array:
    """Vote logits ``(num_states, batch, seq)`` (float32) from states ``h0..hL``."""
    states = [jnp.asarray(state, jnp.float32) for state in states]
    if len(states) != len(self.state_dims):
      raise ValueError(f'probe expects {len(self.state_dims)} states, got {len(states)}')
    logits = []
    for k, (vote, state) in enumerate(zip(self.votes, states)):
      anchor = states[0] if self.gate == 'input' else state
      logits.append(vote(anchor, state))
    logits = jnp.stack(logits)
    if self.form == 'bilinear' and self.gate == 'input':
      logits = average_with_earlier_layers(logits)
    return logits

  def baseline_vectors(self) -> tuple[jax.Array, ...]:
    """The learned baselines: one ``(dim_0,)`` vector for input gates, else one per state."""
    return tuple(self.baselines)


class PerExampleProbe(nn.Module):
  """Non-amortised DiffMask: a free vote logit per (example, position, state).

  Used for the paper's ablation and per-example search (sec. 4.2.1): the batch
  must always hold the same ``num_examples`` examples in the same order.
  """
  gate: str
  state_dims: tuple[int, ...]
  num_examples: int
  max_length: int
  initial_logit: float = 3.0

  def setup(self):
    if self.gate not in GATES:
      raise ValueError(f'unknown gate {self.gate!r}; choose one of {GATES}')
    self.logits = self.param(
        'free_logits', nn.initializers.constant(self.initial_logit),
        (len(self.state_dims), self.num_examples, self.max_length), jnp.float32)
    self.baselines = _baseline_params(self, self.gate, self.state_dims)

  def __call__(self, states: Sequence[jax.Array]) -> jax.Array:
    """Vote logits ``(num_states, num_examples, seq)``; ``states`` only set the length."""
    seq = states[0].shape[1]
    return self.logits[:, :, :seq]

  def baseline_vectors(self) -> tuple[jax.Array, ...]:
    return tuple(self.baselines)


def _baseline_params(module: nn.Module, gate: str, state_dims: Sequence[int]) -> list:
  """Zero-initialised baselines: one for the input, or one per state for hidden gates."""
  dims = state_dims[:1] if gate == 'input' else state_dims
  return [module.param(f'baseline_{k}', nn.initializers.zeros_init(), (dim,), jnp.float32)
          for k, dim in enumerate(dims)]


def average_with_earlier_layers(vote_logits: jax.Array) -> jax.Array:
  """Paper eq. 9: ``gamma_l = (gamma_hat_l + mean_{k<l} gamma_hat_k) / 2``; ``gamma_0`` unchanged.

  ``(num_states, batch, seq) -> (num_states, batch, seq)``.
  """
  num_states = vote_logits.shape[0]
  earlier_sum = jnp.cumsum(vote_logits, axis=0) - vote_logits
  counts = jnp.arange(num_states, dtype=vote_logits.dtype).reshape(-1, 1, 1)
  earlier_mean = earlier_sum / jnp.maximum(counts, 1.0)
  return jnp.where(counts > 0, 0.5 * (vote_logits + earlier_mean), vote_logits)


def set_baseline(probe_params, vector: jax.Array, layer_index: int = 0):
  """Returns probe params whose baseline for state ``layer_index`` is ``vector``.

  Use it to start from a meaningful vector, e.g. BERT's [MASK] embedding.
  """
  name = f'baseline_{layer_index}'
  inner = dict(probe_params['params'])
  if name not in inner:
    raise ValueError(f'probe has no baseline for state {layer_index}')
  if inner[name].shape != jnp.shape(vector):
    raise ValueError(
        f'baseline {layer_index} has shape {inner[name].shape}, got {jnp.shape(vector)}')
  inner[name] = jnp.asarray(vector, jnp.float32)
  return {**probe_params, 'params': inner}


def set_baselines(probe_params, vectors):
  """Returns probe params whose baseline ``k`` is ``vectors[k]``; the rest stay as they are.

  ``vectors``: ``(dim_k,)`` arrays for the first ``len(vectors)`` baselines
  (``()`` changes nothing).
  """
  for layer_index, vector in enumerate(vectors):
    probe_params = set_baseline(probe_params, vector, layer_index)
  return probe_params


def gate_relaxation(relaxation: relaxations.Relaxation | None = None,
                    temperature: float | None = None,
                    stretch: Sequence[float] | None = None) -> relaxations.Relaxation:
  """``relaxation``, or Hard Concrete with ``temperature`` and ``stretch`` (defaults: the original's).

  Raises ValueError when both a relaxation and Hard Concrete parameters are given.
  """
  if relaxation is not None:
    if temperature is not None or stretch is not None:
      raise ValueError('pass either a relaxation or Hard Concrete temperature/stretch, not both')
    return relaxation
  return relaxations.hard_concrete(
      hard_concrete.DEFAULT_TEMPERATURE if temperature is None else temperature,
      hard_concrete.DEFAULT_STRETCH if stretch is None else stretch)


def gate_log_keep_probs(gate: str, vote_logits: jax.Array, *, temperature: float | None = None,
                        stretch: Sequence[float] | None = None,
                        relaxation: relaxations.Relaxation | None = None) -> jax.Array:
  """Log-probability that the gate at every depth is open: ``(num_states, batch, seq)``.

  ``relaxation`` (default: Hard Concrete with ``temperature``, ``stretch``)
  gives each vote's ``log_keep_prob``. For input gates the votes up to depth
  l are independent and multiply, so the gate is open only when all of them
  are and their log-probabilities add up (a cumulative sum over states).
  """
  relaxation = gate_relaxation(relaxation, temperature, stretch)
  log_vote = relaxation.log_keep_prob(vote_logits)
  return jnp.cumsum(log_vote, axis=0) if gate == 'input' else log_vote


def sample_gates(gate: str, key: jax.Array, vote_logits: jax.Array, layer_index: jax.Array, *,
                 temperature: float | None = None, stretch: Sequence[float] | None = None,
                 relaxation: relaxations.Relaxation | None = None, example_offset=0,
                 global_batch: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Samples the gate at depth ``layer_index`` (may be traced).

  Args:
    gate: ``'input'`` or ``'hidden'``.
    key: PRNG key.
    vote_logits: ``(num_states, batch, seq)`` from a probe.
    layer_index: scalar depth ``l``.
    temperature, stretch: Hard Concrete's parameters, when ``relaxation`` is None.
    relaxation: the gates' distribution (see :mod:`dmx.relaxations`);
      default Hard Concrete.
    example_offset, global_batch: when ``vote_logits`` hold rows
      ``example_offset ..`` of a batch of ``global_batch`` rows split across
      devices, the noise is drawn for the whole batch and these rows taken, so
      the gates do not depend on how the batch is split (``example_offset``
      may be traced).

  Returns:
    ``gates`` ``(batch, seq)`` in ``[0, 1]`` (float32) and ``log_keep_prob``
    ``(batch, seq)``, the log-probability that each gate is open.
  """
  relaxation = gate_relaxation(relaxation, temperature, stretch)
  num_states, batch, seq = vote_logits.shape
  # one batch on one device is the case global_batch = batch, offset 0
  noise = relaxation.noise(key, (num_states, global_batch or batch, seq))
  noise = jax.lax.dynamic_slice_in_dim(noise, example_offset, batch, axis=1)
  votes = relaxation.sample(noise, vote_logits)
  log_keep = gate_log_keep_probs(gate, vote_logits, relaxation=relaxation)
  if gate == 'input':
    votes = jnp.cumprod(votes, axis=0)
  return votes[layer_index], log_keep[layer_index]


def sample_log_prob(gate: str, vote_logits: jax.Array, gates: jax.Array, layer_index: jax.Array,
                    *, relaxation: relaxations.Relaxation) -> jax.Array:
  """``log p(gates)`` of binary gates sampled at depth ``layer_index``: ``(batch, seq)``.

  For the score-function estimator. A hidden gate is the vote of depth l, a
  Bernoulli. An input gate is the product of the independent Bernoulli votes
  up to depth l, itself a Bernoulli with ``log P(open) = sum_k log P(v_k open)``;
  its probability (rather than the joint probability of the votes) is what
  the output depends on, and scoring it is unbiased with less variance
  (Rao-Blackwellisation over the votes that the product hides).

  Args:
    gates: ``(batch, seq)`` gates from :func:`sample_gates`, each 0 or 1.
    relaxation: a relaxation with ``binary`` samples.

  Raises:
    ValueError: the relaxation's samples are not binary (a continuous
      product of votes has no closed-form density).
  """
  if not relaxation.binary:
    raise ValueError(f'sample_log_prob needs binary gates; {relaxation.name!r} samples lie in [0, 1]')
  log_keep = gate_log_keep_probs(gate, vote_logits, relaxation=relaxation)[layer_index]
  return jnp.where(gates > 0.0, log_keep, relaxations.log1mexp(log_keep))


def select_baseline(baselines: Sequence[jax.Array], layer_index) -> jax.Array:
  """Baseline of state ``layer_index``: a Python int, or a traced index when all dims agree."""
  if isinstance(layer_index, int):
    return baselines[layer_index]
  if len({b.shape for b in baselines}) != 1:
    raise ValueError('a traced layer index needs baselines of one width; '
                     'models with states of different widths must pass static indices')
  return jnp.stack(baselines)[layer_index]


def replace_with_baseline(state: jax.Array, gates: jax.Array, baseline: jax.Array) -> jax.Array:
  """``z * h + (1 - z) * b`` (paper eqs. 1 and 3), in the state's dtype.

  ``(batch, seq, dim), (batch, seq), (dim,) -> (batch, seq, dim)``; the mix is
  computed in float32 so bfloat16 models keep exact zeros and ones.
  """
  gates = gates.astype(jnp.float32)[..., None]
  mixed = gates * state.astype(jnp.float32) + (1.0 - gates) * baseline.astype(jnp.float32)
  return mixed.astype(state.dtype)
