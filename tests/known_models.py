"""Tiny maskable models whose right attributions are known, shared by the baseline tests.

Each implements the :class:`dmx.models.base.MaskableModel` contract with a
single state ``h0`` (``batch['inputs']``, ``(batch, seq, dim)``).
"""

import jax.numpy as jnp


class OneTokenModel:
  """Logits ``(-s, s)`` with ``s = scale * tanh(h0[:, 0] . u)``: only position 0 is ever read."""

  state_dims = (2,)

  def __init__(self, scale: float = 4.0):
    self.scale = scale

  def forward(self, params, batch):
    h0 = batch['inputs']
    return self._head(params, h0), (h0,)

  def forward_from(self, params, batch, states, layer_index, intervention):
    return self._head(params, intervention(0, states[0]))

  def _head(self, params, h0):
    score = self.scale * jnp.tanh(h0[:, 0] @ params['u'])
    return jnp.stack([-score, score], axis=-1)


class ThresholdModel:
  """Scalar states; logits ``(0, 4 * (sum_t mask_t h_t - 1.5))``: class 1 iff the sum > 1.5.

  Each kept position adds its value, so the smallest kept subsets that keep
  class 1 are known by enumeration.
  """

  state_dims = (1,)

  def forward(self, params, batch):
    h0 = batch['inputs']
    return self._head(batch, h0), (h0,)

  def forward_from(self, params, batch, states, layer_index, intervention):
    return self._head(batch, intervention(0, states[0]))

  def _head(self, batch, h0):
    total = jnp.sum(h0[..., 0] * batch['mask'], axis=-1)
    return jnp.stack([jnp.zeros_like(total), 4.0 * (total - 1.5)], axis=-1)
