"""One float32 matrix product, XLA against PyTorch: the ceiling of every dmx/PyTorch ratio on CPU.

Each row runs in a fresh process (``XLA_FLAGS`` is read once, when JAX
starts): PyTorch's ``torch.matmul`` (its BLAS, MKL in the CPU wheels, what
transformers' layers run), the same product as a ``torch.nn.Linear`` on
oneDNN tensors (``torch.utils.mkldnn``: PyTorch's other CPU backend, which
neither transformers nor the original use, shown as PyTorch's ceiling on
CPUs where MKL is slow), then ``jax.jit(jnp.matmul)`` with its
default flags and with each flag set in ``--xla-flags``, for every shape, in
``--rounds`` interleaved rounds (this machine's speed drifts between
processes). Prints the median milliseconds of ``--repeats`` calls and
GFLOP/s (``2 M K N`` flops per product).

    python benchmarks/bench_matmul.py --shapes 2048x768x3072 2048x3072x768 2048x768x768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_FLAGS = ('--xla_cpu_use_onednn=true', '--xla_cpu_experimental_onednn_fusion_type=dot',
                 '--xla_cpu_experimental_xnn_fusion_type=dot')

# runs in the child process: times one product of each shape, prints one JSON line
_CHILD = r'''
import json, sys, time
import numpy as np
impl, repeats, shapes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
# make_product(left, right) -> a call computing left @ right; wait(result) blocks until done;
# dense(result) -> numpy
if impl == 'torch':
  import torch
  def make_product(left, right):
    left, right = torch.from_numpy(left), torch.from_numpy(right)
    return lambda: torch.matmul(left, right)
  wait = lambda result: result
  dense = lambda result: result.numpy()
elif impl == 'torch-onednn':
  import torch, torch.utils.mkldnn
  torch.set_grad_enabled(False)
  def make_product(left, right):
    linear = torch.nn.Linear(right.shape[0], right.shape[1], bias=False)
    linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(right.T)))
    linear = torch.utils.mkldnn.to_mkldnn(linear)
    left = torch.from_numpy(left).to_mkldnn()
    return lambda: linear(left)
  wait = lambda result: result  # oneDNN computes synchronously
  dense = lambda result: result.to_dense().numpy()
else:
  import jax, jax.numpy as jnp
  def make_product(left, right):
    left, right, product = jnp.asarray(left), jnp.asarray(right), jax.jit(jnp.matmul)
    return lambda: product(left, right)
  wait = lambda result: result.block_until_ready()
  dense = np.asarray
rng = np.random.default_rng(0)
seconds = []
for rows, inner, cols in shapes:
  left = rng.standard_normal((rows, inner), dtype=np.float32)
  right = rng.standard_normal((inner, cols), dtype=np.float32)
  product = make_product(left, right)
  for _ in range(2):  # compile, warm up
    result = dense(wait(product())).astype(np.float64)
  # every row must compute the same product (float32 rounding only)
  reference = left.astype(np.float64) @ right.astype(np.float64)
  error = np.max(np.abs(result - reference)) / np.max(np.abs(reference))
  if not error < 1e-4:
    raise SystemExit(f'{impl}: wrong product for {rows}x{inner}x{cols} (relative error {error:.2e})')
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    wait(product())
    times.append(time.perf_counter() - started)
  seconds.append(float(np.median(times)))
print(json.dumps(seconds))
'''


def parse_shape(text: str) -> tuple[int, int, int]:
  """``'MxKxN'`` -> ``(M, K, N)``: an ``(M, K) @ (K, N)`` product."""
  try:
    rows, inner, cols = (int(part) for part in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'a shape is MxKxN, e.g. 2048x768x3072; got {text!r}') from None
  if min(rows, inner, cols) < 1:
    raise argparse.ArgumentTypeError(f'every dimension must be >= 1, got {text!r}')
  return rows, inner, cols


def run(impl: str, shapes: list, repeats: int, xla_flags: str = '') -> list[float]:
  """Median seconds of each shape's product, in a fresh process."""
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  done = subprocess.run([sys.executable, '-c', _CHILD, impl, str(repeats), json.dumps(shapes)],
                        env=env, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise SystemExit(f'{impl} {xla_flags!r} failed:\n{done.stderr.strip()[-2000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', nargs='+', type=parse_shape,
                      default=[(2048, 768, 3072), (2048, 3072, 768), (2048, 768, 768)],
                      help='products MxKxN (default: BERT-base layers at batch 32 x 64)')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--xla-flags', action='append', default=None, metavar='FLAGS',
                      help='an XLA_FLAGS value to try, written --xla-flags="--xla_cpu_..." '
                      '(repeat for several; default: %s)' % ' '.join(DEFAULT_FLAGS))
  args = parser.parse_args()
  if args.repeats < 1 or args.rounds < 1:
    parser.error('--repeats and --rounds must be >= 1')
  flag_sets = list(DEFAULT_FLAGS) if args.xla_flags is None else args.xla_flags
  rows = [('torch.matmul', 'torch', ''), ('torch oneDNN Linear', 'torch-onednn', '')] + [
      (f'XLA {flags or "(default flags)"}', 'jax', flags) for flags in [''] + flag_sets]
  shape_names = ['x'.join(map(str, shape)) for shape in args.shapes]
  print(f'float32 matrix products, median of {args.repeats} calls, {args.rounds} rounds; '
        f'GFLOP/s per shape: {", ".join(shape_names)}', flush=True)
  for round_index in range(1, args.rounds + 1):
    for name, impl, flags in rows:
      seconds = run(impl, args.shapes, args.repeats, flags)
      figures = '  '.join(f'{1e3 * value:7.1f} ms {2 * m * k * n / value / 1e9:5.0f} GF/s'
                          for value, (m, k, n) in zip(seconds, args.shapes))
      print(f'round {round_index}  {name:<55} {figures}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
