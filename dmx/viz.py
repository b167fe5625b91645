"""Figures: keep-probability heatmaps (tokens x depths), as in the paper's Figs. 3, 7 and 9, and
per-layer attribution panels of several methods side by side (Fig. 5)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np


def keep_probability_heatmaps(keep_prob, tokens: Sequence[Sequence[str]],
                              layer_names: Sequence[str], titles: Sequence[str] | None = None,
                              suptitle: str | None = None):
  """One heatmap per example: depths on the y-axis, tokens on the x-axis.

  Args:
    keep_prob: ``(num_states, num_examples, seq)`` keep probabilities in [0, 1].
    tokens: for each example its token strings (the length sets the width).
    layer_names: a name per depth, bottom (h0) first.
    titles: optional title per example.
    suptitle: optional figure title.

  Returns:
    The matplotlib figure.
  """
  keep_prob = np.asarray(keep_prob)
  num_states, num_examples = keep_prob.shape[:2]
  if len(tokens) != num_examples or len(layer_names) != num_states:
    raise ValueError('need one token list per example and one name per depth')
  width = max(len(t) for t in tokens)
  fig, axes = plt.subplots(1, num_examples, squeeze=False,
                           figsize=(max(3.0, 0.45 * width + 1.5) * num_examples,
                                    0.45 * num_states + 1.6))
  image = None
  for index, ax in enumerate(axes[0]):
    length = len(tokens[index])
    image = ax.imshow(keep_prob[:, index, :length], origin='lower', vmin=0.0, vmax=1.0,
                      cmap='viridis', aspect='auto')
    ax.set_xticks(range(length), tokens[index], rotation=90 if width > 12 else 0)
    ax.set_yticks(range(num_states), layer_names)
    if titles is not None:
      ax.set_title(titles[index], fontsize=9)
  fig.colorbar(image, ax=axes[0].tolist(), label='keep probability', shrink=0.9)
  if suptitle:
    fig.suptitle(suptitle, y=1.08)
  return fig


def normalize_rows_by_max(values) -> np.ndarray:
  """``(rows, seq)`` non-negative values divided row by row by the row's largest; a row of
  zeros stays zeros. Negative values are an error (take magnitudes first)."""
  values = np.asarray(values, np.float64)
  if values.ndim != 2:
    raise ValueError(f'need (rows, seq) values, got shape {values.shape}')
  if np.any(values < 0) or not np.all(np.isfinite(values)):
    raise ValueError('attributions must be finite and non-negative to be normalised by their max')
  largest = values.max(axis=1, keepdims=True)
  return np.divide(values, largest, out=np.zeros_like(values), where=largest > 0)


def layer_attribution_panels(panels: Sequence[tuple[str, Sequence[str], np.ndarray]],
                             tokens: Sequence[str], suptitle: str | None = None):
  """Side-by-side heatmaps of per-layer attributions of one sentence (the paper's Fig. 5).

  Args:
    panels: ``(title, row_names, values)`` per method; ``values`` ``(rows, >= len(tokens))``
      non-negative, one row per layer or state, bottom row first. Each row is
      normalised by its largest value (:func:`normalize_rows_by_max`).
    tokens: the sentence's tokens (the x-axis; longer ``values`` rows are cut).
    suptitle: optional figure title.

  Returns:
    The matplotlib figure.
  """
  if not panels:
    raise ValueError('need at least one panel')
  length = len(tokens)
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=((0.32 * length + 2.2) * len(panels),
                                    0.32 * max(len(p[1]) for p in panels) + 2.2))
  fig.subplots_adjust(wspace=0.55)  # room for each panel's own row names
  image = None
  for ax, (title, row_names, values) in zip(axes[0], panels):
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != len(row_names) or values.shape[1] < length:
      raise ValueError(f'panel {title!r}: values {values.shape} need {len(row_names)} rows of at '
                       f'least {length} tokens')
    image = ax.imshow(normalize_rows_by_max(values[:, :length]), origin='lower', vmin=0.0,
                      vmax=1.0, cmap='viridis', aspect='auto')
    ax.set_xticks(range(length), tokens, rotation=90)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=axes[0].tolist(), label='attribution / row max', shrink=0.9)
  if suptitle:
    fig.suptitle(suptitle, y=1.02, fontsize=10)
  return fig


def save_figure(fig, path) -> None:
  """Writes ``fig`` to ``path`` and closes it."""
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
