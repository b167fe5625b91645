"""DiffMask's constrained objective: divergences, sparsity terms, the Lagrangian.

DiffMask solves ``min_{probe, baseline} L0(z)  s.t.  D[y || y_hat] <= margin``
through the Lagrangian ``sum_l lambda_l * (D - margin) + L0``, minimised over
the probe and maximised over ``lambda >= 0`` (paper eq. 6). Everything here is
a pure function of arrays, batched over the leading ``batch`` axis.

The paper constrains the batch mean of the divergence, so a few sentences far
over the margin can be paid for by many under it. :func:`tail_divergence`
offers the stricter constraint on the mean of the worst fraction of the batch
(its conditional value at risk), which reaches each sentence's divergence.

A KL bound does not protect near-ties: when the clean model's two best classes
are almost equally likely, swapping them costs a KL far below any margin that
leaves room to mask, so the masked prediction flips at no cost.
:func:`argmax_flip` measures how far such a flip goes, and the trainer can add
it to the constrained divergence (``DiffMaskConfig.flip_penalty``, off by
default; not part of the paper's objective).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ('kl', 'squared_error')
SPARSITY_LOSSES = ('log_l0', 'l0')


def kl_divergence(reference_logits: jax.Array, other_logits: jax.Array) -> jax.Array:
  """``KL(softmax(reference) || softmax(other))`` over the last axis.

  Safe for ``-inf`` logits (masked padding, as in extractive QA): classes with
  zero reference probability contribute exactly 0, with a finite gradient.

  Args:
    reference_logits: ``(..., classes)``, the clean model's output ``y``.
    other_logits: ``(..., classes)``, the masked model's output ``y_hat``.

  Returns:
    ``(...)`` float32 divergences in nats.
  """
  reference_logits = reference_logits.astype(jnp.float32)
  other_logits = other_logits.astype(jnp.float32)
  reference_log_probs = jax.nn.log_softmax(reference_logits, axis=-1)
  other_log_probs = jax.nn.log_softmax(other_logits, axis=-1)
  support = reference_log_probs > -jnp.inf
  # double where: keeps -inf - -inf = nan out of both the value and the gradient
  safe_reference = jnp.where(support, reference_log_probs, 0.0)
  safe_other = jnp.where(support, other_log_probs, 0.0)
  terms = jnp.where(support, jnp.exp(safe_reference) * (safe_reference - safe_other), 0.0)
  return jnp.sum(terms, axis=-1)


def squared_error(reference_outputs: jax.Array, other_outputs: jax.Array) -> jax.Array:
  """Mean squared difference over the last axis, for outputs without a likelihood.

  ``(..., outputs), (..., outputs) -> (...)``.
  """
  difference = reference_outputs.astype(jnp.float32) - other_outputs.astype(jnp.float32)
  return jnp.mean(jnp.square(difference), axis=-1)


def output_divergence(kind: str, reference_outputs: jax.Array,
                      other_outputs: jax.Array) -> jax.Array:
  """Per-example divergence ``D[y || y_hat]``: ``(batch, ..., classes) -> (batch,)``.

  Any axes between batch and classes (QA's start and end heads) are summed,
  so D = KL(start) + KL(end) for a ``(batch, 2, seq)`` QA output.
  """
  if kind == 'kl':
    per_head = kl_divergence(reference_outputs, other_outputs)
  elif kind == 'squared_error':
    per_head = squared_error(reference_outputs, other_outputs)
  else:
    raise ValueError(f'unknown divergence {kind!r}; choose one of {DIVERGENCES}')
  return _sum_over_heads(per_head)


def _sum_over_heads(per_head: jax.Array) -> jax.Array:
  """``(batch, ...) -> (batch,)``: one value per example from one per head."""
  return per_head.reshape(per_head.shape[0], -1).sum(axis=-1)


def argmax_flip(reference_logits: jax.Array, other_logits: jax.Array) -> jax.Array:
  """How far the masked output's best rival beats the clean argmax, per example.

  For each head, with ``c`` the argmax of ``reference_logits``:
  ``relu(max_{j != c} other_j - other_c)``, the log-probability ratio by
  which the masked pass prefers another class (0 while it keeps ``c``);
  heads are summed as in :func:`output_divergence`. Its gradient reaches
  exactly the examples whose prediction flipped, however small their KL.

  Safe for ``-inf`` logits (masked padding): they are never a rival, and a
  head with a single finite class never flips.

  Args:
    reference_logits: ``(batch, ..., classes)``, the clean model's output.
    other_logits: ``(batch, ..., classes)``, the masked model's output.

  Returns:
    ``(batch,)`` float32 flip sizes, ``>= 0``.
  """
  reference_logits = reference_logits.astype(jnp.float32)
  other_logits = other_logits.astype(jnp.float32)
  num_classes = reference_logits.shape[-1]
  clean_class = jax.nn.one_hot(jnp.argmax(reference_logits, axis=-1), num_classes, dtype=bool)
  # padding (-inf in either pass) is never a rival; a finite stand-in keeps
  # -inf - -inf out of the value and the gradient
  finite = jnp.isfinite(other_logits) & jnp.isfinite(reference_logits)
  lowest = jnp.finfo(jnp.float32).min / 4
  safe_other = jnp.where(finite, other_logits, lowest)
  kept = jnp.sum(jnp.where(clean_class, safe_other, 0.0), axis=-1)
  best_rival = jnp.max(jnp.where(clean_class | ~finite, lowest, safe_other), axis=-1)
  per_head = jnp.where(best_rival > lowest, jax.nn.relu(best_rival - kept), 0.0)
  return _sum_over_heads(per_head)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` over the last axis where ``mask`` is true.

  ``(batch, seq), (batch, seq) -> (batch,)``; an all-false row gives 0, not NaN.
  """
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def sparsity_loss(kind: str, log_keep_prob: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-example sparsity term from ``log P(z_i != 0)``.

  Args:
    kind: ``'log_l0'``, the original code's mean of ``log P(z != 0)`` over
      tokens (its parity default), or ``'l0'``, the paper's expected L0: the
      mean of ``P(z != 0)`` over tokens.
    log_keep_prob: ``(batch, seq)`` log-probability that each gate is open.
    mask: ``(batch, seq)`` true on real tokens.

  Returns:
    ``(batch,)`` sparsity losses.
  """
  if kind == 'log_l0':
    return masked_mean(log_keep_prob, mask)
  if kind == 'l0':
    return masked_mean(jnp.exp(log_keep_prob), mask)
  raise ValueError(f'unknown sparsity loss {kind!r}; choose one of {SPARSITY_LOSSES}')


def lagrangian(multiplier: jax.Array, divergence: jax.Array, margin: float,
               sparsity: jax.Array) -> jax.Array:
  """``mean_batch(lambda * (D - margin) + sparsity)``, the saddle-point objective.

  Args:
    multiplier: scalar ``lambda >= 0`` of the layer being trained.
    divergence: ``(batch,)`` output divergences.
    margin: tolerated divergence ``m``.
    sparsity: ``(batch,)`` sparsity losses.
  """
  return jnp.mean(multiplier * (divergence - margin) + sparsity)


def tail_threshold(divergence: jax.Array, tail_fraction: float) -> jax.Array:
  """The divergence at the top ``tail_fraction`` of a batch: its value at risk.

  Args:
    divergence: ``(batch,)`` per-example divergences (every shard's, when the
      batch is sharded: the threshold must be the global batch's).
    tail_fraction: the fraction ``alpha`` in ``(0, 1]`` of the batch in the tail.

  Returns:
    The ``ceil(alpha * batch)``-th largest divergence, a scalar. It minimises
    the Rockafellar–Uryasev objective of :func:`tail_divergence`, so with it
    that function's batch mean is exactly the tail's mean.
  """
  if not 0.0 < tail_fraction <= 1.0:
    raise ValueError(f'tail_fraction must lie in (0, 1], got {tail_fraction}')
  batch = divergence.shape[0]
  # the small tolerance keeps alpha * batch = 8.000001 from counting a 9th example
  tail_size = min(max(math.ceil(tail_fraction * batch - 1e-6), 1), batch)
  return jnp.sort(divergence)[batch - tail_size]


def tail_divergence(divergence: jax.Array, threshold: jax.Array,
                    tail_fraction: float) -> jax.Array:
  """Per-example terms whose batch mean is the mean divergence of the batch's worst tail.

  ``threshold + relu(D - threshold) / alpha``, the Rockafellar–Uryasev form of
  the conditional value at risk: with ``threshold`` from
  :func:`tail_threshold` (held fixed, under ``stop_gradient``), the mean over
  the batch is the mean of the largest ``alpha * batch`` divergences (a
  fractional example counted in part), and its gradient reaches exactly the
  examples above the threshold, each with weight ``1 / (alpha * batch)``.
  ``alpha = 1`` with the batch minimum as threshold gives ``D`` itself.
  Being a mean of per-example terms, it averages over shards like ``D`` does.

  Args:
    divergence: ``(batch,)`` per-example divergences.
    threshold: scalar, the tail's lower end.
    tail_fraction: ``alpha`` in ``(0, 1]``.

  Returns:
    ``(batch,)`` terms to constrain in place of ``divergence``.
  """
  return threshold + jax.nn.relu(divergence - threshold) / tail_fraction
