"""Raw attention and self-attention attribution (Hao et al., AAAI 2021) for dmx's BERT.

Two views of what a BERT classifier's attention does:

* :func:`raw_attention`: the attention probabilities themselves, max-pooled
  over heads and averaged over (real) query positions, one row of key scores
  per layer: the "raw attention" heatmap of the DiffMask paper's Figure 5.
* Self-attention attribution (Hao, Dong, Wei and Xu, 2021): integrated
  gradients with respect to the attention probabilities ``A`` of one layer,

      Attr_h(A) = A_h * integral_0^1 dF(alpha A) / dA_h dalpha,

  where every head of the layer is scaled together by ``alpha`` and ``F`` is
  the probability of the predicted label (or a logit). A Riemann sum over
  ``steps`` points approximates the integral; completeness, ``sum Attr =
  F(A) - F(0)``, holds up to its error (:attr:`AttentionAttribution.convergence_delta`).
  On top of it: :func:`head_importance` (expected maximum attribution of each
  head, the paper's head ranking), :func:`head_pruning_curve` (accuracy as heads
  are pruned by that ranking, against the reverse and a random order) and
  :func:`attribution_tree` (the paper's attribution tree of the strongest
  token-to-token interactions).

Attention index ``l`` (0-based) is the layer that reads state ``h_{l+1}`` and
writes ``h_{l+2}`` (see :mod:`dmx.models.bert`). Everything runs through the
model's explicit attention entry points (``forward_with_attention``,
``forward_from_attention``), never a hook.
"""

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmx.baselines.common import check_classifier_outputs, resolve_target, target_scores
from dmx.baselines.integrated_gradients import path_gradient_integral

PRUNING_ORDERS = ('most_important_first', 'least_important_first', 'random')
HEAD_REDUCTIONS = ('max', 'sum')


def _check_attention_model(model, method: str) -> None:
  """One-line ``ValueError`` unless ``model`` exposes the attention entry points."""
  for name in ('forward_with_attention', 'forward_from_attention', 'check_attention_layer'):
    if not hasattr(model, name):
      raise ValueError(f'{method} needs a model with explicit attention ({name}), such as '
                       f'dmx.models.bert.BertModel; got {type(model).__name__}')


def _real_mask(batch: dict) -> jax.Array:
  """``(batch, seq)`` float32, 1 on real tokens."""
  if 'mask' not in batch:
    raise KeyError("batch needs 'mask', (batch, seq) true on real tokens")
  return jnp.asarray(batch['mask']).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Raw attention (DiffMask paper, Figure 5a)


def raw_attention(model, params, batch: dict, *, normalize_per_layer: bool = False) -> jax.Array:
  """Raw attention per layer and key: max over heads, mean over real query positions.

  Jittable. For each layer ``l`` and key position ``k``:
  ``mean_{q real} max_h A[l, h, q, k]``.

  Args:
    model: a model with ``forward_with_attention`` (:class:`dmx.models.bert.BertModel`).
    params: its parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)`` true on real tokens.
    normalize_per_layer: divide each layer's row by its largest entry (the
      paper's figures are "normalized per-layer by the largest attribution").

  Returns:
    ``(batch, num_layers, seq)`` float32, 0 on padded keys. Un-normalised, each
    row sums to a value in ``[1, heads]`` (exactly 1 with one head).
  """
  _check_attention_model(model, 'raw_attention')
  real = _real_mask(batch)  # (batch, seq)
  attention = model.forward_with_attention(params, batch).attention  # (L, batch, heads, q, k)
  pooled = attention.max(axis=2)  # (L, batch, q, k)
  # padded queries still attend; only real ones count, and a row without real tokens stays 0
  query_weights = real / jnp.maximum(real.sum(axis=-1, keepdims=True), 1.0)  # (batch, q)
  per_key = jnp.einsum('lbqk,bq->blk', pooled, query_weights) * real[:, None, :]
  if normalize_per_layer:
    largest = per_key.max(axis=-1, keepdims=True)
    per_key = per_key / jnp.where(largest > 0, largest, 1.0)
  return per_key


