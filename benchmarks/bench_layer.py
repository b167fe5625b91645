"""One encoder layer alone, dmx against transformers: where the step's time goes, per layer.

Times one post-LayerNorm BERT layer (random init, the size's width) on a
random ``(batch, seq, hidden)`` input: the forward pass, and the forward pass
with the backward pass to the input only (the frozen weights get no gradient,
as in a DiffMask step). dmx: ``TransformerLayer`` under ``jax.jit``;
transformers: ``BertLayer`` (SDPA attention) with ``torch.no_grad()`` for the
forward pass. Prints the minimum and median over ``--repeats`` interleaved
calls, the median times the layer count, and the ratio PyTorch / dmx of the
medians (above 1: dmx faster).

``--stack`` also times what the layer stack adds: the whole input-gate masked
pass with its backward pass to the gates (dmx only), four ways over the same
layers: ``BertModel.forward_from`` at the static depth 0, as the input-gate
train step runs it (an unrolled loop, no conditionals), ``forward_from`` at
the same depth given as an array, as the hidden-gate step runs every depth
(each layer behind a ``lax.cond``), a plain ``lax.scan``, and a plain scan
whose layers are rematerialised in the backward pass (``jax.checkpoint``:
more FLOPs, fewer saved activations).

    python benchmarks/bench_layer.py --size base --batch 32 --seq 64 [--stack]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dmx.bench import SIZES, bert_config
from dmx import probes
from dmx.models.bert import BertModel, Embeddings, attention_bias


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='base', choices=SIZES)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--stack', action='store_true',
                      help='also time the whole masked pass three ways (see above)')
  args = parser.parse_args()
  if args.repeats < 1 or args.batch < 1 or args.seq < 1:
    raise SystemExit('--repeats, --batch and --seq must be >= 1')

  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig as HfBertConfig  # pylint: disable=import-outside-toplevel
  from transformers.models.bert.modeling_bert import BertLayer  # pylint: disable=import-outside-toplevel

  config = bert_config(args.size)
  model = BertModel(config)
  layer_params = jax.tree.map(lambda leaf: leaf[0], model.init(jax.random.key(0),
                                                               args.seq)['layers'])
  shape = (args.batch, args.seq, config.hidden_size)
  hidden = jax.random.normal(jax.random.key(1), shape)
  cotangent = jax.random.normal(jax.random.key(2), shape)  # a random one: no constant folding
  bias = attention_bias(jnp.ones(shape[:2], bool))
  jax_forward = jax.jit(lambda params, x: model._run_layer(params, x, bias))  # pylint: disable=protected-access
  jax_input_grad = jax.jit(jax.grad(
      lambda x, params: jnp.sum(model._run_layer(params, x, bias) * cotangent)))  # pylint: disable=protected-access

  torch.manual_seed(0)
  hf_config = HfBertConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_heads,
                           intermediate_size=config.intermediate_size,
                           attn_implementation='sdpa')
  torch_layer = BertLayer(hf_config).eval()
  for parameter in torch_layer.parameters():
    parameter.requires_grad_(False)
  torch_hidden = torch.from_numpy(np.array(hidden))  # a writable copy
  torch_cotangent = torch.from_numpy(np.array(cotangent))

  def first(output):
    return output[0] if isinstance(output, tuple) else output

  def torch_forward():
    with torch.no_grad():
      return first(torch_layer(torch_hidden))

  def torch_input_grad():
    x = torch_hidden.clone().requires_grad_(True)
    (first(torch_layer(x)) * torch_cotangent).sum().backward()
    return x.grad

  calls = {
      'dmx forward': lambda: jax.block_until_ready(jax_forward(layer_params, hidden)),
      'dmx forward+backward': lambda: jax.block_until_ready(jax_input_grad(hidden, layer_params)),
      'transformers forward': torch_forward,
      'transformers forward+backward': torch_input_grad,
  }
  for call in calls.values():  # compile and warm up
    call()
  seconds = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - start)
  print(f'one layer, {args.size}, batch {args.batch}, seq {args.seq}, '
        f'torch threads {torch.get_num_threads()}, {args.repeats} repeats')
  medians = {name: float(np.median(values)) for name, values in seconds.items()}
  for name, values in seconds.items():
    print(f'  {name:<32} min {min(values) * 1e3:8.1f} ms   median {medians[name] * 1e3:8.1f} ms   '
          f'x{config.num_layers} layers {medians[name] * config.num_layers:6.2f} s')
  for part in ('forward', 'forward+backward'):
    ratio = medians[f'transformers {part}'] / medians[f'dmx {part}']
    print(f'  {part}: PyTorch / dmx = {ratio:.2f}x')
  if args.stack:
    time_stack(model, args)
  return 0


def time_stack(model: BertModel, args: argparse.Namespace) -> None:
  """Prints the masked input pass + backward: forward_from both ways, a scan, a remat scan."""
  config = model.config
  params = model.init(jax.random.key(0), args.seq)
  batch = {'input_ids': jax.random.randint(jax.random.key(3), (args.batch, args.seq), 1000, 2000),
           'mask': jnp.ones((args.batch, args.seq), bool)}
  _, states = jax.jit(model.forward)(params, batch)
  baselines = (jnp.zeros((config.hidden_size,), jnp.float32),)
  bias = attention_bias(batch['mask'])
  cotangent = jax.random.normal(jax.random.key(4), (args.batch, config.num_labels))

  def layers_scan(params, hidden):
    step = lambda hidden, layer: (model._run_layer(layer, hidden, bias), None)  # pylint: disable=protected-access
    return jax.lax.scan(step, hidden, params['layers'])[0]

  def layers_remat(params, hidden):
    step = jax.checkpoint(lambda hidden, layer: (model._run_layer(layer, hidden, bias), None))  # pylint: disable=protected-access
    return jax.lax.scan(step, hidden, params['layers'])[0]

  def logits(gates, params, stack):
    if isinstance(stack, str):  # the train step's masked pass, at a static or traced depth
      depth = 0 if stack == 'static' else jnp.int32(0)
      replace = lambda index, state: probes.replace_with_baseline(state, gates, baselines[0])
      return model.forward_from(params, batch, states, depth, replace)
    ids = batch['input_ids']
    embedded = model.embeddings.apply(
        {'params': params['embeddings']}, states[0] * gates[..., None], ids, jnp.zeros_like(ids),
        method=Embeddings.combine)
    return model._outputs(params, stack(params, embedded), batch['mask'])  # pylint: disable=protected-access

  gates = jnp.full((args.batch, args.seq), 0.7)  # strictly inside (0, 1): both paths live
  calls = {name: jax.jit(jax.grad(lambda g, p, stack=stack: jnp.sum(logits(g, p, stack) * cotangent)))
           for name, stack in (('forward_from, static depth', 'static'),
                               ('forward_from, traced depth (conds)', 'traced'),
                               ('plain scan', layers_scan),
                               ('scan, layers rematerialised', layers_remat))}
  gradients = {name: np.asarray(call(gates, params)) for name, call in calls.items()}
  reference = gradients['forward_from, static depth']
  # the four are one computation: a timing of a different one would mean nothing
  differences = {name: float(np.abs(value - reference).max()) for name, value in gradients.items()}
  if max(differences.values()) > 1e-4 * max(float(np.abs(reference).max()), 1.0):
    raise SystemExit(f'the masked passes disagree: max |difference| {differences}')
  seconds = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call(gates, params))
      seconds[name].append(time.perf_counter() - start)
  print(f'whole masked input pass + backward to the gates, {config.num_layers} layers')
  for name, values in seconds.items():
    print(f'  {name:<32} min {min(values):6.2f} s   median {np.median(values):6.2f} s')


if __name__ == '__main__':
  raise SystemExit(main())
