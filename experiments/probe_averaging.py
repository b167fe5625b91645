"""What averaging the probe's iterates changes: the last iterate against the average, per run.

``dmx diffmask sst ... --probe-average-decay D`` reports the averaged probe's
headline numbers and, under ``last_iterate``, the same run's last iterate
scored the same way. This script tabulates both for every RUN and draws
them in the (masked fraction, agreement) plane with an arrow from the last
iterate to the average, and the issue's target region shaded.

    python experiments/probe_averaging.py RUN [RUN ...] [--figure PATH]
        [--target-masked 0.4] [--target-agreement 0.9] [--label-by seed|folder]
        [--per-depth]

Each RUN is a ``dmx diffmask sst`` output folder whose report has
``last_iterate`` (a run with averaging).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from dmx.pipelines import diffmask_text  # pylint: disable=wrong-import-position


def load(run: Path) -> dict:
  """The run's report; exits with one line when it has no averaged probe."""
  path = run / 'report.json'
  if not path.is_file():
    sys.exit(f'{run}: no report.json (not a finished dmx diffmask run)')
  report = json.loads(path.read_text())
  if 'last_iterate' not in report:
    sys.exit(f'{run}: the report has no last_iterate (the run did not average its probe)')
  return report


def print_per_depth(reports) -> None:
  """One markdown table: masked, agreement and final multiplier of every run at every depth.

  All three come from the report's ``per_layer``; its multiplier is the train
  state's at the end of training.
  """
  num_states = len(reports[0][1]['per_layer'])
  names = diffmask_text.state_names(num_states)
  print(f"\n| depth | {' | '.join(names)} |")
  print('| --- |' + ' --- |' * num_states)
  for run, report in reports:
    per_layer = report['per_layer']
    print(f'| {run.name}: masked | '
          + ' | '.join(f"{depth['masked_fraction']:.1%}" for depth in per_layer) + ' |')
    print(f'| {run.name}: agreement | '
          + ' | '.join(f"{depth['agreement']:.3f}" for depth in per_layer) + ' |')
    print(f'| {run.name}: multiplier | '
          + ' | '.join(f"{depth['multiplier']:.1f}" for depth in per_layer) + ' |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', type=Path)
  parser.add_argument('--figure', type=Path, default=None, help='write the plot here (PNG)')
  parser.add_argument('--target-masked', type=float, default=0.4)
  parser.add_argument('--target-agreement', type=float, default=0.9)
  parser.add_argument('--label-by', choices=('seed', 'folder'), default='seed',
                      help="label each point with its gate and seed, or with the run's folder "
                           'name (for runs of one gate and seed that differ in an option)')
  parser.add_argument('--title', default='SST-5 dev, fine-tuned MiniLM: last iterate → '
                                         'iterate average')
  parser.add_argument('--per-depth', action='store_true',
                      help="also print each run's saved probe per depth: masked fraction and "
                           'agreement (dev), and the multiplier at the end of training')
  args = parser.parse_args()
  reports = [(run, load(run)) for run in args.runs]

  print('| run | gate | seed | decay | last iterate: masked / agreement / macro-F1 '
        '| average: masked / agreement / macro-F1 |')
  print('| --- | --- | --- | --- | --- | --- |')
  for run, report in reports:
    last = report['last_iterate']
    print(f"| {run.name} | {report['gate']} | {report['config']['seed']} "
          f"| {report['diffmask_config']['probe_average_decay']} "
          f"| {last['masked_fraction']:.1%} / {last['agreement']:.3f} / "
          f"{last['macro_f1_masked']:.3f} "
          f"| {report['masked_fraction']:.1%} / {report['agreement']:.3f} / "
          f"{report['macro_f1_masked']:.3f} |")
  if args.per_depth:
    print_per_depth(reports)

  if args.figure is None:
    return
  figure, axes = plt.subplots(figsize=(6, 4.5))
  for run, report in reports:
    last = report['last_iterate']
    start = (last['masked_fraction'], last['agreement'])
    end = (report['masked_fraction'], report['agreement'])
    axes.annotate('', xy=end, xytext=start,
                  arrowprops=dict(arrowstyle='->', color='tab:blue', lw=1.5))
    axes.plot(*start, 'o', color='tab:gray')
    axes.plot(*end, 'o', color='tab:blue')
    label = (run.name if args.label_by == 'folder'
             else f"{report['gate']} s{report['config']['seed']}")
    axes.annotate(label, end,
                  textcoords='offset points', xytext=(5, 4), fontsize=8)
  points = [value for _, report in reports
            for value in ((report['masked_fraction'], report['agreement']),
                          (report['last_iterate']['masked_fraction'],
                           report['last_iterate']['agreement']))]
  low_x = min(min(x for x, _ in points), args.target_masked) - 0.02
  high_x = max(max(x for x, _ in points), args.target_masked) + 0.02
  low_y = min(min(y for _, y in points), args.target_agreement) - 0.01
  high_y = max(max(y for _, y in points), args.target_agreement) + 0.01
  axes.fill_between([args.target_masked, high_x], args.target_agreement, high_y,
                    color='tab:green', alpha=0.12,
                    label=f'target: masked >= {args.target_masked:.0%}, agreement >= '
                          f'{args.target_agreement}')
  axes.set_xlim(low_x, high_x)
  axes.set_ylim(low_y, high_y)
  axes.plot([], [], 'o', color='tab:gray', label='last iterate')
  axes.plot([], [], 'o', color='tab:blue', label='average of the iterates')
  axes.set_xlabel('masked fraction (dev)')
  axes.set_ylabel('agreement with the unmasked prediction (dev)')
  axes.set_title(args.title, fontsize=10)
  axes.legend(fontsize=8, loc='lower left')
  figure.tight_layout()
  args.figure.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(args.figure, dpi=120)
  print(f'wrote {args.figure}')


if __name__ == '__main__':
  main()
