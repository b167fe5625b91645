"""The step's ingredients alone, dmx against transformers, and what XLA's CPU flags change.

Runs :func:`dmx.bench.time_forward` in one fresh process per row (``XLA_FLAGS``
is read once, when JAX starts) for each part: the clean pass, the input-gate
masked pass, and the masked pass with its backward pass. Rows: PyTorch, dmx
with default flags, and dmx with each flag set in ``--xla-flags``. Prints
seconds per call and the ratio PyTorch / dmx (above 1: dmx faster).

    python benchmarks/bench_forward.py --size base --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from dmx.bench import FORWARD_PARTS

DEFAULT_FLAGS = ('--xla_cpu_use_thunk_runtime=false', '--xla_cpu_enable_fast_math=true',
                 '--xla_cpu_use_onednn=true', '--xla_cpu_experimental_ynn_fusion_type=')


def run(impl: str, part: str, args: argparse.Namespace, xla_flags: str = '') -> dict:
  """One ``time_forward`` measurement in a fresh process."""
  code = ('import json, dmx.bench as b; print(json.dumps(b.time_forward('
          f'{impl!r}, {args.size!r}, {args.batch}, {args.seq}, {args.repeats}, {part!r})))')
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    raise SystemExit(f'{impl} {part} {xla_flags!r} failed:\n{done.stderr.strip()[-2000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='base', choices=('tiny', 'minilm', 'base'))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--parts', nargs='+', choices=FORWARD_PARTS, default=list(FORWARD_PARTS))
  parser.add_argument('--xla-flags', action='append', default=None, metavar='FLAGS',
                      help='an XLA_FLAGS value to try, written --xla-flags="--xla_cpu_..." '
                      '(repeat for several; default: %s)' % ' '.join(DEFAULT_FLAGS))
  args = parser.parse_args()
  flag_sets = list(DEFAULT_FLAGS) if args.xla_flags is None else args.xla_flags
  for part in args.parts:
    torch_result = run('torch', part, args)
    rows = [('transformers', torch_result)]
    rows += [(f'dmx {flags or "(default flags)"}', run('jax', part, args, flags))
             for flags in [''] + flag_sets]
    print(f'{part}: {args.size}, batch {args.batch}, seq {args.seq}, '
          f'{torch_result["device"]}, mean of {args.repeats}', flush=True)
    for name, result in rows:
      print(f'  {name:<52} {result["seconds"]:>8.3f} s   '
            f'torch/this {torch_result["seconds"] / result["seconds"]:.2f}x', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