# ---------------------------------------------------------------------------
# Self-attention attribution (Hao et al., 2021)


class AttentionAttribution(NamedTuple):
  """Self-attention attribution of one layer for one batch.

  Attributes:
    scores: ``(batch, heads, q, k)`` float32, ``A * sum_k w_k dF(alpha_k A)/dA``;
      0 where the query or the key is padding.
    attention: ``(batch, heads, q, k)`` float32, the clean attention ``A``.
    target: ``(batch,)`` int32, the class whose score ``F`` was attributed.
    target_score: ``(batch,)`` ``F(A)``, the clean score.
    baseline_score: ``(batch,)`` ``F(0)``, the score with the layer's attention zeroed.
    convergence_delta: ``(batch,)`` ``sum(scores) - (F(A) - F(0))``; 0 for an
      exact integral.
  """
  scores: jax.Array
  attention: jax.Array
  target: jax.Array
  target_score: jax.Array
  baseline_score: jax.Array
  convergence_delta: jax.Array


def self_attention_attribution(model, params, batch: dict, *, layer_index: int,
                               target: jax.Array | None = None, steps: int = 20,
                               output: str = 'probability', rule: str = 'right',
                               path_batch_size: int | None = None) -> AttentionAttribution:
  """Integrated gradients over the attention probabilities of layer ``layer_index``.

  Jittable (close over or mark static ``layer_index``, ``steps``, ``output``,
  ``rule`` and ``path_batch_size``). The path scales every head of the layer
  together, ``alpha A`` for ``alpha`` in (0, 1], and the gradient is taken
  with respect to each entry, as in Hao et al.'s eq. (2)-(3); their Riemann
  sum is ``rule='right'`` with ``steps=20``. Only the layer and those above it
  are recomputed at each path point.

  Args:
    model: a classifier with explicit attention (:class:`dmx.models.bert.BertModel`).
    params: its frozen parameters.
    batch: model inputs; ``batch['mask']`` ``(batch, seq)``.
    layer_index: the attention layer, 0-based (static).
    target: ``(batch,)`` classes to explain; the clean prediction when ``None``
      (Hao et al. explain the predicted label).
    steps: points of the Riemann sum.
    output: ``'probability'`` (Hao et al.'s ``F``) or ``'logit'``.
    rule: ``'right'`` (``k / steps``), ``'midpoint'`` or ``'gauss_legendre'``
      (see :func:`dmx.baselines.integrated_gradients.path_quadrature`).
    path_batch_size: path points evaluated together (vectorised); ``None``:
      all at once. Smaller values trade speed for memory.

  Returns:
    :class:`AttentionAttribution`.
  """
  _check_attention_model(model, 'self_attention_attribution')
  layer_index = model.check_attention_layer(layer_index)
  clean = model.forward_with_attention(params, batch)
  check_classifier_outputs(clean.outputs, 'self-attention attribution')
  target = resolve_target(clean.outputs, target)
  attention = clean.attention[layer_index]  # (batch, heads, q, k)

  def scores_with(path_attention: jax.Array) -> jax.Array:
    """``(batch,)`` target scores with the layer's attention replaced by ``path_attention``."""
    outputs = model.forward_from_attention(params, batch, clean.states, layer_index,
                                           lambda _: path_attention)
    return target_scores(outputs, target, output)

  # examples are independent, so the gradient of the batch sum is every example's own gradient
  gradient = jax.grad(lambda path_attention: scores_with(path_attention).sum())

  gradient_sum = path_gradient_integral(gradient, jnp.zeros_like(attention), attention, steps,
                                        rule, path_batch_size)
  real = _real_mask(batch)
  pair_mask = real[:, None, :, None] * real[:, None, None, :]  # (batch, 1, q, k)
  scores = attention * gradient_sum * pair_mask
  target_score = target_scores(clean.outputs, target, output)
  baseline_score = scores_with(jnp.zeros_like(attention))
  return AttentionAttribution(
      scores=scores, attention=attention, target=target, target_score=target_score,
      baseline_score=baseline_score,
      convergence_delta=scores.sum(axis=(1, 2, 3)) - (target_score - baseline_score))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _attribution_program(model, params, batch, target, layer_index, steps, output, rule,
                         path_batch_size):
  return self_attention_attribution(model, params, batch, layer_index=layer_index, target=target,
                                    steps=steps, output=output, rule=rule,
                                    path_batch_size=path_batch_size)


