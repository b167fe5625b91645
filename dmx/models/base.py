"""The contract between DiffMask and a frozen model: a clean pass and a resumed pass.

DiffMask needs two things from a model, both pure functions of its frozen
parameters:

* ``forward(params, batch) -> (outputs, states)``: the clean pass. ``outputs``
  is ``(batch, ..., classes)`` logits; ``states`` is the tuple ``h0..hL`` of
  ``(batch, seq, dim_k)`` arrays, ``h0`` being the input embeddings.
* ``forward_from(params, batch, states, layer_index, intervention) -> outputs``:
  the masked pass. It takes ``h_l = states[layer_index]``, replaces it by
  ``intervention(layer_index, h_l)`` and recomputes only what lies above it.
  ``layer_index`` may be a traced scalar, so one compiled program serves every
  depth; a model whose states differ in width dispatches with ``lax.switch``
  and calls ``intervention`` with a Python int.

The intervention is an explicit argument, not a hook: the masked computation is
visible in the code that calls it. ``batch`` is a dict holding at least
``'mask'``, ``(batch, seq)`` true on real tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax

Intervention = Callable[[Any, jax.Array], jax.Array]


class MaskableModel(Protocol):
  """What DiffMask's trainer and attribution code call on a frozen model."""

  @property
  def state_dims(self) -> tuple[int, ...]:
    """Width of each state ``h0..hL``; ``len`` is the number of states."""

  def forward(self, params, batch: dict) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Clean pass: ``(outputs (batch, ..., classes), states h0..hL)``."""

  def forward_from(self, params, batch: dict, states: tuple[jax.Array, ...],
                   layer_index, intervention: Intervention) -> jax.Array:
    """Masked pass resumed at ``layer_index`` with ``intervention`` applied there."""
