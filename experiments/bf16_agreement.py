"""How much does running the frozen model in bfloat16 change DiffMask? (issue 4, item 4)

Loads a fine-tuned SST-5 classifier twice, in float32 and in bfloat16 (probes,
gates, KL and multipliers stay float32 either way), and a probe trained by
``dmx diffmask sst``; on SST dev it measures

* clean pass: agreement of the predicted classes, max |logit difference|,
  mean KL(float32 || bfloat16);
* the probe's attributions: max and mean |keep-probability difference| and
  the agreement of the deterministic gates (open / closed) per token and depth,
  the probe reading the states each model computes;
* masked passes: agreement of the masked predictions at every depth.

    python experiments/bf16_agreement.py --probe runs/sst_hidden --out runs/bf16_agreement.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dmx import attribute, objective, train
from dmx.data import sst as sst_data
from dmx.data.common import padded_batches
from dmx.models.hf_import import load_pretrained
from dmx.pipelines import explain


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--probe', required=True, help='a dmx diffmask sst output folder or probe')
  parser.add_argument('--model', default=None, help='override the model folder the probe names')
  parser.add_argument('--data', default=None, help='folder holding sst/ (default ../shared/data)')
  parser.add_argument('--split', default='dev')
  parser.add_argument('--max-length', type=int, default=66)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--out', default=None, help='write the numbers as JSON here')
  args = parser.parse_args()

  probe, probe_params, metadata, folder = explain.load_probe(args.probe)
  model_path = args.model or metadata['model']
  config = train.DiffMaskConfig(gate=metadata['gate'])
  models = {dtype: load_pretrained(model_path, head='classification', dtype=dtype)
            for dtype in ('float32', 'bfloat16')}
  tokenizer = models['float32'][2]
  features = sst_data.encode_sst(sst_data.load_sst(args.split, args.data), tokenizer,
                                 args.max_length)

  def evaluate(model, frozen, params, batch):
    outputs, states = model.forward(frozen, batch)
    keep_prob, gates = attribute.keep_probs_and_gates(probe, params, config, states,
                                                      batch['mask'])
    baselines = probe.apply(params, method='baseline_vectors')
    masked = jax.lax.map(
        lambda depth: train.masked_pass(model, frozen, batch, states, config.gate, gates[depth],
                                        baselines, depth),
        jnp.arange(len(states)))
    return dict(outputs=outputs.astype(jnp.float32), keep_prob=keep_prob, gates=gates,
                masked=masked.astype(jnp.float32))

  results = {}
  for dtype, (model, frozen, _) in models.items():
    compiled = jax.jit(lambda frozen, params, batch, model=model: evaluate(model, frozen, params,
                                                                          batch))
    started = time.perf_counter()
    parts = []
    for batch, count in padded_batches(features, args.batch_size):
      out = jax.device_get(compiled(frozen, probe_params, batch))
      parts.append({name: (value[:, :count] if value.ndim >= 3 and name != 'outputs'
                           else value[:count]) for name, value in out.items()})
    results[dtype] = {name: np.concatenate([part[name] for part in parts],
                                           axis=0 if name == 'outputs' else 1)
                      for name in parts[0]}
    results[dtype]['seconds'] = time.perf_counter() - started

  full, half = results['float32'], results['bfloat16']
  real = features.mask.astype(bool)
  kl = objective.kl_divergence(jnp.asarray(full['outputs']), jnp.asarray(half['outputs']))
  open_full, open_half = full['gates'] > 0, half['gates'] > 0
  report = dict(
      probe=str(folder), model=str(model_path), split=args.split, num_sentences=len(features),
      gate=config.gate,
      clean_prediction_agreement=float(np.mean(full['outputs'].argmax(-1) ==
                                               half['outputs'].argmax(-1))),
      clean_max_abs_logit_difference=float(np.abs(full['outputs'] - half['outputs']).max()),
      clean_mean_kl_float32_to_bfloat16=float(np.mean(kl)),
      keep_prob_max_abs_difference=float(np.abs(full['keep_prob'] - half['keep_prob'])[:, real].max()),
      keep_prob_mean_abs_difference=float(np.abs(full['keep_prob'] - half['keep_prob'])[:, real].mean()),
      gate_open_agreement=float(np.mean(open_full[:, real] == open_half[:, real])),
      masked_prediction_agreement_per_depth=[
          float(np.mean(full['masked'][depth].argmax(-1) == half['masked'][depth].argmax(-1)))
          for depth in range(full['masked'].shape[0])],
      seconds=dict(float32=full['seconds'], bfloat16=half['seconds']),
      device=str(jax.devices()[0]))
  print(json.dumps(report, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
  main()
