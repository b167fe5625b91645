"""Gate relaxations behind one interface: Hard Concrete and its relatives.

DiffMask needs a gate ``z`` in ``[0, 1]`` per token whose distribution is set
by one logit, a way to differentiate the objective through samples of it, and
a keep probability to penalise and to report. A :class:`Relaxation` bundles
these as pure functions, in the style of ``optax.GradientTransformation``::

    relaxation = relaxations.hard_kuma()
    noise = relaxation.noise(key, logits.shape)      # parameter-free noise
    gates = relaxation.sample(noise, logits)         # (differentiable) gates
    keep = jnp.exp(relaxation.log_keep_prob(logits)) # what the L0 penalty sees

Splitting the noise from the sample lets a data-parallel step draw the noise
of the global batch once and give every device its rows
(:func:`dmx.probes.sample_gates`). Every relaxation here uses standard
logistic noise ``L = logit(u)``, ``u ~ U(0, 1)``, so with one key they are
coupled: the Bernoulli gate ``1[L + logit > 0]`` is the zero-temperature limit
of the Binary Concrete gate drawn from the same noise.

The five relaxations, with how their gradients reach the logits:

===================  ==============================================  ================
name                 distribution of z                               gradient
===================  ==============================================  ================
``hard_concrete``    stretched, clipped Binary Concrete (Louizos      reparameterised
                     et al. 2018); DiffMask's default
``binary_concrete``  Binary Concrete / Gumbel-sigmoid, no stretch     reparameterised
``hard_kuma``        stretched, rectified Kumaraswamy (Bastings et    reparameterised
                     al. 2019)
``straight_through`` Bernoulli(sigmoid(logit)); backward pass as if   straight-through
                     ``z = sigmoid(logit / T)``
``reinforce``        Bernoulli(sigmoid(logit)); no pathwise gradient  score function
===================  ==============================================  ================

For ``reinforce`` the trainer adds the score-function surrogate itself
(``stop_gradient(D - baseline) * log p(z)``, see :mod:`dmx.train`): a sample
carries no gradient, and :attr:`Relaxation.log_prob` gives ``log p(z)``.

Every function computes in float32 whatever the dtype of ``logits``,
broadcasts elementwise, and stays finite (values and gradients) for logits as
large as ``+-1e4``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# the module is imported as ``hc``: ``hard_concrete`` names its factory here
from dmx import hard_concrete as hc

REPARAMETERISED = 'reparameterised'
STRAIGHT_THROUGH = 'straight_through'
SCORE_FUNCTION = 'score_function'
GRADIENTS = (REPARAMETERISED, STRAIGHT_THROUGH, SCORE_FUNCTION)

NAMES = ('hard_concrete', 'binary_concrete', 'hard_kuma', 'straight_through', 'reinforce')

DEFAULT_BINARY_CONCRETE_TEMPERATURE = 0.5
DEFAULT_KUMA_B = 0.5
DEFAULT_KUMA_STRETCH = (-0.1, 1.1)  # Bastings et al.'s (l, r)

# outside these bounds of log a the Kumaraswamy shape a is 0 or inf in effect;
# clipping keeps exp(+-log a) finite in float32 and the gradients free of 0 * inf
_KUMA_LOG_A_RANGE = (-80.0, 40.0)


class Relaxation(NamedTuple):
  """A gate distribution parameterised by one logit per gate, as pure functions.

  Every function maps float arrays elementwise (any shape, e.g.
  ``(num_states, batch, seq)``) and returns float32.

  Attributes:
    name: one of :data:`NAMES`.
    gradient: how a sample's gradient reaches the logits: ``'reparameterised'``
      (pathwise, unbiased for the relaxed objective), ``'straight_through'``
      (biased pathwise surrogate) or ``'score_function'`` (samples carry no
      gradient; the caller builds a REINFORCE surrogate from ``log_prob``).
    binary: whether samples are exactly 0 or 1 (Bernoulli gates). A product
      of binary gates is again a Bernoulli gate, which is what lets an input
      gate (the product of votes over depths) have a closed-form ``log p``.
    noise: ``(key, shape) -> noise``, the parameter-free noise of ``shape``
      (float32) that ``sample`` turns into gates.
    sample: ``(noise, logits) -> gates`` in ``[0, 1]``, ``noise`` of
      ``logits.shape``.
    log_keep_prob: ``logits -> log P(gate open)``. For a distribution with an
      atom at 0 (all but ``binary_concrete``) this is exactly
      ``log P(z != 0)``, the expected-L0 quantity. A Binary Concrete sample is
      never exactly 0; it reports the open probability of the Bernoulli it
      relaxes, ``log P(z > 1/2) = log sigmoid(logit)``.
    prob_zero: ``logits -> P(z = 0)`` (0 where there is no atom at 0).
    prob_one: ``logits -> P(z = 1)`` (0 where there is no atom at 1).
    deterministic_gate: ``logits -> gate`` to use at test time: the median of
      ``z`` for the continuous relaxations with atoms (``hard_concrete``,
      ``hard_kuma``: exactly 0 when ``P(z = 0) >= 1/2``), and
      ``1[logit > 0]``, the gate that is more likely than not open, for the
      others (a Binary Concrete median ``sigmoid(logit / T)`` is never
      exactly 0, so it could mask nothing).
    log_prob: ``(gates, logits) -> log p(gates)``, the log-density against
      Lebesgue measure on ``(0, 1)`` plus atoms at 0 and 1 (for binary
      relaxations: the log-probability mass). ``-inf`` outside the support.
  """
  name: str
  gradient: str
  binary: bool
  noise: Callable[[jax.Array, Sequence[int]], jax.Array]
  sample: Callable[[jax.Array, jax.Array], jax.Array]
  log_keep_prob: Callable[[jax.Array], jax.Array]
  prob_zero: Callable[[jax.Array], jax.Array]
  prob_one: Callable[[jax.Array], jax.Array]
  deterministic_gate: Callable[[jax.Array], jax.Array]
  log_prob: Callable[[jax.Array, jax.Array], jax.Array]


def draw(relaxation: Relaxation, key: jax.Array, logits: jax.Array) -> jax.Array:
  """Gates of ``logits.shape`` from fresh noise: ``sample(noise(key, shape), logits)``."""
  return relaxation.sample(relaxation.noise(key, jnp.shape(logits)), logits)


def logistic_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Standard logistic noise ``logit(u)``, ``u ~ U(0, 1)``, float32 (the noise of every relaxation here)."""
  return jax.random.logistic(key, tuple(shape), dtype=jnp.float32)


