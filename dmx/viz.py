"""Figures: keep-probability heatmaps (tokens x depths), as in the paper's Figs. 3, 7 and 9."""

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


def save_figure(fig, path) -> None:
  """Writes ``fig`` to ``path`` and closes it."""
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
