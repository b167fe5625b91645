"""One encoder layer alone, dmx against transformers: where the step's time goes, per layer.

Times one post-LayerNorm BERT layer (random init, the size's width) on a
random ``(batch, seq, hidden)`` input: the forward pass, and the forward pass
with the backward pass to the input only (the frozen weights get no gradient,
as in a DiffMask step). dmx: ``TransformerLayer`` under ``jax.jit``;
transformers: ``BertLayer`` (SDPA attention) with ``torch.no_grad()`` for the
forward pass. Prints the minimum and median over ``--repeats`` interleaved
calls, the median times the layer count (compare it with ``bench_forward.py``'s
whole-model figures to see what the layer stack adds), and the ratio
PyTorch / dmx of the medians (above 1: dmx faster).

    python benchmarks/bench_layer.py --size base --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dmx.bench import SIZES, bert_config
from dmx.models.bert import BertModel, attention_bias


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='base', choices=SIZES)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=7)
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
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
