"""dmx against PyTorch, side by side: DiffMask training-step speed and attribution throughput.

For every size and gate it runs ``dmx bench step --impl jax`` and
``dmx bench step --impl torch`` (one process each, so peak memory is per
implementation; same random-init model sizes, batch, sequence length and depth
schedule, see :mod:`dmx.bench`), then ``dmx bench attribution`` per size
(amortised DiffMask against integrated gradients); with
``--cached-clean-pass`` also dmx's step on a batch that carries its clean
pass, as ``dmx diffmask`` trains on a fixed dataset. It prints a table of
examples/s, the jax/torch ratio and peak memory (``MB``: the process peak, or
the device peak on GPU; ``+MB``: on CPU, the peak above the resident set
before the model was built, which leaves out the ~150 MB of JAX the PyTorch
process imports), and appends every JSON line to ``--out``.

    python benchmarks/bench_step.py --sizes base --batch 32 --seq 64

Timings are measurements, not tests: run on a quiet machine, nothing else
busy. The default ``--steps`` (one per depth, ``L + 2``) averages hidden-gate
steps over every depth.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

SIZES = ('tiny', 'minilm', 'base')
GATES = ('input', 'hidden')


def run_one(arguments: list[str]) -> dict:
  """Runs ``dmx <arguments>`` in a fresh process; returns its JSON line."""
  command = [sys.executable, '-m', 'dmx.cli', *arguments]
  print('$ dmx ' + ' '.join(arguments), file=sys.stderr, flush=True)
  started = time.perf_counter()
  completed = subprocess.run(command, capture_output=True, text=True, check=False)
  if completed.returncode != 0:
    raise SystemExit(f'dmx {" ".join(arguments)} failed ({completed.returncode}):\n'
                     f'{completed.stderr.strip()}')
  lines = [line for line in completed.stdout.splitlines() if line.startswith('{')]
  if not lines:
    raise SystemExit(f'dmx {" ".join(arguments)} printed no JSON line:\n{completed.stdout}')
  result = json.loads(lines[-1])
  result['wall_seconds'] = round(time.perf_counter() - started, 1)
  return result


def step_arguments(impl: str, size: str, gate: str, args: argparse.Namespace,
                   cached: bool = False) -> list[str]:
  arguments = ['bench', 'step', '--impl', impl, '--size', size, '--batch', str(args.batch),
               '--seq', str(args.seq), '--gate', gate, '--warmup', str(args.warmup),
               '--dtype', args.dtype]
  if cached:
    arguments.append('--cached-clean-pass')
  if args.steps is not None:
    arguments += ['--steps', str(args.steps)]
  if impl == 'torch' and args.torch_threads is not None:
    arguments += ['--threads', str(args.torch_threads)]
  return arguments


def attribution_arguments(size: str, args: argparse.Namespace) -> list[str]:
  arguments = ['bench', 'attribution', '--size', size, '--batch', str(args.batch),
               '--seq', str(args.seq), '--ig-steps', str(args.ig_steps), '--dtype', args.dtype]
  arguments += ['--ig-batch', str(min(args.ig_batch, args.batch))]
  return arguments


def step_table(pairs: list[tuple[dict, dict]]) -> str:
  """One row per (size, gate): examples/s of each implementation, ratio, peak memory.

  A dmx result with a cached clean pass is labelled ``(cached)`` in the gate column.
  """
  header = (f'{"size":<7}{"gate":<17}{"jax ex/s":>11}{"torch ex/s":>12}{"jax/torch":>11}'
            f'{"jax MB":>10}{"torch MB":>10}{"jax +MB":>10}{"torch +MB":>11}')
  rows = [header, '-' * len(header)]
  increase = lambda result: result.get('peak_memory_increase_mb', float('nan'))
  for jax_result, torch_result in pairs:
    ratio = jax_result['examples_per_s'] / torch_result['examples_per_s']
    gate = jax_result['gate'] + (' (cached)' if jax_result.get('clean_pass') == 'cached' else '')
    rows.append(f'{jax_result["size"]:<7}{gate:<17}'
                f'{jax_result["examples_per_s"]:>11.2f}{torch_result["examples_per_s"]:>12.2f}'
                f'{ratio:>10.2f}x{jax_result["peak_memory_mb"]:>10.0f}'
                f'{torch_result["peak_memory_mb"]:>10.0f}{increase(jax_result):>10.0f}'
                f'{increase(torch_result):>11.0f}')
  return '\n'.join(rows)


def attribution_table(results: list[dict]) -> str:
  """One row per size: DiffMask and integrated-gradients examples/s, and their ratio."""
  header = f'{"size":<7}{"diffmask ex/s":>15}{"IG ex/s":>11}{"IG steps":>10}{"ratio":>10}'
  rows = [header, '-' * len(header)]
  for result in results:
    rows.append(f'{result["size"]:<7}{result["diffmask_examples_per_s"]:>15.2f}'
                f'{result["ig_examples_per_s"]:>11.3f}{result["ig_steps"]:>10}'
                f'{result["ratio"]:>9.1f}x')
  return '\n'.join(rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', nargs='+', choices=SIZES, default=['tiny', 'minilm', 'base'])
  parser.add_argument('--gates', nargs='+', choices=GATES, default=list(GATES))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per run (default: one per depth, L + 2)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per run')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--ig-steps', type=int, default=50)
  parser.add_argument('--ig-batch', type=int, default=8,
                      help='examples per integrated-gradients call (8: with 10 path points '
                      'vectorised, 80 sequences per pass, a short and memory-safe BERT-base run '
                      'on CPU; examples/s is per example either way)')
  parser.add_argument('--torch-threads', type=int, default=None,
                      help='torch.set_num_threads (default: all cores)')
  parser.add_argument('--no-attribution', action='store_true',
                      help='skip the DiffMask-vs-integrated-gradients measurement')
  parser.add_argument('--cached-clean-pass', action='store_true',
                      help='also time dmx\'s step on a batch that carries its clean pass '
                      '(computed once), paired with the same PyTorch run')
  parser.add_argument('--out', default='runs/bench_step.jsonl',
                      help='JSON lines are appended here')
  args = parser.parse_args(argv)

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results, pairs, attributions = [], [], []
  for size in args.sizes:
    for gate in args.gates:
      pair = tuple(run_one(step_arguments(impl, size, gate, args)) for impl in ('jax', 'torch'))
      pairs.append(pair)
      results.extend(pair)
      if args.cached_clean_pass:
        cached = run_one(step_arguments('jax', size, gate, args, cached=True))
        pairs.append((cached, pair[1]))
        results.append(cached)
    if not args.no_attribution:
      attributions.append(run_one(attribution_arguments(size, args)))
      results.append(attributions[-1])
  with out.open('a') as stream:
    for result in results:
      stream.write(json.dumps(result) + '\n')

  device = results[0]['device'] if results else 'nothing run'
  print(f'DiffMask training step, batch {args.batch}, seq {args.seq}, {args.dtype}, {device}')
  print(step_table(pairs))
  if attributions:
    print(f'\nAttribution throughput (jax), integrated gradients with {args.ig_steps} steps')
    print(attribution_table(attributions))
  print(f'\nwrote {len(results)} JSON lines to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
