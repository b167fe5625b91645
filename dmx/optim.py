"""The saddle-point optimisers of DiffMask, built from optax parts only.

* primal (probe and baselines, minimised): Lookahead(k=6, alpha=0.5) over
  centered RMSprop with torch's conventions (decay 0.99, eps added outside the
  square root), a linear warm-up, and separate learning rates for the probe
  (3e-4) and the baselines (1e-3);
* dual (one Lagrange multiplier per state, maximised): gradient ascent, by
  default Lookahead over plain RMSprop at 0.3 as in the original code (the
  paper's table says 0.1), or plain SGD; after each step the multipliers are
  projected onto ``[0, multiplier_max]``.

Both optimisers hold ``optax.LookaheadParams`` (fast and slow weights). The
loss is always evaluated at the fast weights, as in Zhang et al. (2019).
"""

from __future__ import annotations

import jax
import optax

DUAL_OPTIMIZERS = ('lookahead_rmsprop', 'sgd')


def _warmup(peak: float, warmup_steps: int):
  if warmup_steps <= 0:
    return optax.constant_schedule(peak)
  return optax.warmup_constant_schedule(0.0, peak, warmup_steps)


def torch_rmsprop(learning_rate, *, decay: float, eps: float, centered: bool):
  """RMSprop as ``torch.optim.RMSprop`` computes it (eps outside the root, no bias correction)."""
  return optax.rmsprop(learning_rate, decay=decay, eps=eps, eps_in_sqrt=False,
                       centered=centered, initial_scale=0.0)


def baseline_labels(params):
  """Labels a probe's parameter tree: ``'baseline'`` for baseline vectors, else ``'probe'``."""
  def label(path, _):
    names = [str(getattr(entry, 'key', entry)) for entry in path]
    return 'baseline' if any(name.startswith('baseline_') for name in names) else 'probe'
  return jax.tree_util.tree_map_with_path(label, params)


def primal_optimizer(*, probe_learning_rate: float = 3e-4, baseline_learning_rate: float = 1e-3,
                     warmup_steps: int = 1200, decay: float = 0.99, eps: float = 1e-8,
                     sync_period: int = 6, slow_step_size: float = 0.5
                     ) -> optax.GradientTransformation:
  """Lookahead over centered RMSprop, per-group learning rates, linear warm-up."""
  def group(peak):
    return torch_rmsprop(_warmup(peak, warmup_steps), decay=decay, eps=eps, centered=True)
  inner = optax.partition({'probe': group(probe_learning_rate),
                           'baseline': group(baseline_learning_rate)}, baseline_labels)
  return optax.lookahead(inner, sync_period=sync_period, slow_step_size=slow_step_size)


def dual_optimizer(kind: str = 'lookahead_rmsprop', *, learning_rate: float = 0.3,
                   decay: float = 0.99, eps: float = 1e-8, sync_period: int = 6,
                   slow_step_size: float = 0.5) -> optax.GradientTransformation:
  """Gradient *ascent* on the multipliers: it negates the gradient it is given."""
  if kind == 'lookahead_rmsprop':
    fast = torch_rmsprop(learning_rate, decay=decay, eps=eps, centered=False)
  elif kind == 'sgd':
    fast = optax.sgd(learning_rate)
  else:
    raise ValueError(f'unknown dual optimizer {kind!r}; choose one of {DUAL_OPTIMIZERS}')
  # sgd is wrapped too (sync_period 1, step 1 makes Lookahead the identity) so
  # both kinds keep the same state structure
  if kind == 'sgd':
    sync_period, slow_step_size = 1, 1.0
  return optax.lookahead(optax.chain(optax.scale(-1.0), fast), sync_period=sync_period,
                         slow_step_size=slow_step_size)


def project_multipliers(multipliers: optax.LookaheadParams,
                        maximum: float) -> optax.LookaheadParams:
  """Projects fast and slow multipliers onto the box ``[0, maximum]``."""
  project = lambda values: optax.projections.projection_box(values, 0.0, maximum)
  return optax.LookaheadParams(fast=project(multipliers.fast), slow=project(multipliers.slow))