def jitted_self_attention_attribution(model, params, batch: dict, *, layer_index: int,
                                      target: jax.Array | None = None, steps: int = 20,
                                      output: str = 'probability', rule: str = 'right',
                                      path_batch_size: int | None = None) -> AttentionAttribution:
  """:func:`self_attention_attribution`, compiled once per model, options and batch shape.

  Every caller (:func:`head_importance` among them) shares one cache of
  compiled programs, whichever arguments it spells out.
  """
  return _attribution_program(model, params, batch, target, layer_index, steps, output, rule,
                              path_batch_size)


def head_score_maxima(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """``(batch, heads)``: the largest of ``scores`` ``(batch, heads, q, k)`` over real ``(q, k)``.

  ``mask`` is ``(batch, seq)``, true on real tokens. Padding is excluded, not
  counted as 0: a head's scores may all be negative.
  """
  real = jnp.asarray(mask).astype(bool)
  pair_mask = real[:, None, :, None] & real[:, None, None, :]  # (batch, 1, q, k)
  return jnp.where(pair_mask, scores, -jnp.inf).max(axis=(2, 3))


class HeadImportance(NamedTuple):
  """Hao et al.'s head importance: ``E_x[max_{q,k} Attr_h(A)]``.

  Attributes:
    importance: ``(num_layers, heads)`` float64, the mean over examples.
    ranking: ``(num_layers * heads, 2)`` int, ``(layer, head)`` from the most
      to the least important (ties keep layer-major order).
    per_example: ``(num_examples, num_layers, heads)`` float32 maxima.
  """
  importance: np.ndarray
  ranking: np.ndarray
  per_example: np.ndarray


def rank_heads(importance) -> np.ndarray:
  """``(num_layers * heads, 2)`` ``(layer, head)`` pairs, most important first (stable)."""
  importance = np.asarray(importance, np.float64)
  if importance.ndim != 2:
    raise ValueError(f'importance must be (num_layers, heads), got shape {importance.shape}')
  order = np.argsort(-importance.reshape(-1), kind='stable')
  return np.stack(np.unravel_index(order, importance.shape), axis=1)


def head_importance(model, params, batches: Iterable[dict], *,
                    targets: Sequence[jax.Array | None] | None = None, steps: int = 20,
                    output: str = 'probability', rule: str = 'right',
                    path_batch_size: int | None = None, progress=None) -> HeadImportance:
  """Every head's expected maximum attribution over the examples of ``batches``.

  Args:
    model: a classifier with explicit attention.
    params: its frozen parameters.
    batches: model input batches (compiled once per distinct shape).
    targets: one ``(batch,)`` array (or ``None``: the prediction) per batch;
      ``None`` explains every prediction, as Hao et al.'s attribution does.
      (Their head-pruning script uses the gold labels: pass them here for that.)
    steps, output, rule, path_batch_size: as :func:`self_attention_attribution`.
    progress: optional callable ``progress(num_examples_done)`` (e.g. a tqdm update).

  Returns:
    :class:`HeadImportance`.
  """
  _check_attention_model(model, 'head_importance')
  batches = list(batches)
  if not batches:
    raise ValueError('head_importance needs at least one batch')
  if targets is not None and len(targets) != len(batches):
    raise ValueError(f'need one target per batch: {len(targets)} targets, {len(batches)} batches')
  maxima = []
  for index, batch in enumerate(batches):
    target = None if targets is None else targets[index]
    # layer by layer: each compiled program is small, and shared with other callers
    maxima.append(np.stack([np.asarray(head_score_maxima(jitted_self_attention_attribution(
        model, params, batch, layer_index=layer_index, target=target, steps=steps, output=output,
        rule=rule, path_batch_size=path_batch_size).scores, batch['mask']), np.float32)
                            for layer_index in range(model.config.num_layers)], axis=1))
    if progress is not None:
      progress(len(maxima[-1]))
  per_example = np.concatenate(maxima)
  importance = per_example.astype(np.float64).mean(axis=0)
  return HeadImportance(importance=importance, ranking=rank_heads(importance),
                        per_example=per_example)


# ---------------------------------------------------------------------------
# Head pruning


class PruningCurve(NamedTuple):
  """Predictions as heads are pruned (head mask 0) in several orders.

  Attributes:
    num_pruned: ``(levels,)`` int, heads pruned at each level (0 first).
    fraction_pruned: ``(levels,)`` ``num_pruned / (num_layers * heads)``.
    orders: the order names, e.g. ``PRUNING_ORDERS``.
    head_orders: ``(len(orders), num_layers * heads, 2)`` the ``(layer, head)``
      pruning sequence of each order.
    agreement: ``(len(orders), levels)`` fraction of examples whose pruned
      prediction equals the unpruned one.
    accuracy: ``(len(orders), levels)`` accuracy against ``labels``; ``None``
      without labels.
  """
  num_pruned: np.ndarray
  fraction_pruned: np.ndarray
  orders: tuple[str, ...]
  head_orders: np.ndarray
  agreement: np.ndarray
  accuracy: np.ndarray | None


def pruning_mask(head_order, num_pruned: int, shape: tuple[int, int]) -> np.ndarray:
  """``(num_layers, heads)`` float32 head mask: 0 on the first ``num_pruned`` heads of ``head_order``."""
  mask = np.ones(shape, np.float32)
  head_order = np.asarray(head_order).reshape(-1, 2)
  if not 0 <= num_pruned <= len(head_order):
    raise ValueError(f'num_pruned must be in [0, {len(head_order)}], got {num_pruned}')
  for layer, head in head_order[:num_pruned]:
    mask[layer, head] = 0.0
  return mask


@functools.partial(jax.jit, static_argnums=0)
def _pruned_predictions(model, params, batch: dict, head_mask: jax.Array) -> jax.Array:
  """``(batch,)`` predicted classes with ``head_mask`` ``(num_layers, heads)`` applied."""
  return jnp.argmax(model.forward_with_attention(params, batch, head_mask=head_mask).outputs,
                    axis=-1)


def head_pruning_curve(model, params, batches: Sequence[dict], importance, *,
                       labels: Sequence | None = None, num_pruned: Sequence[int] | None = None,
                       orders: Sequence[str] = PRUNING_ORDERS, seed: int = 0,
                       progress=None) -> PruningCurve:
  """Accuracy and agreement as heads are pruned by ``importance``, its reverse, or at random.

  Pruning is global (all layers ranked together), as in Hao et al.'s script;
  a pruned head's context is multiplied by 0 (``head_mask``).

  Args:
    model: a classifier with explicit attention.
    params: its frozen parameters.
    batches: model input batches.
    importance: ``(num_layers, heads)`` scores, higher = more important
      (e.g. :attr:`HeadImportance.importance`).
    labels: one ``(batch,)`` int array per batch, for accuracy; optional.
    num_pruned: heads pruned at each level; default ``round(f * num_heads)``
      for ``f = 0, 0.1, ..., 1``.
    orders: any of ``PRUNING_ORDERS``.
    seed: seeds the random order.
    progress: optional callable ``progress(1)`` after each pruned level.

  Returns:
    :class:`PruningCurve`.
  """
  _check_attention_model(model, 'head_pruning_curve')
  shape = (model.config.num_layers, model.config.num_heads)
  importance = np.asarray(importance, np.float64)
  if importance.shape != shape:
    raise ValueError(f'importance must be (num_layers, heads) = {shape}, got {importance.shape}')
  batches = list(batches)
  if not batches:
    raise ValueError('head_pruning_curve needs at least one batch')
  if labels is not None and len(labels) != len(batches):
    raise ValueError(f'need one label array per batch: {len(labels)} for {len(batches)} batches')
  for order in orders:
    if order not in PRUNING_ORDERS:
      raise ValueError(f'orders must be among {PRUNING_ORDERS}, got {order!r}')
  total = shape[0] * shape[1]
  if num_pruned is None:
    num_pruned = sorted({int(round(f * total)) for f in np.linspace(0.0, 1.0, 11)})
  num_pruned = np.asarray(num_pruned, np.int64)
  if num_pruned.ndim != 1 or np.any(num_pruned < 0) or np.any(num_pruned > total):
    raise ValueError(f'num_pruned must be counts in [0, {total}], got {num_pruned.tolist()}')

  ranking = rank_heads(importance)
  rng = np.random.default_rng(seed)
  order_of = {'most_important_first': ranking, 'least_important_first': ranking[::-1],
              'random': ranking[rng.permutation(total)]}
  head_orders = np.stack([order_of[order] for order in orders])

  predict = lambda params, batch, head_mask: _pruned_predictions(model, params, batch, head_mask)
  unpruned = [np.asarray(predict(params, batch, np.ones(shape, np.float32))) for batch in batches]
  if unpruned[0].ndim != 1:
    raise ValueError('head_pruning_curve needs a classifier: (batch, classes) outputs')
  unpruned_all = np.concatenate(unpruned)
  labels_all = None if labels is None else np.concatenate([np.asarray(l) for l in labels])
  if labels_all is not None and labels_all.shape != unpruned_all.shape:
    raise ValueError(f'labels {labels_all.shape} do not match the examples {unpruned_all.shape}')
  agreement = np.zeros((len(orders), len(num_pruned)))
  accuracy = None if labels_all is None else np.zeros_like(agreement)
  for order_index in range(len(orders)):
    for level, count in enumerate(num_pruned):
      head_mask = pruning_mask(head_orders[order_index], int(count), shape)
      predictions = np.concatenate([np.asarray(predict(params, batch, head_mask))
                                    for batch in batches])
      agreement[order_index, level] = np.mean(predictions == unpruned_all)
      if accuracy is not None:
        accuracy[order_index, level] = np.mean(predictions == labels_all)
      if progress is not None:
        progress(1)
  return PruningCurve(num_pruned=num_pruned, fraction_pruned=num_pruned / total,
                      orders=tuple(orders), head_orders=head_orders, agreement=agreement,
                      accuracy=accuracy)


def plot_pruning_curve(curve: PruningCurve, metric: str = 'accuracy', title: str | None = None,
                       reference: float | None = None, reference_label: str = 'chance'):
  """Line plot of ``metric`` (``'accuracy'`` or ``'agreement'``) against the fraction pruned.

  ``reference`` draws a dashed horizontal line named ``reference_label`` (e.g.
  the majority-class accuracy). Returns the figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  values = curve.accuracy if metric == 'accuracy' else curve.agreement
  if metric not in ('accuracy', 'agreement') or values is None:
    raise ValueError(f"metric must be 'accuracy' (with labels) or 'agreement', got {metric!r}")
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  styles = {'most_important_first': ('tab:red', 'o'), 'least_important_first': ('tab:blue', 's'),
            'random': ('tab:gray', '^')}
  for order, row in zip(curve.orders, values):
    color, marker = styles.get(order, (None, 'x'))
    ax.plot(curve.fraction_pruned, row, marker=marker, color=color,
            label=order.replace('_', ' '))
  if reference is not None:
    ax.axhline(reference, color='black', linestyle='--', linewidth=0.8, label=reference_label)
  ax.set_xlabel('fraction of heads pruned')
  ax.set_ylabel(metric)
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  return fig


# ---------------------------------------------------------------------------
# Attribution tree


class TreeEdge(NamedTuple):
  """One kept interaction: in attention layer ``layer``, query ``parent`` drew on key ``child``."""
  layer: int
  parent: int
  child: int
  score: float


class AttributionTree(NamedTuple):
  """Hao et al.'s attribution tree of one example.

  Attributes:
    edges: one tuple of :class:`TreeEdge` per attention layer (index 0 = the
      bottom layer); every node but the root has exactly one incoming edge.
    nodes: token positions in the tree, in the order they joined (root first).
    root: the root position (``[CLS]``, 0, by default).
    normalized: ``(num_layers, n, n)`` float64, each layer's head-reduced
      attribution divided by that layer's largest entry (0 for a layer whose
      entries are all <= 0).
    threshold: the edge threshold on ``normalized``.
    top_layer: the highest attention layer used (0-based).
  """
  edges: tuple[tuple[TreeEdge, ...], ...]
  nodes: tuple[int, ...]
  root: int
  normalized: np.ndarray
  threshold: float
  top_layer: int


def attribution_tree(scores_per_layer, tokens: Sequence[str], threshold: float = 0.4, *,
                     root: int = 0, top_layer: int | None = None,
                     head_reduction: str = 'max') -> AttributionTree:
  """Builds the attribution tree from the top layer's root-relevant tokens down.

  Per layer, the attribution is reduced over heads (``'max'``; Hao et al.'s
  code sums, ``'sum'``), restricted to the ``n = len(tokens)`` real tokens
  and normalised by the layer's largest entry. An edge ``i -> j`` of layer
  ``l`` (query ``i`` draws on key ``j``, ``i != j``) is a candidate when its
  normalised score exceeds ``threshold``. Going from the top layer down, a
  candidate is kept when ``i`` joined the tree in a higher layer and ``j`` is
  not in it yet (so information can flow from ``j`` up to the root), the
  strongest parent winning when several reach the same ``j`` in one layer.
  The top layer therefore links the root to the tokens it draws on directly.

  In a classifier reading ``[CLS]``, the last layer's only attributed query
  is ``[CLS]`` and its row, normalised by its own maximum, tends to pass the
  threshold for most tokens, which leaves a flat tree. Hao et al.'s code
  starts one layer lower (``top_layer = num_layers - 2``); edges above
  ``top_layer`` are then ignored.

  Args:
    scores_per_layer: ``(num_layers, heads, q, k)`` attribution scores of one
      example (e.g. stacked :attr:`AttentionAttribution.scores` rows), or
      ``(num_layers, q, k)`` already reduced over heads; ``q, k >= len(tokens)``.
    tokens: the example's real tokens (padding excluded).
    threshold: in ``[0, 1)``; Hao et al. use 0.4.
    root: the position the tree hangs from.
    top_layer: the highest attention layer (0-based) used; the last by default.
    head_reduction: ``'max'`` or ``'sum'`` over heads.

  Returns:
    :class:`AttributionTree`.
  """
  scores = np.asarray(scores_per_layer, np.float64)
  if head_reduction not in HEAD_REDUCTIONS:
    raise ValueError(f'head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}')
  if scores.ndim == 4:
    scores = scores.max(axis=1) if head_reduction == 'max' else scores.sum(axis=1)
  if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
    raise ValueError(f'scores_per_layer must be (layers, heads, q, k) or (layers, q, k) with '
                     f'q == k, got shape {np.shape(scores_per_layer)}')
  n = len(tokens)
  if not 1 <= n <= scores.shape[1]:
    raise ValueError(f'need 1 to {scores.shape[1]} tokens for scores over {scores.shape[1]} '
                     f'positions, got {n}')
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f'threshold must be in [0, 1), got {threshold}')
  if not 0 <= root < n:
    raise ValueError(f'root must be a token position in [0, {n}), got {root}')
  if not np.all(np.isfinite(scores[:, :n, :n])):
    raise ValueError('scores_per_layer holds NaN or infinite values')
  top_layer = len(scores) - 1 if top_layer is None else top_layer
  if not 0 <= top_layer < len(scores):
    raise ValueError(f'top_layer must be in [0, {len(scores)}), got {top_layer}')
  scores = scores[:, :n, :n]
  largest = scores.max(axis=(1, 2), keepdims=True)
  normalized = np.where(largest > 0, scores / np.where(largest > 0, largest, 1.0), 0.0)

  in_tree = [root]
  edges_per_layer: list[tuple[TreeEdge, ...]] = [()] * len(scores)
  for layer in range(top_layer, -1, -1):
    parents = list(in_tree)  # nodes that joined in a higher layer
    best: dict[int, TreeEdge] = {}
    for parent in parents:
      for child in range(n):
        score = normalized[layer, parent, child]
        if child == parent or child in in_tree or not score > threshold:
          continue
        if child not in best or score > best[child].score:
          best[child] = TreeEdge(layer, parent, child, float(score))
    edges_per_layer[layer] = tuple(sorted(best.values(), key=lambda e: (e.parent, e.child)))
    in_tree.extend(sorted(best))
  return AttributionTree(edges=tuple(edges_per_layer), nodes=tuple(in_tree), root=root,
                         normalized=normalized, threshold=float(threshold), top_layer=top_layer)


def format_attribution_tree(tree: AttributionTree, tokens: Sequence[str]) -> str:
  """A text rendering: the tree indented from the root, each edge with its layer and score."""
  children: dict[int, list[TreeEdge]] = {}
  for layer_edges in tree.edges:
    for edge in layer_edges:
      children.setdefault(edge.parent, []).append(edge)
  label = lambda position: f'{tokens[position]}_{position}'
  lines = [f'attribution tree (threshold {tree.threshold:g}; layers 1-based, top layer '
           f'{tree.top_layer + 1}; {len(tree.nodes)} of {len(tokens)} tokens)', label(tree.root)]

  def walk(node: int, prefix: str) -> None:
    below = sorted(children.get(node, []), key=lambda e: (-e.layer, -e.score))
    for index, edge in enumerate(below):
      last = index == len(below) - 1
      lines.append(f'{prefix}{"`-- " if last else "|-- "}{label(edge.child)}  '
                   f'(layer {edge.layer + 1}, {edge.score:.2f})')
      walk(edge.child, prefix + ('    ' if last else '|   '))

  walk(tree.root, '')
  return '\n'.join(lines)


def plot_attribution_tree(tree: AttributionTree, tokens: Sequence[str], title: str | None = None):
  """Draws the tree: tokens along x, each node at the layer where it joined; returns the figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  num_layers = tree.top_layer + 1
  height = {tree.root: num_layers + 1}  # a node sits at the layer (1-based) of its incoming edge
  for layer_edges in tree.edges:
    for edge in layer_edges:
      height[edge.child] = edge.layer + 1
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(tokens) + 1.0), 0.5 * num_layers + 2.0))
  for position, token in enumerate(tokens):
    joined = position in height
    y = height.get(position, 0)
    ax.annotate(token, (position, y), ha='center', va='center', fontsize=8,
                color='black' if joined else 'lightgray',
                bbox=dict(boxstyle='round,pad=0.2', fc='lightyellow' if joined else 'white',
                          ec='gray' if joined else 'lightgray'))
  for layer_edges in tree.edges:
    for edge in layer_edges:
      ax.annotate('', xy=(edge.child, height[edge.child] + 0.2),
                  xytext=(edge.parent, height[edge.parent] - 0.2),
                  arrowprops=dict(arrowstyle='->', color=plt.cm.Blues(0.4 + 0.6 * edge.score),
                                  lw=1.2))
  ax.set_xlim(-0.8, len(tokens) - 0.2)
  ax.set_ylim(-0.8, num_layers + 1.8)
  ax.set_yticks(range(num_layers + 2),
                ['not in tree'] + [f'layer {k}' for k in range(1, num_layers + 1)] + ['root'])
  ax.set_xticks([])
  for side in ('top', 'right', 'bottom'):
    ax.spines[side].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  return fig
