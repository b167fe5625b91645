"""From a trained probe to attributions: keep probabilities and masked predictions.

Nothing here optimises: one clean pass and one probe evaluation give the keep
probability of every token at every depth, which is what DiffMask's heatmaps
show (paper Figs. 3, 7, 9).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmx import probes
from dmx.models.base import MaskableModel
from dmx.train import DiffMaskConfig, agreement, masked_pass


class Attribution(NamedTuple):
  """Per-depth DiffMask attributions for one batch.

  Attributes:
    keep_prob: ``(num_states, batch, seq)`` P(z != 0) of the gate at each depth
      (the relaxation's ``log_keep_prob``, exponentiated).
    gates: ``(num_states, batch, seq)`` deterministic gates in [0, 1] (Hard
      Concrete's: the median).
    outputs: ``(batch, ..., classes)`` the clean model's outputs.
  """
  keep_prob: jax.Array
  gates: jax.Array
  outputs: jax.Array


def deterministic_gates(config: DiffMaskConfig, vote_logits: jax.Array) -> jax.Array:
  """Test-time gates of every depth ``(num_states, batch, seq)``: input gates multiply votes.

  Each vote's gate is the relaxation's ``deterministic_gate`` (Hard
  Concrete's median by default; see :mod:`dmx.relaxations`).
  """
  gates = config.gate_relaxation().deterministic_gate(vote_logits)
  return jnp.cumprod(gates, axis=0) if config.gate == 'input' else gates


def keep_probs_and_gates(probe: nn.Module, probe_params, config: DiffMaskConfig,
                         states, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(keep_prob, gates)``, each ``(num_states, batch, seq)``, from the clean pass's states.

  Zero on padding (``mask`` ``(batch, seq)`` false). For callers that already
  hold the states and must not run the model a second time.
  """
  vote_logits = probe.apply(probe_params, states)
  keep_prob = jnp.exp(probes.gate_log_keep_probs(config.gate, vote_logits,
                                                 relaxation=config.gate_relaxation()))
  gates = deterministic_gates(config, vote_logits)
  mask = mask[None].astype(jnp.float32)
  return keep_prob * mask, gates * mask


def attribute(model: MaskableModel, frozen_params, probe: nn.Module, probe_params,
              config: DiffMaskConfig, batch: dict) -> Attribution:
  """Keep probabilities and test-time gates of every token at every depth."""
  outputs, states = model.forward(frozen_params, batch)
  keep_prob, gates = keep_probs_and_gates(probe, probe_params, config, states, batch['mask'])
  return Attribution(keep_prob, gates, outputs)


def masked_agreement(model: MaskableModel, frozen_params, probe: nn.Module, probe_params,
                     config: DiffMaskConfig, batch: dict, layer_index: int,
                     key: jax.Array | None = None) -> dict:
  """How the model behaves when masked by the probe at depth ``layer_index``.

  With ``key=None`` the deterministic gates are used, else one sample of the
  config's relaxation. Returns ``(batch,)`` arrays: ``agreement`` (same argmax as the clean
  pass), ``masked_fraction`` (fraction of real tokens whose gate is 0) and
  ``masked_outputs`` ``(batch, ..., classes)``.
  """
  outputs, states = model.forward(frozen_params, batch)
  vote_logits = probe.apply(probe_params, states)
  baselines = probe.apply(probe_params, method='baseline_vectors')
  if key is None:
    gates = deterministic_gates(config, vote_logits)[layer_index]
  else:
    gates, _ = probes.sample_gates(config.gate, key, vote_logits, layer_index,
                                   relaxation=config.gate_relaxation())
  masked_outputs = masked_pass(model, frozen_params, batch, states, config.gate, gates, baselines,
                               layer_index)
  mask = batch['mask'].astype(jnp.float32)
  closed = jnp.sum((gates == 0) * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return dict(agreement=agreement(outputs, masked_outputs), masked_fraction=closed,
              masked_outputs=masked_outputs)