def _as_float32(values) -> jax.Array:
  return jnp.asarray(values).astype(jnp.float32)


def _checked_noise(noise: jax.Array, logits: jax.Array) -> jax.Array:
  if noise.shape != logits.shape:
    raise ValueError(f'noise has shape {noise.shape}, logits {logits.shape}')
  return _as_float32(noise)


def log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2`` (Maechler, 2012).

  ``x`` is held below ``-tiny`` so that ``x = 0`` gives a large negative
  number instead of ``-inf`` and a NaN gradient.
  """
  x = jnp.minimum(_as_float32(x), -jnp.finfo(jnp.float32).tiny)
  near_zero = x > -math.log(2.0)
  # each branch sees only inputs it is accurate and finite on (double where)
  near = jnp.where(near_zero, x, -1.0)
  far = jnp.where(near_zero, -1.0, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(near)), jnp.log1p(-jnp.exp(far)))


def log1mexp_neg_exp(t: jax.Array) -> jax.Array:
  """``log(1 - exp(-exp(t)))`` for any real ``t``, finite with finite gradients.

  It is the building block of the Kumaraswamy distribution: with
  ``a = exp(logit)``, ``log(1 - x^a) = log1mexp_neg_exp(logit + log(-log x))``.
  For ``t -> -inf`` it is ``t - exp(t) / 2 + ...``; for ``t -> +inf`` it is 0.
  """
  # exp(-exp(40)) is 0 in float32; above it the gradient exp(-e^t) e^t would be 0 * inf
  t = jnp.minimum(_as_float32(t), 40.0)
  small = t < -15.0
  large = t > math.log(math.log(2.0))  # exp(-e^t) < 1/2: log1p is accurate there
  middle = ~small & ~large
  t_small = jnp.where(small, t, -20.0)
  t_middle = jnp.where(middle, t, -1.0)
  t_large = jnp.where(large, t, 0.0)
  return jnp.where(small, t_small - 0.5 * jnp.exp(t_small),
                   jnp.where(middle, jnp.log(-jnp.expm1(-jnp.exp(t_middle))),
                             jnp.log1p(-jnp.exp(-jnp.exp(t_large)))))


def _log_softplus(x: jax.Array) -> jax.Array:
  """``log(softplus(x))``, which is ``x`` to float32 precision below -15 (no log of 0)."""
  safe = jnp.maximum(x, -15.0)
  return jnp.where(x < -15.0, x, jnp.log(jax.nn.softplus(safe)))


def _bernoulli_log_prob(gates, logits):
  logits = _as_float32(logits)
  gates = _as_float32(gates)
  mass = jnp.where(gates >= 0.5, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
  return jnp.where((gates == 0.0) | (gates == 1.0), mass, -jnp.inf)


def _open_if_positive(logits):
  return (_as_float32(logits) > 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Hard Concrete
# ----------------------------------------------------------------------------

def hard_concrete(temperature: float = hc.DEFAULT_TEMPERATURE,
                  stretch: Sequence[float] = hc.DEFAULT_STRETCH) -> Relaxation:
  """Hard Concrete gates (Louizos et al., 2018), the functions of :mod:`dmx.hard_concrete`.

  ``z = clip(sigmoid((L + logit) / temperature) * (high - low) + low, 0, 1)``.
  Defaults are DiffMask's original ``(0.2, (-0.2, 1.0))``; Louizos et al. use
  ``(2/3, (-0.1, 1.1))``. Raises ValueError unless ``temperature > 0`` and
  ``low < 0 < 1 <= high``.
  """
  hc.check_parameters(temperature, stretch)
  stretch = tuple(float(bound) for bound in stretch)
  kwargs = dict(temperature=temperature, stretch=stretch)

  def sample(noise, logits):
    logits = _as_float32(logits)
    return hc.sample(None, logits, noise=_checked_noise(noise, logits), **kwargs)

  return Relaxation(
      name='hard_concrete', gradient=REPARAMETERISED, binary=False, noise=logistic_noise,
      sample=sample,
      log_keep_prob=lambda logits: hc.log_prob_nonzero(logits, **kwargs),
      prob_zero=lambda logits: 1.0 - hc.prob_nonzero(logits, **kwargs),
      prob_one=lambda logits: hc.prob_one(logits, **kwargs),
      deterministic_gate=lambda logits: hc.deterministic_gate(logits, **kwargs),
      log_prob=lambda gates, logits: hc.log_density(gates, logits, **kwargs))


# ----------------------------------------------------------------------------
# Binary Concrete
# ----------------------------------------------------------------------------

def binary_concrete(temperature: float = DEFAULT_BINARY_CONCRETE_TEMPERATURE) -> Relaxation:
  """Binary Concrete / Gumbel-sigmoid gates (Maddison et al.; Jang et al., 2017), no stretch.

  ``z = sigmoid((L + logit) / temperature)`` lies in ``(0, 1)``: no gate is
  ever exactly closed. It relaxes ``Bernoulli(sigmoid(logit))``, which it
  approaches as ``temperature -> 0``; ``log_keep_prob`` and
  ``deterministic_gate`` are that Bernoulli's. Raises ValueError unless
  ``temperature > 0``.
  """
  if not temperature > 0:
    raise ValueError(f'Binary Concrete temperature must be > 0, got {temperature}')

  def sample(noise, logits):
    logits = _as_float32(logits)
    return jax.nn.sigmoid((_checked_noise(noise, logits) + logits) / temperature)

  def log_prob(gates, logits):
    # z = sigmoid((L + a) / T)  <=>  L = T * logit(z) - a, so p(z) = T p_L(y) / (z (1 - z))
    logits, gates = _as_float32(logits), _as_float32(gates)
    tiny, epsneg = jnp.finfo(jnp.float32).tiny, jnp.finfo(jnp.float32).epsneg
    safe = jnp.clip(gates, tiny, 1.0 - epsneg)
    log_z, log_rest = jnp.log(safe), jnp.log1p(-safe)
    y = temperature * (log_z - log_rest) - logits
    density = (math.log(temperature) + jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)
               - log_z - log_rest)
    return jnp.where((gates > 0.0) & (gates < 1.0), density, -jnp.inf)

  zeros = lambda logits: jnp.zeros_like(_as_float32(logits))
  return Relaxation(
      name='binary_concrete', gradient=REPARAMETERISED, binary=False, noise=logistic_noise,
      sample=sample, log_keep_prob=lambda logits: jax.nn.log_sigmoid(_as_float32(logits)),
      prob_zero=zeros, prob_one=zeros, deterministic_gate=_open_if_positive, log_prob=log_prob)


# ----------------------------------------------------------------------------
# HardKuma
# ----------------------------------------------------------------------------

def hard_kuma(b: float = DEFAULT_KUMA_B,
              stretch: Sequence[float] = DEFAULT_KUMA_STRETCH) -> Relaxation:
  """HardKuma gates (Bastings et al., 2019): a stretched, rectified Kumaraswamy.

  ``x ~ Kuma(a, b)`` on ``(0, 1)`` with CDF ``1 - (1 - x^a)^b``, stretched to
  ``(low, high)`` and clipped: ``z = clip(x * (high - low) + low, 0, 1)``.
  Bastings et al. predict both shapes from the network; here one logit per
  gate sets ``a`` and ``b`` is shared::

      a = b * softplus(logit / b) / -log(t0),   t0 = -low / (high - low),

  which makes the logit mean what it means for the other relaxations:
  ``P(z != 0) ~ sigmoid(logit)`` in both tails (``log P(z != 0) ~ logit +
  b log b`` as ``logit -> -inf``, ``P(z = 0) ~ b exp(-logit)`` as
  ``logit -> +inf``). The simpler ``a = exp(logit)`` makes ``P(z = 0)`` fall
  double-exponentially: at the probes' initial logit 5 it is ``e^-370``, the
  sparsity gradient vanishes and training never starts. With ``a, b < 1``
  the density is U-shaped; a larger logit moves mass towards 1. Closed forms,
  with ``t1 = (1 - low) / (high - low)``::

      P(z != 0) = (1 - t0^a)^b,   P(z = 1) = (1 - t1^a)^b,
      x = (1 - (1 - u)^(1/b))^(1/a),   median x = (1 - 2^(-1/b))^(1/a).

  Everything is computed in log space (``log(1 - x^a) =
  log1mexp_neg_exp(log a + log(-log x))``), with ``log a`` clipped to
  ``[-80, 40]``, beyond which ``a`` is 0 or infinite for all float32 purposes.

  The default stretch is Bastings et al.'s. In this family an open gate
  reaches 1 slowly: at DiffMask's initial vote logit 5 a gate is on average
  only 82% open (Hard Concrete's: 99%), and on the toy task the probe then
  keeps every gate open; ``stretch=(-0.5, 1.5)`` (94% open at logit 5)
  trains like Hard Concrete there (``docs/RESULTS.md``, issue 6).

  Raises ValueError unless ``b > 0`` and ``low < 0 < 1 <= high``.
  """
  low, high = (float(bound) for bound in stretch)
  if not b > 0:
    raise ValueError(f'HardKuma b must be > 0, got {b}')
  if not (low < 0.0 and high >= 1.0):
    raise ValueError(f'HardKuma stretch must satisfy low < 0 and high >= 1, got {tuple(stretch)}')
  width = high - low
  log_b = math.log(b)
  # log(-log t) of the two thresholds: z = 0 iff x <= t0, z = 1 iff x >= t1
  zero_shift = math.log(-math.log(-low / width))
  has_one = high > 1.0
  one_shift = math.log(-math.log((1.0 - low) / width)) if has_one else 0.0

  def log_a(logits):
    log_shape = log_b + _log_softplus(_as_float32(logits) / b) - zero_shift
    return jnp.clip(log_shape, *_KUMA_LOG_A_RANGE)

  def stretch_and_rectify(log_x):
    return jnp.clip(jnp.exp(log_x) * width + low, 0.0, 1.0)

  def sample(noise, logits):
    noise = _checked_noise(noise, _as_float32(logits))
    # u = sigmoid(L): -log(1 - u) = softplus(L), so
    # log(1 - (1 - u)^(1/b)) = log(1 - exp(-exp(log softplus(L) - log b)))
    log_base = log1mexp_neg_exp(_log_softplus(noise) - log_b)
    return stretch_and_rectify(log_base * jnp.exp(-log_a(logits)))

  def log_keep_prob(logits):
    return b * log1mexp_neg_exp(log_a(logits) + zero_shift)

  def log_prob_one(logits):
    if not has_one:
      return jnp.full_like(_as_float32(logits), -jnp.inf)
    return b * log1mexp_neg_exp(log_a(logits) + one_shift)

  def deterministic_gate(logits):
    log_median_base = math.log(-math.expm1(-math.log(2.0) / b))  # log(1 - 2^(-1/b))
    return stretch_and_rectify(log_median_base * jnp.exp(-log_a(logits)))

  def log_prob(gates, logits):
    shape_a, gates = log_a(logits), _as_float32(gates)
    x = (gates - low) / width
    safe_x = jnp.clip(x, jnp.finfo(jnp.float32).tiny, 1.0 - jnp.finfo(jnp.float32).epsneg)
    log_x = jnp.log(safe_x)
    # Kuma density a b x^(a-1) (1 - x^a)^(b-1), divided by the stretch's width
    density = (shape_a + log_b + (jnp.exp(shape_a) - 1.0) * log_x
               + (b - 1.0) * log1mexp_neg_exp(shape_a + jnp.log(-log_x)) - math.log(width))
    at_zero = log1mexp(log_keep_prob(logits))
    at_one = log_prob_one(logits)
    value = jnp.where(gates <= 0.0, at_zero, jnp.where(gates >= 1.0, at_one, density))
    return jnp.where((gates < 0.0) | (gates > 1.0), -jnp.inf, value)

  return Relaxation(
      name='hard_kuma', gradient=REPARAMETERISED, binary=False, noise=logistic_noise,
      sample=sample, log_keep_prob=log_keep_prob,
      prob_zero=lambda logits: -jnp.expm1(log_keep_prob(logits)),
      prob_one=lambda logits: jnp.exp(log_prob_one(logits)),
      deterministic_gate=deterministic_gate, log_prob=log_prob)


# ----------------------------------------------------------------------------
# Bernoulli gates
# ----------------------------------------------------------------------------

def _bernoulli(noise, logits):
  """``1[L + logit > 0]``: a ``Bernoulli(sigmoid(logit))`` draw from logistic noise."""
  logits = _as_float32(logits)
  return (_checked_noise(noise, logits) + logits > 0.0).astype(jnp.float32)


def _bernoulli_relaxation(name: str, gradient: str, sample) -> Relaxation:
  return Relaxation(
      name=name, gradient=gradient, binary=True, noise=logistic_noise, sample=sample,
      log_keep_prob=lambda logits: jax.nn.log_sigmoid(_as_float32(logits)),
      prob_zero=lambda logits: jax.nn.sigmoid(-_as_float32(logits)),
      prob_one=lambda logits: jax.nn.sigmoid(_as_float32(logits)),
      deterministic_gate=_open_if_positive, log_prob=_bernoulli_log_prob)


def straight_through(temperature: float = 1.0) -> Relaxation:
  """Straight-through Bernoulli gates (Bengio et al., 2013).

  The forward pass uses the hard draw ``z in {0, 1}`` of
  ``Bernoulli(sigmoid(logit))``; the backward pass differentiates as if
  ``z = sigmoid(logit / temperature)``: ``z = hard + s - stop_gradient(s)``.
  ``temperature = 1`` is the plain estimator; a larger one widens the window
  of logits that still get a gradient (the slope-annealing of Chung et al.,
  2017, run the other way). Raises ValueError unless ``temperature > 0``.
  """
  if not temperature > 0:
    raise ValueError(f'straight-through temperature must be > 0, got {temperature}')

  def sample(noise, logits):
    hard = _bernoulli(noise, logits)
    surrogate = jax.nn.sigmoid(_as_float32(logits) / temperature)
    # (s - stop_gradient(s)) is exactly 0 forward, so the value stays exactly 0 or 1
    return hard + (surrogate - jax.lax.stop_gradient(surrogate))

  return _bernoulli_relaxation('straight_through', STRAIGHT_THROUGH, sample)


def reinforce() -> Relaxation:
  """Bernoulli gates for the score-function (REINFORCE) estimator (Williams, 1992).

  Samples carry no gradient. The trainer differentiates
  ``stop_gradient(D - baseline) * log_prob(z, logit)`` instead, whose
  expectation has the gradient of ``E[D]``; the baseline (a moving average of
  ``D``, see :mod:`dmx.train`) lowers the variance without adding bias.
  """
  return _bernoulli_relaxation('reinforce', SCORE_FUNCTION,
                               lambda noise, logits: jax.lax.stop_gradient(_bernoulli(noise, logits)))


# ----------------------------------------------------------------------------
# the score-function (REINFORCE) estimator's pieces
# ----------------------------------------------------------------------------

def score_function_surrogate(reward: jax.Array, log_prob: jax.Array,
                             mask: jax.Array) -> jax.Array:
  """Per-example REINFORCE surrogate: value 0, gradient ``reward * d log p(z)``.

  ``stop_gradient(reward) * sum_{real tokens} log p(z)``, minus its own value,
  so adding it to a loss leaves the loss's value unchanged while its gradient
  gains the score-function estimate of ``d E[reward] / d logits`` (unbiased
  when ``reward`` is the sampled loss minus a baseline that does not depend on
  this sample). Padding is left out: the models never read it.

  Args:
    reward: ``(batch,)`` what the sample scored (no gradient flows through it).
    log_prob: ``(batch, seq)`` ``log p(z)`` of the sampled gates (see
      :attr:`Relaxation.log_prob`, or :func:`dmx.probes.sample_log_prob`).
    mask: ``(batch, seq)`` true on real tokens.

  Returns:
    ``(batch,)`` zeros carrying the estimator's gradient.
  """
  example_log_prob = jnp.sum(jnp.where(mask, _as_float32(log_prob), 0.0), axis=-1)
  surrogate = jax.lax.stop_gradient(_as_float32(reward)) * example_log_prob
  return surrogate - jax.lax.stop_gradient(surrogate)


def moving_average(average: jax.Array, value: jax.Array, decay: float) -> jax.Array:
  """``decay * average + (1 - decay) * value``: one step of a REINFORCE baseline."""
  return decay * average + (1.0 - decay) * value


def bias_corrected_average(average: jax.Array, count: jax.Array, decay: float) -> jax.Array:
  """A :func:`moving_average` started at 0, divided by ``1 - decay^count`` (as in Adam).

  After ``count`` updates it is a weighted mean of the values seen; before
  the first (``count = 0``) it is 0, i.e. plain REINFORCE.
  """
  count = jnp.asarray(count).astype(jnp.float32)
  correction = jnp.maximum(1.0 - decay ** count, jnp.finfo(jnp.float32).tiny)
  return jnp.where(count > 0, average / correction, 0.0)


# ----------------------------------------------------------------------------
# by name
# ----------------------------------------------------------------------------

_FACTORIES = {'hard_concrete': hard_concrete, 'binary_concrete': binary_concrete,
              'hard_kuma': hard_kuma, 'straight_through': straight_through,
              'reinforce': reinforce}


def by_name(name: str, **options) -> Relaxation:
  """The relaxation ``name`` (one of :data:`NAMES`) built with its factory's ``options``.

  Raises ValueError (one line) for an unknown name, an option the factory does
  not take, or an invalid value.
  """
  if name not in _FACTORIES:
    raise ValueError(f'unknown relaxation {name!r}; choose one of {NAMES}')
  factory = _FACTORIES[name]
  accepted = set(inspect.signature(factory).parameters)
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(f'relaxation {name!r} does not take {unknown}; it takes {sorted(accepted)}')
  return factory(**options)
