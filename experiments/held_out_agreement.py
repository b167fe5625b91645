"""How much higher is a probe's agreement on SST training sentences than on dev?

``dmx diffmask sst --validation-sentences N --select-agreement A`` picks its
probe by agreement on training sentences held out of the probe's training.
The classifier was fine-tuned on those sentences and is surer of them than of
dev, so the same probe agrees more there. This script measures by how much,
on finished runs: it scores each run's probe on the ``N`` training sentences
that ``--validation-sentences N`` would hold out (the same draw) exactly as
the run scored dev (deterministic gates, headline depth), and prints both.

    python experiments/held_out_agreement.py RUN [RUN ...] [--sentences 500]

Each RUN is a ``dmx diffmask sst`` output folder (``report.json`` and
``probe_<gate>/``). For a run trained on all of train the probe has seen
these sentences; for a run with held-out sentences, it has not.
"""

import argparse
import json
from pathlib import Path

from dmx.pipelines import diffmask_text
from dmx.pipelines.explain import load_probe


def run_config(run: Path) -> diffmask_text.TextDiffMaskConfig:
  """The run's :class:`TextDiffMaskConfig`, rebuilt from its report."""
  recorded = json.loads((run / diffmask_text.REPORT_FILE).read_text())['config']
  fields = diffmask_text.TextDiffMaskConfig.__dataclass_fields__
  return diffmask_text.TextDiffMaskConfig(**{name: value for name, value in recorded.items()
                                             if name in fields})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', type=Path)
  parser.add_argument('--sentences', type=int, default=500,
                      help='training sentences to score on (the --validation-sentences draw)')
  args = parser.parse_args()
  print('| run | training sentences: masked | agreement | dev: masked | agreement |')
  print('| --- | --- | --- | --- | --- |')
  for run in args.runs:
    report = json.loads((run / diffmask_text.REPORT_FILE).read_text())
    config = run_config(run)
    model, frozen_params, tokenizer = diffmask_text.load_frozen_model(config, log=lambda _: None)
    train_features, _, _ = diffmask_text.load_task_data(config, tokenizer)
    _, held_out = diffmask_text.hold_out(train_features, args.sentences)
    probe, probe_params, _, _ = load_probe(run)
    score = diffmask_text.make_headline_scorer(config, model, frozen_params, probe,
                                               config.diffmask_config())
    scores = score(probe_params, held_out)
    print(f"| {run} | {scores['masked_fraction']:.3f} | {scores['agreement']:.3f} | "
          f"{report['masked_fraction']:.3f} | {report['agreement']:.3f} |", flush=True)


if __name__ == '__main__':
  main()
