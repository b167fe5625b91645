"""Hard Concrete gates (Louizos et al., 2018) as pure, jittable functions.

A Hard Concrete gate is a Binary Concrete variable ``s`` stretched to the
interval ``(low, high)`` and clipped to ``[0, 1]``::

    s = sigmoid((logistic_noise + logits) / temperature)
    z = clip(s * (high - low) + low, 0, 1)

With ``low < 0`` the gate is exactly zero with positive probability, which is
what lets DiffMask block an input completely. DiffMask's original code uses
``temperature=0.2, stretch=(-0.2, 1.0)``: with ``high = 1`` the value 1 has
probability zero, the paper's half-open ``[0, 1)`` variant. Louizos et al. use
``temperature=2/3, stretch=(-0.1, 1.1)``.

(The paper's eq. 11 writes ``s * (l - r) + r``; that maps large logits to
closed gates. We follow the original code and Louizos et al.:
``s * (r - l) + l``, so a larger logit means a more open gate.)

Every function computes in float32 whatever the dtype of ``logits`` and
broadcasts elementwise, so it works under ``vmap`` and ``grad`` and for any
shape, e.g. ``(batch, seq)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

DEFAULT_TEMPERATURE = 0.2
DEFAULT_STRETCH = (-0.2, 1.0)
LOUIZOS_TEMPERATURE = 2.0 / 3.0
LOUIZOS_STRETCH = (-0.1, 1.1)


def check_parameters(temperature: float, stretch: Sequence[float]) -> None:
  """Raises ValueError when (temperature, stretch) is not a Hard Concrete.

  Needs ``temperature > 0`` and ``low < 0 < 1 <= high`` so that the gate has
  mass at zero and reaches one.
  """
  low, high = stretch
  if not temperature > 0:
    raise ValueError(f'Hard Concrete temperature must be > 0, got {temperature}')
  if not (low < 0.0 and high >= 1.0):
    raise ValueError(
        f'Hard Concrete stretch must satisfy low < 0 and high >= 1, got {tuple(stretch)}')


def _as_float32(logits):
  return jnp.asarray(logits).astype(jnp.float32)


def _zero_threshold(temperature: float, stretch: Sequence[float]) -> float:
  """The logit at which P(z != 0) = 1/2: ``temperature * log(-low / high)``."""
  low, high = stretch
  return temperature * math.log(-low / high)


def sample(key: jax.Array | None, logits: jax.Array, *,
           temperature: float = DEFAULT_TEMPERATURE,
           stretch: Sequence[float] = DEFAULT_STRETCH,
           noise: jax.Array | None = None) -> jax.Array:
  """Draws reparameterised Hard Concrete gates.

  Args:
    key: PRNG key (ignored when ``noise`` is given).
    logits: location parameters ``log alpha``, any shape, e.g. ``(batch, seq)``.
    temperature: Binary Concrete temperature.
    stretch: ``(low, high)`` of the stretched interval.
    noise: standard logistic noise of ``logits.shape`` to use instead of
      drawing it from ``key`` (a data-parallel step slices its rows out of the
      global batch's noise, so every split draws the same gates).

  Returns:
    float32 gates of ``logits.shape`` in ``[0, 1]`` with true zeros; the
    gradient with respect to ``logits`` flows through the non-clipped samples.
  """
  logits = _as_float32(logits)
  low, high = stretch
  # logistic noise is log(u) - log(1 - u) computed without overflow at u -> 0, 1
  if noise is None:
    noise = jax.random.logistic(key, logits.shape, dtype=jnp.float32)
  elif noise.shape != logits.shape:
    raise ValueError(f'noise has shape {noise.shape}, logits {logits.shape}')
  concrete = jax.nn.sigmoid((noise + logits) / temperature)
  return jnp.clip(concrete * (high - low) + low, 0.0, 1.0)


def log_prob_nonzero(logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
                     stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """``log P(z != 0)`` in closed form, elementwise over ``logits``.

  ``P(z != 0) = sigmoid(logits - temperature * log(-low / high))``.
  """
  return jax.nn.log_sigmoid(_as_float32(logits) - _zero_threshold(temperature, stretch))


def prob_nonzero(logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
                 stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """``P(z != 0)``, the expected L0 contribution of each gate, elementwise."""
  return jax.nn.sigmoid(_as_float32(logits) - _zero_threshold(temperature, stretch))


def cdf(value: jax.Array, logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
        stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """``P(z <= value)``; broadcasts ``value`` against ``logits``.

  It is 0 below 0, ``P(z = 0)`` at 0, continuous on ``(0, 1)`` and 1 from 1 on.
  """
  logits = _as_float32(logits)
  value = jnp.asarray(value, jnp.float32)
  low, high = stretch
  # z <= t  <=>  s <= (t - low) / (high - low)  for t in [0, 1)
  unit = (value - low) / (high - low)
  tiny = jnp.finfo(jnp.float32).tiny
  safe_unit = jnp.clip(unit, tiny, 1.0 - jnp.finfo(jnp.float32).epsneg)
  inside = jax.nn.sigmoid(temperature * (jnp.log(safe_unit) - jnp.log1p(-safe_unit)) - logits)
  return jnp.where(value < 0.0, 0.0, jnp.where(value >= 1.0, 1.0, inside))


def deterministic_gate(logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
                       stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """The test-time gate: the median of the Hard Concrete distribution.

  ``clip(sigmoid(logits / temperature) * (high - low) + low, 0, 1)``. It is
  exactly 0 when ``P(z = 0) >= 1/2``, so a deterministic mask closes exactly the
  gates that are more likely closed than open. (Louizos et al. use
  ``sigmoid(logits)`` without the temperature; the two agree at temperature 1.)
  """
  logits = _as_float32(logits)
  low, high = stretch
  return jnp.clip(jax.nn.sigmoid(logits / temperature) * (high - low) + low, 0.0, 1.0)


def prob_one(logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
             stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """``P(z = 1)``, elementwise: ``sigmoid(logits - temperature * logit((1 - low) / (high - low)))``.

  Exactly 0 for ``high = 1`` (the original's half-open variant never reaches 1).
  """
  return jnp.exp(log_prob_one(logits, temperature=temperature, stretch=stretch))


def log_prob_one(logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
                 stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """``log P(z = 1)``, elementwise; ``-inf`` for ``high = 1``."""
  logits = _as_float32(logits)
  low, high = stretch
  if high <= 1.0:
    return jnp.full_like(logits, -jnp.inf)
  unit = (1.0 - low) / (high - low)
  return jax.nn.log_sigmoid(logits - temperature * math.log(unit / (1.0 - unit)))


def log_density(value: jax.Array, logits: jax.Array, *, temperature: float = DEFAULT_TEMPERATURE,
                stretch: Sequence[float] = DEFAULT_STRETCH) -> jax.Array:
  """Log-density of ``z`` against Lebesgue measure on ``(0, 1)`` plus atoms at 0 and 1.

  At ``value == 0`` it is ``log P(z = 0)``, at ``value == 1`` ``log P(z = 1)``
  (``-inf`` when ``high = 1``), and inside it is the stretched Binary Concrete
  density: with ``s = (z - low) / (high - low)`` and
  ``y = temperature * logit(s) - logits`` (so that ``P(s' <= s) = sigmoid(y)``),
  ``log f(z) = log T + log sigmoid(y) + log sigmoid(-y) - log s - log(1 - s) - log(high - low)``.
  Broadcasts ``value`` against ``logits``; ``-inf`` outside ``[0, 1]``.
  """
  logits = _as_float32(logits)
  value = jnp.asarray(value, jnp.float32)
  low, high = stretch
  unit = (value - low) / (high - low)
  # keep log(0) out of the branches that ``where`` discards (their gradients would be NaN)
  safe_unit = jnp.clip(unit, jnp.finfo(jnp.float32).tiny, 1.0 - jnp.finfo(jnp.float32).epsneg)
  log_unit, log_rest = jnp.log(safe_unit), jnp.log1p(-safe_unit)
  y = temperature * (log_unit - log_rest) - logits
  inside = (math.log(temperature) + jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)
            - log_unit - log_rest - math.log(high - low))
  at_zero = jax.nn.log_sigmoid(_zero_threshold(temperature, stretch) - logits)
  at_one = log_prob_one(logits, temperature=temperature, stretch=stretch)
  density = jnp.where(value <= 0.0, at_zero, jnp.where(value >= 1.0, at_one, inside))
  return jnp.where((value < 0.0) | (value > 1.0), -jnp.inf, density)
