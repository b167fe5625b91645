"""Per-example (non-amortised) masks: DiffMask with free logits, and REINFORCE (paper sec. 4.2.1).

Without amortisation there is no probe: every position ``t`` of every example
``i`` has its own gate logit ``a_it``, learned for that example alone. Both
methods solve DiffMask's constrained problem per example,

    min_a  E[L0(z_i)]   s.t.   E[D_i] <= margin,
    D_i = KL(y_i || y_hat_i(z_i)),  y_hat_i = f(z_i * h_i + (1 - z_i) * b),

through its Lagrangian ``lambda_i * (E[D_i] - margin) + E[L0(z_i)]``, minimised
over the logits and maximised over a per-example multiplier
``lambda_i in [0, multiplier_max]`` (one sample of the gates serves both
updates, as in :mod:`dmx.train`). ``E[L0]`` is in closed form (the mean over
real positions of ``P(z != 0)``, or its log with ``sparsity='log_l0'``);
``E[D]`` is estimated from ``samples`` draws of the gates. They differ only in
the gates and in how the gradient of ``E[D]`` reaches the logits (with
``flip_penalty > 0`` both add the size of a flipped prediction to ``D_i``,
:func:`dmx.objective.argmax_flip`, which is not the paper's problem):

* :func:`per_example_diffmask`: Hard Concrete gates, reparameterised
  (pathwise) gradients, DiffMask's relaxation;
* :func:`per_example_reinforce`: Bernoulli gates and the score-function
  estimator ``lambda_i (D_i - b_i) d log p(z_i)`` with ``b_i`` a per-example,
  bias-corrected moving average of ``D_i`` (Williams, 1992), the paper's
  "REINFORCE with a moving average baseline". ``reward='original'`` is the
  original code's estimator instead (``PerSampleREINFORCE...`` in
  ``sentiment_classification_sst_diffmask.py``): its loss is
  ``alpha * loss_c.detach() + loss_g + reward * log_p`` with
  ``loss_c = D - margin`` and ``reward = loss_c - b``, ``b`` a moving average
  of ``loss_c`` started at 0, not bias-corrected, and updated with this step's
  ``loss_c`` before the reward is taken. The multiplier multiplies a detached
  term there, so it never reaches the logits: the gates trade sparsity
  against the divergence at a fixed weight of 1, whatever the constraint says.

The answer is the deterministic mask ``1[P(z_it != 0) > 1/2]`` at the final
logits (Hard Concrete's median gate is 0 exactly there; for a Bernoulli it is
``1[a_it > 0]``): a binary keep/erase decision per position, what exact
erasure (:func:`dmx.baselines.erasure_search`) returns. Erased positions
become ``baseline`` (zeros by default), as in erasure.

A closed Hard Concrete gate is a trap without amortisation: once every
sample of a gate is exactly 0 its pathwise gradient is 0, and only the L0
term (pushing it further closed) reaches its logit. Adam rescales that small
push to a full step, so a learning rate that is too large (0.2 with 2 samples
on the tests' one-position model) closes gates that matter before the
multiplier has grown; 0.1 (the default) did not on that model.

Examples are independent: the loss is a sum over examples and the
optimisers are elementwise (Adam or RMSprop on the logits, the DiffMask dual
optimiser on the multipliers), so the batch is the same as a ``vmap`` over
examples. The step is pure; with ``progress=False`` the whole function is
jittable (one ``lax.scan``), with ``progress=True`` it scans in jitted chunks
of ``chunk_steps`` and shows a progress bar.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from dmx import hard_concrete, objective, optim, relaxations
from dmx.baselines.common import (baseline_like, check_classifier_outputs, check_layer_index,
                                  erased_state, outputs_with_state)
from dmx.baselines.schulz import per_example_optimizer
from dmx.models.base import MaskableModel


REWARDS = ('lagrangian', 'original')


class PerExampleMasks(NamedTuple):
  """The masks found by :func:`per_example_diffmask` or :func:`per_example_reinforce`.

  Attributes:
    keep_prob: ``(batch, seq)`` ``P(z != 0)`` at the final logits; 0 on padding.
    mask: ``(batch, seq)`` float32, 1 where the deterministic gate keeps the
      position (``keep_prob > 1/2``), 0 where it erases it and on padding.
    logits: ``(batch, seq)`` the final free logits.
    divergence: ``(batch,)`` ``KL(clean || masked)`` with ``mask`` applied (nats).
    keeps_prediction: ``(batch,)`` bool, whether ``mask`` keeps the argmax.
    multiplier: ``(batch,)`` the final Lagrange multipliers.
    steps: optimisation steps taken.
  """
  keep_prob: jax.Array
  mask: jax.Array
  logits: jax.Array
  divergence: jax.Array
  keeps_prediction: jax.Array
  multiplier: jax.Array
  steps: int


class _SearchState(NamedTuple):
  """What one optimisation step carries (a pytree)."""
  step: jax.Array
  logits: jax.Array
  opt_state: optax.OptState
  multipliers: optax.LookaheadParams
  dual_state: optax.OptState
  score_average: jax.Array


def _reinforce_tracked(divergence: jax.Array, margin: float, reward: str) -> jax.Array:
  """What the REINFORCE baseline averages: ``D`` (``'lagrangian'``) or ``D - margin`` (``'original'``)."""
  return divergence - margin if reward == 'original' else divergence


def reinforce_reward(divergence: jax.Array, multipliers: jax.Array, average: jax.Array,
                     count: jax.Array, *, margin: float, decay: float,
                     reward: str) -> jax.Array:
  """The score each gate sample gets in REINFORCE's surrogate (see ``reward`` in :func:`per_example_masks`).

  Args:
    divergence: ``(samples, batch)`` ``KL(clean || masked)`` of each sample.
    multipliers: ``(batch,)`` the Lagrange multipliers.
    average: ``(batch,)`` the moving average of ``_reinforce_tracked``
      before this step (started at 0).
    count: steps taken so far (updates of ``average``).
    margin, decay: the constraint's margin and the average's decay.
    reward: ``'lagrangian'`` or ``'original'``.

  Returns:
    ``(samples, batch)`` rewards (``'lagrangian'``: ``lambda * (D - corrected
    average)``; ``'original'``: ``(D - margin) - average updated with this
    step's mean``).
  """
  if reward == 'original':
    # the original updates its baseline with this step before taking the reward
    constraint = _reinforce_tracked(divergence, margin, reward)
    return constraint - relaxations.moving_average(average, constraint.mean(axis=0), decay)[None]
  corrected = relaxations.bias_corrected_average(average, count, decay)
  return multipliers[None] * (divergence - corrected[None])


def per_example_masks(model: MaskableModel, params, batch: dict, *,
                      relaxation: relaxations.Relaxation, key: jax.Array | None = None,
                      layer_index: int = 0, baseline: jax.Array | None = None,
                      steps: int = 300, margin: float = 0.1, learning_rate: float = 0.1,
                      samples: int = 4, initial_logit: float = 2.0, optimizer: str = 'adam',
                      sparsity: str = 'l0', multiplier_init: float = 1.0,
                      multiplier_learning_rate: float = 0.1, multiplier_max: float = 200.0,
                      dual_optimizer: str = 'lookahead_rmsprop', baseline_decay: float = 0.9,
                      reward: str = 'lagrangian', logit_bound: float | None = None,
                      flip_penalty: float = 0.0, progress: bool = False, chunk_steps: int = 50,
                      description: str = 'per-example masks') -> PerExampleMasks:
  """Per-example gate logits for ``relaxation``, by the Lagrangian of the module docstring.

  A relaxation with pathwise gradients (``'reparameterised'`` or
  ``'straight_through'``) is differentiated through its samples; a
  ``'score_function'`` one (``relaxations.reinforce()``) through
  :func:`dmx.relaxations.score_function_surrogate` with a per-example moving
  average baseline (decay ``baseline_decay``; see ``reward``).

  Args:
    model: a classifier: outputs ``(batch, classes)``.
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)`` true on real tokens.
    relaxation: the gates' distribution (see :mod:`dmx.relaxations`).
    key: PRNG key of the gate noise (``jax.random.key(0)`` when ``None``).
    layer_index: the state whose positions are gated (0: the embeddings).
    baseline: what an erased position becomes, broadcastable to the state
      ``(batch, seq, dim)``; zeros when ``None``.
    steps: optimisation steps (>= 1).
    margin: tolerated ``KL(clean || masked)`` in nats (>= 0).
    learning_rate: of the logits' optimiser.
    samples: gate draws per example and step (>= 1), averaged.
    initial_logit: every logit's start (positive: gates start open).
    optimizer: ``'adam'`` or ``'rmsprop'`` (centered, torch's conventions).
    sparsity: ``'l0'`` (expected L0: mean ``P(z != 0)`` over real positions)
      or ``'log_l0'`` (mean ``log P(z != 0)``, the original code's).
    multiplier_init, multiplier_learning_rate, multiplier_max, dual_optimizer:
      the per-example dual ascent (see :func:`dmx.optim.dual_optimizer`),
      projected onto ``[0, multiplier_max]``.
    baseline_decay: decay of the REINFORCE baseline, in ``[0, 1)``.
    reward: what a score-function relaxation's sample scores:
      ``'lagrangian'`` (``lambda_i * (D_i - b_i)``, ``b_i`` the bias-corrected
      moving average of ``D_i`` before this step: the estimator of the
      Lagrangian both methods minimise) or ``'original'`` (the original code's
      ``(D_i - margin) - b_i``, ``b_i`` its uncorrected moving average
      including this step, without the multiplier; see the module docstring).
      Ignored by pathwise relaxations.
    logit_bound: when set, every logit is clipped to ``[-logit_bound,
      logit_bound]`` after each update, as the original's per-example code
      does (at 10): with ``sparsity='log_l0'`` the loss of a closing gate
      is unbounded below, and the bound keeps a closed REINFORCE gate within
      reach of reopening (a closed Hard Concrete gate gets no pathwise
      gradient either way). ``None``: unbounded.
    flip_penalty: ``w >= 0``; the constraint then bounds ``E[D_i + w *
      argmax_flip_i]`` (:func:`dmx.objective.argmax_flip`), so a sample that
      changes the clean prediction pays for its flip however small its KL:
      the problem moves towards exact erasure's, which keeps the argmax. 0,
      the paper's problem, bounds the KL alone. ``divergence`` in the result
      stays the KL.
    progress: show a progress bar (steps run in jitted chunks).
    chunk_steps: steps per jitted chunk when ``progress``.
    description: the progress bar's label.

  Returns:
    :class:`PerExampleMasks`.
  """
  if steps < 1 or samples < 1 or chunk_steps < 1:
    raise ValueError(f'steps, samples and chunk_steps must be >= 1, got {steps}, {samples}, '
                     f'{chunk_steps}')
  if not margin >= 0:
    raise ValueError(f'margin must be >= 0, got {margin}')
  if not (learning_rate > 0 and multiplier_learning_rate > 0 and multiplier_max > 0):
    raise ValueError('learning_rate, multiplier_learning_rate and multiplier_max must be > 0, got '
                     f'{learning_rate}, {multiplier_learning_rate}, {multiplier_max}')
  if not 0 <= multiplier_init <= multiplier_max:
    raise ValueError(f'multiplier_init must lie in [0, multiplier_max], got {multiplier_init}')
  if not 0.0 <= baseline_decay < 1.0:
    raise ValueError(f'baseline_decay must lie in [0, 1), got {baseline_decay}')
  if reward not in REWARDS:
    raise ValueError(f'reward must be one of {REWARDS}, got {reward!r}')
  if sparsity not in objective.SPARSITY_LOSSES:
    raise ValueError(f'sparsity must be one of {objective.SPARSITY_LOSSES}, got {sparsity!r}')
  if logit_bound is not None and not logit_bound > 0:
    raise ValueError(f'logit_bound must be > 0 (or None), got {logit_bound}')
  if not (flip_penalty >= 0 and math.isfinite(flip_penalty)):
    raise ValueError(f'flip_penalty must be a finite number >= 0, got {flip_penalty}')
  check_layer_index(model, layer_index)
  key = jax.random.key(0) if key is None else key
  score_function = relaxation.gradient == relaxations.SCORE_FUNCTION
  primal = per_example_optimizer(optimizer, learning_rate)
  dual = optim.dual_optimizer(dual_optimizer, learning_rate=multiplier_learning_rate)

  clean_outputs, states = jax.lax.stop_gradient(model.forward(params, batch))
  check_classifier_outputs(clean_outputs, 'per-example masks')
  state = states[layer_index]
  replacement = baseline_like(baseline, state)
  mask = batch['mask'].astype(bool)
  num_examples, seq = mask.shape

  def masked_outputs(gates):
    """``(batch, seq)`` gates -> ``(batch, classes)`` outputs with the state gated."""
    gates = jnp.where(mask, gates, 0.0)  # padding is never read; keep it at the baseline
    return outputs_with_state(model, params, batch, states, layer_index,
                              erased_state(state, gates, replacement))

  def divergences(gates):
    """``(samples, batch, seq)`` gates -> ``(samples, batch)`` ``KL(clean || masked)``,
    plus ``flip_penalty`` times each sample's flip."""
    outputs = jax.vmap(masked_outputs)(gates)
    divergence = objective.kl_divergence(clean_outputs[None], outputs)
    if flip_penalty > 0:
      flips = jax.vmap(lambda sample: objective.argmax_flip(clean_outputs, sample))(outputs)
      divergence = divergence + flip_penalty * flips
    return divergence

  def loss_fn(logits, multipliers, noise, score_average, step_count):
    gates = relaxation.sample(noise, jnp.broadcast_to(logits, noise.shape))
    divergence = divergences(gates)  # (samples, batch)
    expected_divergence = divergence.mean(axis=0)
    sparsity_term = objective.sparsity_loss(sparsity, relaxation.log_keep_prob(logits), mask)
    # a sum over examples: each example's logits and multiplier get their own gradient
    loss = jnp.sum(multipliers * (expected_divergence - margin) + sparsity_term)
    if score_function:
      sample_reward = reinforce_reward(divergence, multipliers, score_average, step_count,
                                       margin=margin, decay=baseline_decay, reward=reward)
      log_prob = relaxation.log_prob(gates, jnp.broadcast_to(logits, gates.shape))
      surrogate = relaxations.score_function_surrogate(
          sample_reward.reshape(-1), log_prob.reshape(-1, seq),
          jnp.broadcast_to(mask, gates.shape).reshape(-1, seq))
      loss = loss + surrogate.sum() / samples
    return loss, expected_divergence

  def step(carry: _SearchState, step_key):
    noise = relaxation.noise(step_key, (samples, num_examples, seq))
    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (logit_grads, multiplier_grads), divergence = grad_fn(
        carry.logits, carry.multipliers.fast, noise, carry.score_average, carry.step)
    updates, opt_state = primal.update(logit_grads, carry.opt_state, carry.logits)
    multiplier_updates, dual_state = dual.update(multiplier_grads, carry.dual_state,
                                                 carry.multipliers)
    multipliers = optim.project_multipliers(
        optax.apply_updates(carry.multipliers, multiplier_updates), multiplier_max)
    logits = optax.apply_updates(carry.logits, updates)
    if logit_bound is not None:
      logits = jnp.clip(logits, -logit_bound, logit_bound)
    return _SearchState(
        step=carry.step + 1, logits=logits,
        opt_state=opt_state, multipliers=multipliers, dual_state=dual_state,
        score_average=relaxations.moving_average(
            carry.score_average, _reinforce_tracked(divergence, margin, reward),
            baseline_decay)), None

  def run(carry, keys):
    return jax.lax.scan(step, carry, keys)[0]

  logits = jnp.full((num_examples, seq), initial_logit, jnp.float32)
  initial_multipliers = jnp.full((num_examples,), multiplier_init, jnp.float32)
  multipliers = optax.LookaheadParams(fast=initial_multipliers, slow=initial_multipliers)
  carry = _SearchState(step=jnp.zeros((), jnp.int32), logits=logits,
                       opt_state=primal.init(logits), multipliers=multipliers,
                       dual_state=dual.init(multipliers),
                       score_average=jnp.zeros((num_examples,), jnp.float32))
  step_keys = jax.random.split(key, steps)
  if progress:
    run_chunk = jax.jit(run)
    with tqdm(total=steps, desc=description, unit='step') as bar:
      for start in range(0, steps, chunk_steps):
        chunk = step_keys[start:start + chunk_steps]
        carry = run_chunk(carry, chunk)
        bar.update(len(chunk))
  else:
    carry = run(carry, step_keys)

  logits = carry.logits
  keep_prob = jnp.where(mask, jnp.exp(relaxation.log_keep_prob(logits)), 0.0)
  deterministic = jnp.where(mask & (relaxation.deterministic_gate(logits) > 0), 1.0, 0.0)
  final_outputs = masked_outputs(deterministic)
  return PerExampleMasks(
      keep_prob=keep_prob, mask=deterministic, logits=logits,
      divergence=objective.kl_divergence(clean_outputs, final_outputs),
      keeps_prediction=jnp.argmax(final_outputs, -1) == jnp.argmax(clean_outputs, -1),
      multiplier=carry.multipliers.fast, steps=steps)


def per_example_diffmask(model: MaskableModel, params, batch: dict, *,
                         temperature: float = hard_concrete.DEFAULT_TEMPERATURE,
                         stretch: tuple[float, float] = hard_concrete.DEFAULT_STRETCH,
                         **options) -> PerExampleMasks:
  """Non-amortised DiffMask: free Hard Concrete logits per example and position.

  ``temperature`` and ``stretch`` are the Hard Concrete's (DiffMask's
  defaults); every other option is :func:`per_example_masks`'s (``key``,
  ``layer_index``, ``baseline``, ``steps``, ``margin``, ``learning_rate``,
  ``samples``, ...).
  """
  return per_example_masks(model, params, batch,
                           relaxation=relaxations.hard_concrete(temperature, stretch), **options)


def per_example_reinforce(model: MaskableModel, params, batch: dict, *,
                          baseline_decay: float = 0.9, reward: str = 'lagrangian',
                          **options) -> PerExampleMasks:
  """REINFORCE with a per-example moving-average baseline: free Bernoulli logits per position.

  ``baseline_decay`` is the decay of the moving average of each example's
  divergence; ``reward`` is ``'lagrangian'`` (dmx's estimator of the
  Lagrangian) or ``'original'`` (the original code's, whose multiplier never
  reaches the logits; it used ``baseline_decay=0.99``). Every other option is
  :func:`per_example_masks`'s.
  """
  return per_example_masks(model, params, batch, relaxation=relaxations.reinforce(),
                           baseline_decay=baseline_decay, reward=reward, **options)
