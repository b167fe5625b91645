"""Tests for dmx.baselines.attention and BertModel's explicit attention entry points.

References are independent of the code under test: a float64 numpy BERT
(one layer) for the attention and for the attribution scores (central
differences), parameters with zeroed output-projection rows for head pruning,
the fundamental theorem of calculus for completeness, and hand-made score
matrices for the attribution tree.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx.baselines import attention as attention_lib
from dmx.baselines.attention import (AttributionTree, attribution_tree, format_attribution_tree,
                                     head_importance, head_pruning_curve, plot_attribution_tree,
                                     plot_pruning_curve, pruning_mask, raw_attention, rank_heads,
                                     self_attention_attribution)
from dmx.models.bert import BertConfig, BertModel


@functools.lru_cache(maxsize=None)
def tiny_classifier(num_layers: int = 2, num_heads: int = 4, hidden: int = 16, seed: int = 0,
                    scale: float = 0.3):
  """A random BERT classifier (3 labels) whose weights are large enough to matter.

  Every leaf is ``scale`` times standard normal noise (LayerNorm scales around 1);
  the parameter tree comes from ``jax.eval_shape``, so nothing is compiled.
  """
  config = BertConfig.tiny(num_layers=num_layers, num_heads=num_heads, hidden_size=hidden,
                           intermediate_size=2 * hidden, vocab_size=40, head='classification',
                           num_labels=3)
  model = BertModel(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(centre + scale * rng.standard_normal(leaf.shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


# compiled once per model, layer and shape, shared with head_importance (the jit-or-not
# test runs self_attention_attribution eagerly too)
attribute = attention_lib.jitted_self_attention_attribution


def padded_batch(lengths, seq_len=None, seed: int = 0, vocab_size: int = 40):
  """``[CLS]``-like id 1 first, random ids, trailing padding (id 0)."""
  rng = np.random.default_rng(seed)
  seq_len = seq_len or max(lengths)
  mask = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
  ids = rng.integers(2, vocab_size, (len(lengths), seq_len))
  ids[:, 0] = 1
  return {'input_ids': np.where(mask, ids, 0).astype(np.int32), 'mask': mask}


# ---------------------------------------------------------------------------
# float64 numpy reference of a BERT classifier


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def numpy_classifier(model, params, batch, edit_layer=None, edit_attention=None):
  """``(probabilities (b, labels), attention (L, b, h, q, k))`` in float64.

  ``edit_attention`` ``(b, h, q, k)`` replaces layer ``edit_layer``'s probabilities.
  """
  c = model.config
  p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
  ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['mask'])
  e = p['embeddings']
  hidden = (e['word_embeddings']['embedding'][ids] + e['token_type_embeddings']['embedding'][0]
            + e['position_embeddings']['embedding'][np.arange(ids.shape[1])][None])
  hidden = _layer_norm(hidden, e['layer_norm']['scale'], e['layer_norm']['bias'], c.layer_norm_eps)
  head_dim = c.hidden_size // c.num_heads
  dense = lambda x, d, k: x @ d['kernel'][k] + d['bias'][k]
  attentions = []
  for k in range(c.num_layers):
    a = p['layers']['attention']
    split = lambda x: x.reshape(x.shape[:2] + (c.num_heads, head_dim))
    q, key, v = (split(dense(hidden, a[name], k)) for name in ('query', 'key', 'value'))
    logits = np.einsum('bqhd,bkhd->bhqk', q, key) / math.sqrt(head_dim)
    logits = logits + np.where(mask, 0.0, -1e9)[:, None, None, :]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if k == edit_layer:
      weights = np.asarray(edit_attention, np.float64)
    attentions.append(weights)
    context = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(hidden.shape)
    lp = p['layers']
    hidden = _layer_norm(dense(context, a['output'], k) + hidden,
                         lp['attention_layer_norm']['scale'][k],
                         lp['attention_layer_norm']['bias'][k], c.layer_norm_eps)
    inner = dense(hidden, lp['intermediate'], k)
    inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
    hidden = _layer_norm(dense(inner, lp['output'], k) + hidden,
                         lp['output_layer_norm']['scale'][k], lp['output_layer_norm']['bias'][k],
                         c.layer_norm_eps)
  h = p['head']
  pooled = np.tanh(hidden[:, 0] @ h['pooler']['kernel'] + h['pooler']['bias'])
  logits = pooled @ h['classifier']['kernel'] + h['classifier']['bias']
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  return probabilities / probabilities.sum(-1, keepdims=True), np.stack(attentions)


# ---------------------------------------------------------------------------
# BertModel's attention entry points


def test_attention_matches_numpy_float64_one_layer():
  model, params = tiny_classifier(num_layers=1, num_heads=2, hidden=8)
  batch = padded_batch([5, 3])
  expected_probs, expected_attention = numpy_classifier(model, params, batch)
  result = model.forward_with_attention(params, batch)
  assert result.attention.shape == (1, 2, 2, 5, 5)
  np.testing.assert_allclose(result.attention, expected_attention, atol=2e-6)
  np.testing.assert_allclose(jax.nn.softmax(result.outputs), expected_probs, atol=2e-6)
  np.testing.assert_allclose(model.attention_probabilities(params, batch), expected_attention,
                             atol=2e-6)


def test_attention_rows_sum_to_one_and_padded_keys_are_zero():
  model, params = tiny_classifier()
  batch = padded_batch([6, 4, 1])
  attention = np.asarray(model.attention_probabilities(params, batch))  # (L, b, h, q, k)
  assert attention.shape == (2, 3, 4, 6, 6)
  mask = batch['mask']
  row_sums = attention.sum(-1).transpose(1, 3, 0, 2)  # (b, q, L, h)
  np.testing.assert_allclose(row_sums[mask], 1.0, atol=1e-5)
  assert np.all(attention.transpose(1, 4, 0, 2, 3)[~mask] == 0.0)  # padded keys


def test_edited_pass_matches_numpy_and_resumed_pass():
  model, params = tiny_classifier(num_layers=1, num_heads=2, hidden=8)
  batch = padded_batch([5, 3], seed=1)
  attention = np.asarray(model.attention_probabilities(params, batch))[0]
  replacement = 0.3 * attention + 0.05
  expected, _ = numpy_classifier(model, params, batch, 0, replacement)
  full = model.forward_with_attention(params, batch, attention_layer=0,
                                      attention_edit=lambda a: 0.3 * a + 0.05)
  np.testing.assert_allclose(jax.nn.softmax(full.outputs), expected, atol=2e-6)
  np.testing.assert_allclose(full.attention[0], replacement, atol=1e-6)
  _, states = model.forward(params, batch)
  resumed = model.forward_from_attention(params, batch, states, 0, lambda a: 0.3 * a + 0.05)
  np.testing.assert_allclose(resumed, full.outputs, atol=1e-5)


@pytest.mark.parametrize('layer', [0, 1])  # nothing below, nothing above
def test_edit_of_upper_layers_resumes_and_identity_edit_is_the_plain_pass(layer):
  model, params = tiny_classifier()
  batch = padded_batch([6, 4])
  outputs, states = model.forward(params, batch)
  identity = model.forward_with_attention(params, batch, attention_layer=layer,
                                          attention_edit=lambda a: a)
  np.testing.assert_allclose(identity.outputs, outputs, atol=1e-5)
  for mine, theirs in zip(identity.states, states):
    np.testing.assert_allclose(mine, theirs, atol=1e-5)
  halved = model.forward_with_attention(params, batch, attention_layer=layer,
                                        attention_edit=lambda a: 0.5 * a)
  resumed = model.forward_from_attention(params, batch, states, layer, lambda a: 0.5 * a)
  np.testing.assert_allclose(resumed, halved.outputs, atol=1e-5)
  assert not np.allclose(halved.outputs, outputs, atol=1e-4)
  # the layers below the edit are untouched
  for k in range(layer + 2):
    np.testing.assert_allclose(halved.states[k], states[k], atol=1e-6)


def test_head_mask_of_ones_is_the_plain_forward_exactly(jit_or_not):
  model, params = tiny_classifier()
  batch = padded_batch([6, 4, 1])
  plain = jit_or_not(lambda p, b: model.forward(p, b))(params, batch)
  masked = jit_or_not(lambda p, b, m: model.forward_with_attention(p, b, head_mask=m))(
      params, batch, np.ones((2, 4), np.float32))
  np.testing.assert_array_equal(masked.outputs, plain[0])
  for mine, theirs in zip(masked.states, plain[1]):
    np.testing.assert_array_equal(mine, theirs)


def _zero_output_rows(params, layer, heads, head_dim):
  """Parameters whose attention output projection ignores ``heads`` of ``layer``."""
  kernel = np.array(params['layers']['attention']['output']['kernel'])
  for head in heads:
    kernel[layer, head * head_dim:(head + 1) * head_dim] = 0.0
  new = jax.tree.map(lambda x: x, params)
  new['layers']['attention']['output']['kernel'] = jnp.asarray(kernel)
  return new


def test_head_mask_prunes_heads_like_zeroed_output_projection_rows():
  model, params = tiny_classifier(num_layers=2, num_heads=4, hidden=16)
  batch = padded_batch([6, 3])
  head_dim = 4
  head_mask = np.ones((2, 4), np.float32)
  head_mask[0, [1, 3]] = 0.0
  head_mask[1, :] = 0.0
  reference = _zero_output_rows(_zero_output_rows(params, 0, [1, 3], head_dim), 1, range(4),
                                head_dim)
  expected, _ = model.forward(reference, batch)
  pruned = model.forward_with_attention(params, batch, head_mask=head_mask)
  np.testing.assert_allclose(pruned.outputs, expected, atol=1e-5)
  # every head pruned: the outputs no longer depend on the tokens beyond position and [CLS]
  everything = model.forward_with_attention(params, batch, head_mask=np.zeros((2, 4)))
  all_zeroed = _zero_output_rows(_zero_output_rows(params, 0, range(4), head_dim), 1, range(4),
                                 head_dim)
  np.testing.assert_allclose(everything.outputs, model.forward(all_zeroed, batch)[0], atol=1e-5)
  assert not np.allclose(everything.outputs, model.forward(params, batch)[0], atol=1e-3)


def test_attention_entry_points_reject_bad_arguments():
  model, params = tiny_classifier()
  batch = padded_batch([4])
  _, states = model.forward(params, batch)
  with pytest.raises(ValueError, match='head_mask'):
    model.forward_with_attention(params, batch, head_mask=np.ones((4, 2)))
  with pytest.raises(ValueError, match='attention_layer must be in'):
    model.forward_with_attention(params, batch, attention_layer=2, attention_edit=lambda a: a)
  with pytest.raises(ValueError, match='together'):
    model.forward_with_attention(params, batch, attention_layer=0)
  with pytest.raises(ValueError, match='Python int'):
    jax.jit(lambda layer: model.forward_from_attention(params, batch, states, layer,
                                                       lambda a: a))(0)
  with pytest.raises(ValueError, match='attention_edit must return'):
    model.forward_with_attention(params, batch, attention_layer=0,
                                 attention_edit=lambda a: a[:, :1])


# ---------------------------------------------------------------------------
# Raw attention


def test_raw_attention_shape_padding_and_numpy_reference(jit_or_not):
  model, params = tiny_classifier(num_layers=2, num_heads=4)
  batch = padded_batch([6, 4, 1])
  raw = np.asarray(jit_or_not(lambda p, b: raw_attention(model, p, b))(params, batch))
  assert raw.shape == (3, 2, 6)
  _, attention = numpy_classifier(model, params, batch)  # (L, b, h, q, k)
  for row, length in enumerate([6, 4, 1]):
    expected = attention[:, row, :, :length, :length].max(axis=1).mean(axis=1)  # (L, k)
    np.testing.assert_allclose(raw[row, :, :length], expected, atol=2e-6)
    assert np.all(raw[row, :, length:] == 0.0)
  sums = raw.sum(-1)
  assert np.all(sums >= 1.0 - 1e-5) and np.all(sums <= 4.0 + 1e-5)
  # padding changes nothing: the 4-token sentence alone, unpadded, gives the same row
  alone = {'input_ids': batch['input_ids'][1:2, :4], 'mask': batch['mask'][1:2, :4]}
  np.testing.assert_allclose(np.asarray(raw_attention(model, params, alone))[0],
                             raw[1, :, :4], atol=1e-5)


def test_raw_attention_one_head_rows_sum_to_one_and_normalisation():
  model, params = tiny_classifier(num_layers=3, num_heads=1)
  batch = padded_batch([5, 2])
  raw = np.asarray(raw_attention(model, params, batch))
  np.testing.assert_allclose(raw.sum(-1), 1.0, atol=1e-5)
  normalized = np.asarray(raw_attention(model, params, batch, normalize_per_layer=True))
  np.testing.assert_allclose(normalized.max(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(normalized, raw / raw.max(-1, keepdims=True), atol=1e-6)


def test_raw_attention_needs_an_attention_model():
  class HiddenStatesOnly:  # pylint: disable=too-few-public-methods
    """A model with forward and forward_from but no attention entry points."""
  with pytest.raises(ValueError, match='explicit attention'):
    raw_attention(HiddenStatesOnly(), {}, padded_batch([3]))


# ---------------------------------------------------------------------------
# Self-attention attribution


def test_attribution_scores_match_float64_central_differences():
  model, params = tiny_classifier(num_layers=1, num_heads=2, hidden=8, seed=3)
  batch = padded_batch([4, 3], seed=2)
  steps = 5
  result = attribute(model, params, batch, layer_index=0, steps=steps)
  probabilities, attention = numpy_classifier(model, params, batch)
  target = probabilities.argmax(-1)
  np.testing.assert_array_equal(result.target, target)
  np.testing.assert_allclose(result.attention, attention[0], atol=2e-6)
  score = lambda a: numpy_classifier(model, params, batch, 0, a)[0][np.arange(2), target]
  expected = np.zeros_like(attention[0])
  epsilon = 1e-5
  for alpha in np.arange(1, steps + 1) / steps:
    point = alpha * attention[0]
    for index in np.ndindex(point.shape):
      up, down = point.copy(), point.copy()
      up[index] += epsilon
      down[index] -= epsilon
      expected[index] += (score(up) - score(down))[index[0]] / (2 * epsilon)
  expected = attention[0] * expected / steps
  mask = batch['mask']
  expected *= mask[:, None, :, None] * mask[:, None, None, :]
  np.testing.assert_allclose(result.scores, expected, atol=2e-5 * np.abs(expected).max())
  np.testing.assert_allclose(result.target_score, probabilities[np.arange(2), target], atol=2e-6)


def test_completeness_within_one_percent(output='probability', layer=1, rule='gauss_legendre',
                                         steps=16):
  model, params = tiny_classifier(num_layers=2, num_heads=4, seed=5)
  batch = padded_batch([7, 5, 3], seed=4)
  result = attribute(model, params, batch, layer_index=layer, steps=steps, output=output,
                     rule=rule, path_batch_size=32)
  total = np.asarray(result.scores).sum(axis=(1, 2, 3))
  # F(A) and F(0) computed independently: the clean pass and the layer's attention zeroed
  clean = np.asarray(model.forward(params, batch)[0])
  zeroed = np.asarray(model.forward_with_attention(params, batch, attention_layer=layer,
                                                   attention_edit=jnp.zeros_like).outputs)
  if output == 'probability':
    clean, zeroed = np.asarray(jax.nn.softmax(clean)), np.asarray(jax.nn.softmax(zeroed))
  rows, target = np.arange(3), clean.argmax(-1)
  gap = clean[rows, target] - zeroed[rows, target]
  assert np.all(np.abs(gap) > 1e-2), gap  # a non-trivial integral
  np.testing.assert_allclose(total, gap, rtol=0.01, atol=1e-6)
  np.testing.assert_allclose(result.target_score, clean[rows, target], atol=1e-5)
  np.testing.assert_allclose(result.baseline_score, zeroed[rows, target], atol=1e-5)
  np.testing.assert_allclose(result.convergence_delta, total - gap, atol=1e-5)


def test_attribution_jit_nojit_padding_and_length_one_inputs(jit_or_not):
  model, params = tiny_classifier()
  batch = padded_batch([6, 3, 1])
  run = jit_or_not(lambda p, b: self_attention_attribution(model, p, b, layer_index=1, steps=6,
                                                           path_batch_size=4))
  result = run(params, batch)
  for field in result:
    assert np.all(np.isfinite(np.asarray(field)))
  reference = attribute(model, params, batch, layer_index=1, steps=6)  # one chunk, compiled
  np.testing.assert_allclose(result.scores, reference.scores, atol=1e-6)
  scores = np.asarray(result.scores)
  assert scores.shape == (3, 4, 6, 6)
  assert np.all(scores[1, :, 3:, :] == 0) and np.all(scores[1, :, :, 3:] == 0)
  assert np.all(scores[2].reshape(4, -1)[:, 1:] == 0)  # a lone [CLS]: one real pair


def test_no_nan_for_a_lone_cls_token():
  model, params = tiny_classifier()
  single = padded_batch([1])
  result = attribute(model, params, single, layer_index=1, steps=6, output='logit')
  for field in result:
    assert np.all(np.isfinite(np.asarray(field)))
  assert result.scores.shape == (1, 4, 1, 1)
  # a lone [CLS] only attends to itself
  np.testing.assert_allclose(np.asarray(raw_attention(model, params, single)), 1.0, atol=1e-6)


def test_attribution_rejects_bad_arguments():
  model, params = tiny_classifier()
  batch = padded_batch([4])
  # under jit the checks fire while tracing, before anything is compiled
  traced = lambda model, **options: jax.jit(lambda p, b: self_attention_attribution(
      model, p, b, **options))
  with pytest.raises(ValueError, match='attention_layer must be in'):
    traced(model, layer_index=5)(params, batch)
  with pytest.raises(ValueError, match='steps'):
    traced(model, layer_index=0, steps=0)(params, batch)
  with pytest.raises(ValueError, match='output'):
    traced(model, layer_index=0, output='loss')(params, batch)
  encoder = BertModel(BertConfig.tiny())
  shapes = jax.eval_shape(encoder.init, jax.random.key(0))
  with pytest.raises(ValueError, match=r'\(batch, classes\)'):
    traced(encoder, layer_index=0)(shapes, batch)


# ---------------------------------------------------------------------------
# Head importance and pruning


def test_head_importance_is_the_mean_of_per_example_maxima():
  model, params = tiny_classifier()
  # the shapes and options of the jit-or-not test: the compiled programs are shared
  batches = [padded_batch([6, 3, 1]), padded_batch([5, 1, 2], seq_len=6, seed=2)]
  seen = []
  result = head_importance(model, params, batches, steps=6, progress=seen.append)
  assert seen == [3, 3]
  assert result.per_example.shape == (6, 2, 4) and result.importance.shape == (2, 4)
  per_example = []
  for batch in batches:
    scores = [np.asarray(attribute(model, params, batch, layer_index=layer, steps=6).scores)
              for layer in range(2)]
    for row, length in enumerate(batch['mask'].sum(-1)):
      per_example.append([layer_scores[row, :, :length, :length].max(axis=(1, 2))
                          for layer_scores in scores])
  per_example = np.asarray(per_example)  # (examples, layers, heads)
  assert np.all(np.isfinite(result.per_example))  # the lone [CLS] row too
  np.testing.assert_allclose(result.per_example, per_example, atol=1e-6)
  np.testing.assert_allclose(result.importance, per_example.mean(0), atol=1e-6)
  flat = result.importance[result.ranking[:, 0], result.ranking[:, 1]]
  assert np.all(np.diff(flat) <= 0)
  assert sorted(map(tuple, result.ranking)) == [(l, h) for l in range(2) for h in range(4)]


def test_rank_heads_and_pruning_mask():
  ranking = rank_heads(np.array([[0.1, 0.5], [0.5, -1.0]]))
  np.testing.assert_array_equal(ranking, [[0, 1], [1, 0], [0, 0], [1, 1]])
  np.testing.assert_array_equal(pruning_mask(ranking, 2, (2, 2)), [[1, 0], [0, 1]])
  with pytest.raises(ValueError, match='num_pruned'):
    pruning_mask(ranking, 5, (2, 2))


def test_pruning_curve_none_versus_all_and_orders():
  model, params = tiny_classifier()
  batches = [padded_batch([6, 3], seed=3), padded_batch([4, 5], seq_len=6, seed=5)]
  labels = [np.array([0, 1]), np.array([2, 0])]
  importance = np.arange(8, dtype=float).reshape(2, 4)
  curve = head_pruning_curve(model, params, batches, importance, labels=labels,
                             num_pruned=[0, 3, 8])
  assert curve.orders == attention_lib.PRUNING_ORDERS
  np.testing.assert_array_equal(curve.num_pruned, [0, 3, 8])
  np.testing.assert_allclose(curve.fraction_pruned, [0, 3 / 8, 1])
  np.testing.assert_array_equal(curve.agreement[:, 0], 1.0)
  plain = np.concatenate([np.asarray(model.forward(params, b)[0]).argmax(-1) for b in batches])
  np.testing.assert_allclose(curve.accuracy[:, 0], np.mean(plain == np.concatenate(labels)))
  # all heads pruned: every order is the same model, computed independently
  all_zeroed = _zero_output_rows(_zero_output_rows(params, 0, range(4), 4), 1, range(4), 4)
  pruned = np.concatenate([np.asarray(model.forward(all_zeroed, b)[0]).argmax(-1)
                           for b in batches])
  np.testing.assert_allclose(curve.agreement[:, 2], np.mean(pruned == plain))
  np.testing.assert_allclose(curve.accuracy[:, 2], np.mean(pruned == np.concatenate(labels)))
  # the orders: most important = highest importance first
  np.testing.assert_array_equal(curve.head_orders[0, :3], [[1, 3], [1, 2], [1, 1]])
  np.testing.assert_array_equal(curve.head_orders[1, :3], [[0, 0], [0, 1], [0, 2]])
  assert sorted(map(tuple, curve.head_orders[2])) == [(l, h) for l in range(2) for h in range(4)]
  fig = plot_pruning_curve(curve)
  assert len(fig.axes[0].lines) == 3
  no_labels = head_pruning_curve(model, params, batches, importance, orders=['random'])
  assert no_labels.accuracy is None and no_labels.agreement.shape == (1, 9)
  with pytest.raises(ValueError, match='importance'):
    head_pruning_curve(model, params, batches, np.ones((4, 2)))
  with pytest.raises(ValueError, match='orders'):
    head_pruning_curve(model, params, batches, importance, orders=['backwards'])


# ---------------------------------------------------------------------------
# Attribution tree


def test_attribution_tree_by_hand():
  tokens = ['[CLS]', 'not', 'very', 'good', '[SEP]']
  scores = np.zeros((3, 5, 5))
  scores[2, 0, 3] = 2.0      # top layer: [CLS] draws on 'good' ...
  scores[2, 0, 4] = 0.2      # ... and weakly on [SEP] (0.1, under the threshold)
  scores[2, 3, 1] = 1.5      # same layer: 'good' is not in the tree above layer 3 yet
  scores[1, 3, 1] = 1.0      # layer 2: 'good' draws on 'not'
  scores[1, 0, 1] = 0.6      # [CLS] reaches 'not' too, under the threshold (0.12)
  scores[1, 3, 3] = 5.0      # self-edges never count (but set the layer's max, 5)
  scores[0, 1, 2] = 3.0      # layer 1: 'not' draws on 'very'
  scores[0, 2, 1] = 3.0      # 'very' is not in the tree before layer 1
  scores[0, 0, 3] = 2.0      # 'good' is already in the tree
  tree = attribution_tree(scores, tokens, threshold=0.15)
  assert isinstance(tree, AttributionTree)
  assert tree.edges[2] == (attention_lib.TreeEdge(2, 0, 3, 1.0),)
  assert tree.edges[1] == (attention_lib.TreeEdge(1, 3, 1, 0.2),)
  assert tree.edges[0] == (attention_lib.TreeEdge(0, 1, 2, 1.0),)
  assert tree.nodes == (0, 3, 1, 2)
  text = format_attribution_tree(tree, tokens)
  assert 'good_3  (layer 3, 1.00)' in text and 'very_2  (layer 1, 1.00)' in text
  assert text.index('good_3') < text.index('not_1') < text.index('very_2')
  # a higher threshold cuts the weak layer-2 edge, and the subtree below it
  pruned = attribution_tree(scores, tokens, threshold=0.3)
  assert pruned.nodes == (0, 3) and pruned.edges[0] == () and pruned.edges[1] == ()
  fig = plot_attribution_tree(tree, tokens, title='by hand')
  assert fig.axes
  # starting one layer lower, as Hao et al.'s code does: the root's strongest layer-2 edge
  # is to 'not' (0.6 / 5 = 0.12 > 0.1), then 'not' draws on 'very' in layer 1
  lower = attribution_tree(scores, tokens, threshold=0.1, top_layer=1)
  assert lower.edges[2] == () and lower.top_layer == 1
  assert lower.edges[1] == (attention_lib.TreeEdge(1, 0, 1, 0.12),)
  assert lower.edges[0] == (attention_lib.TreeEdge(0, 0, 3, 2.0 / 3.0),
                            attention_lib.TreeEdge(0, 1, 2, 1.0))
  assert 'top layer 2' in format_attribution_tree(lower, tokens)


def test_attribution_tree_from_heads_and_real_attributions():
  tokens = ['[CLS]', 'a', 'b', '[SEP]']
  per_head = np.zeros((2, 3, 6, 6))  # padded to 6 positions
  per_head[1, 0, 0, 2] = 1.0
  per_head[1, 2, 0, 1] = 0.9
  per_head[0, 1, 2, 3] = 0.7
  per_head[0, 1, 1, 3] = 0.8
  per_head[0, 0, 0, 5] = 99.0  # padding: outside the tokens, ignored
  tree = attribution_tree(per_head, tokens, threshold=0.5)
  assert tree.nodes == (0, 1, 2, 3)
  assert tree.edges[1] == (attention_lib.TreeEdge(1, 0, 1, 0.9), attention_lib.TreeEdge(1, 0, 2, 1.0))
  assert tree.edges[0] == (attention_lib.TreeEdge(0, 1, 3, 1.0),)  # the stronger parent wins
  summed = attribution_tree(per_head, tokens, threshold=0.5, head_reduction='sum')
  assert summed.normalized.shape == (2, 4, 4)
  # on a real attribution every child has one parent that joined in a higher layer
  model, params = tiny_classifier()
  batch = padded_batch([6, 3, 1])  # compiled by the head-importance test already
  scores = np.stack([np.asarray(attribute(model, params, batch, layer_index=l, steps=6).scores[0])
                     for l in range(2)])
  tree = attribution_tree(scores, [f't{k}' for k in range(6)], threshold=0.1)
  joined = {tree.root: len(tree.edges)}
  for layer in range(len(tree.edges) - 1, -1, -1):
    for edge in tree.edges[layer]:
      assert edge.child not in joined and joined[edge.parent] > layer
      assert edge.score > 0.1
      joined[edge.child] = layer
  assert set(joined) == set(tree.nodes)


def test_attribution_tree_rejects_bad_input():
  with pytest.raises(ValueError, match='threshold'):
    attribution_tree(np.zeros((2, 3, 3)), ['a', 'b', 'c'], threshold=1.0)
  with pytest.raises(ValueError, match='tokens'):
    attribution_tree(np.zeros((2, 3, 3)), ['a'] * 4)
  with pytest.raises(ValueError, match='scores_per_layer'):
    attribution_tree(np.zeros((2, 3, 4)), ['a'])
  with pytest.raises(ValueError, match='NaN'):
    attribution_tree(np.full((2, 3, 3), np.nan), ['a', 'b'])
  with pytest.raises(ValueError, match='top_layer'):
    attribution_tree(np.zeros((2, 3, 3)), ['a'], top_layer=2)
  with pytest.raises(ValueError, match='head_reduction'):
    attribution_tree(np.zeros((2, 1, 3, 3)), ['a'], head_reduction='mean')
