"""Where a DiffMask training step's time goes: the step against its two passes, in one process.

For one implementation (dmx or PyTorch as the original writes it) and one
gate, times, in the same process and interleaved over ``--rounds``:

* the clean pass with every hidden state (``dmx.bench.time_forward`` part
  ``clean``);
* the input-gate masked pass with its backward pass to the gates (part
  ``masked_grad``);
* the whole training step (``time_jax_step`` / ``time_torch_step``, every
  depth once per round).

``step - clean - masked_grad`` is what the step spends outside the two
passes: probe votes, gate sampling, the Lagrangian and both optimisers, and
whatever the compiler did not fuse. For hidden gates the masked pass is
shorter than the input one by the layers below each depth, so that
difference is a lower bound there. Prints one line per round and the medians.

    python benchmarks/bench_parts.py --impl jax --size base --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import json
import statistics

from dmx import bench


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--impl', choices=bench.IMPLS, default='jax')
  parser.add_argument('--size', default='base', choices=bench.SIZES)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--gate', choices=('input', 'hidden'), default='input')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=3, help='calls per pass timing')
  args = parser.parse_args()
  if args.rounds < 1:
    raise SystemExit('--rounds must be >= 1')
  step_function = bench.time_jax_step if args.impl == 'jax' else bench.time_torch_step
  seconds = {'clean': [], 'masked_grad': [], 'step': []}
  for round_index in range(args.rounds):
    for part in ('clean', 'masked_grad'):
      seconds[part].append(bench.time_forward(args.impl, args.size, args.batch, args.seq,
                                              args.repeats, part)['seconds'])
    step = step_function(args.size, args.batch, args.seq, args.gate, warmup=1)
    seconds['step'].append(step['step_seconds'])
    print(json.dumps({'round': round_index, **{name: round(values[-1], 3)
                                               for name, values in seconds.items()}}), flush=True)
  medians = {name: statistics.median(values) for name, values in seconds.items()}
  outside = medians['step'] - medians['clean'] - medians['masked_grad']
  print(f'{args.impl} {args.gate} step, {args.size}, batch {args.batch}, seq {args.seq}, '
        f'{step["device"]}; medians of {args.rounds} rounds:')
  print(f'  clean pass                    {medians["clean"]:7.3f} s')
  print(f'  masked pass + backward        {medians["masked_grad"]:7.3f} s')
  print(f'  whole step                    {medians["step"]:7.3f} s')
  print(f'  step - clean - masked         {outside:7.3f} s ({100 * outside / medians["step"]:.0f}%)')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
