"""Smoke tests of the benchmark scripts on the tiny config: they run and print their figures.

The figures themselves are measurements, never checked here; what is checked
is that the scripts run end to end, that the step-parts arithmetic is the one
printed, and that bench_layer's ways of running the stack agree (it exits
otherwise).
"""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def _run(script: str, *arguments: str) -> str:
  done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments],
                        capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def test_bench_parts_prints_the_step_and_its_passes():
  out = _run('bench_parts.py', '--impl', 'jax', '--size', 'tiny', '--batch', '2', '--seq', '8',
             '--rounds', '1', '--repeats', '1')
  figures = {name: float(re.search(rf'{name}\s+(-?[0-9.]+) s', out).group(1))
             for name in ('clean pass', 'masked pass \\+ backward', 'whole step',
                          'step - clean - masked')}
  assert abs(figures['whole step'] - figures['clean pass'] - figures['masked pass \\+ backward']
             - figures['step - clean - masked']) < 2e-3


def test_bench_layer_stack_runs_every_way():
  out = _run('bench_layer.py', '--size', 'tiny', '--batch', '2', '--seq', '8', '--stack',
             '--repeats', '1')
  for name in ('forward_from, static depth', 'forward_from, traced depth', 'plain scan',
               'layers rematerialised'):
    assert name in out, out


def test_bench_matmul_prints_every_row():
  out = _run('bench_matmul.py', '--shapes', '8x4x6', '--repeats', '1', '--rounds', '1',
             '--xla-flags=--xla_cpu_use_onednn=true')
  for row in ('torch.matmul', 'torch oneDNN Linear', 'XLA (default flags)',
              'XLA --xla_cpu_use_onednn=true'):
    assert row in out, out
  assert len(re.findall(r'GF/s', out)) == 4, out
