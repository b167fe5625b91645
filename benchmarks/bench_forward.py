"""The clean forward pass alone, dmx against transformers, and what XLA's CPU flags change.

Runs :func:`dmx.bench.time_forward` in one fresh process per row (``XLA_FLAGS``
is read once, when JAX starts): PyTorch, dmx with default flags, and dmx with
each flag in ``--xla-flags``. Prints seconds per forward pass and the ratio
PyTorch / dmx (above 1: dmx faster).

    python benchmarks/bench_forward.py --size base --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_FLAGS = ('--xla_cpu_use_thunk_runtime=false', '--xla_cpu_enable_fast_math=true',
                 '--xla_cpu_use_onednn=true')


def run(impl: str, args: argparse.Namespace, xla_flags: str = '') -> dict:
  """One ``time_forward`` measurement in a fresh process."""
  code = ('import json, dmx.bench as b; print(json.dumps(b.time_forward('
          f'{impl!r}, {args.size!r}, {args.batch}, {args.seq}, {args.repeats})))')
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    raise SystemExit(f'{impl} {xla_flags!r} failed:\n{done.stderr.strip()[-2000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='base', choices=('tiny', 'minilm', 'base'))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--xla-flags', nargs='*', default=list(DEFAULT_FLAGS),
                      help='each is tried on its own')
  args = parser.parse_args()
  torch_result = run('torch', args)
  rows = [('transformers (torch.no_grad)', torch_result)]
  rows += [(f'dmx {flags or "(default flags)"}', run('jax', args, flags))
           for flags in [''] + list(args.xla_flags)]
  print(f'clean forward pass, {args.size}, batch {args.batch}, seq {args.seq}, '
        f'{torch_result["device"]}, mean of {args.repeats}')
  for name, result in rows:
    print(f'{name:<52} {result["seconds"]:>8.3f} s   torch/this {torch_result["seconds"] / result["seconds"]:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
