"""Speed of a DiffMask training step: dmx (JAX) against PyTorch written as the original.

What issue 4 (item 5) asks to measure, on random-init BERT classifiers of the
sizes in :data:`SIZES`, one random batch and one machine:

* :func:`time_jax_step`: dmx's jitted :func:`dmx.train.make_train_step`
  (clean pass, probe, gate sample, masked pass resumed at the injection
  point, both saddle-point updates, in one XLA program);
* :func:`time_torch_step`: the same step as the original PyTorch code computes
  it (:class:`TorchDiffMaskStep`): transformers' ``BertForSequenceClassification``,
  a no-grad clean pass, forward hooks that substitute the gated state, and the
  whole model re-run for the masked pass;
* :func:`time_attribution`: examples/s of amortised DiffMask attribution (one
  clean pass and one probe evaluation give keep probabilities at every depth)
  against 50-step integrated gradients on the same dmx model.

Each returns a flat dict that ``dmx bench`` prints as one JSON line, so runs
made elsewhere can be paired with these. ``benchmarks/bench_step.py`` runs the
two implementations side by side, each in its own process.

Averaging over depths. Both steps follow one depth schedule: timed step ``t``
uses depth ``t mod (L + 2)`` (or one fixed depth), so a run of a multiple of
``L + 2`` steps weights every depth equally, which is what uniform sampling
does in expectation, without its noise. Both are told the depth directly:
dmx's step through its traced ``layer_index`` argument (one compiled program
for every depth), PyTorch as the original's ``layer_pred`` argument.

Where the PyTorch step departs from the original, every change makes it no
slower: one sample of depth and gates serves the probe and the multiplier
updates (the original, through PyTorch Lightning's two optimisers, runs the
whole training step twice per iteration); no weight normalisation in the
votes; one baseline vector per state instead of one per position; attention
is transformers' default implementation (SDPA). Like the original it
computes only the votes it needs (depths ``0..l`` for input gates, ``l`` for
hidden gates), where dmx's probe evaluates every depth.

Timing excludes compilation and the first ``warmup`` steps and waits for the
device (``block_until_ready`` / ``cuda.synchronize``). Peak memory is the
process's peak resident set (``ru_maxrss``: runtime, model, optimiser and
activations) on CPU, and the device's peak allocation on GPU; run one
measurement per process (as the benchmark script does) to keep them apart.
On CPU the results also carry ``peak_memory_increase_mb``, the peak above the
resident set before the model is built: the PyTorch process imports JAX too
(dmx's configs live next to its models), about 150 MB that the process peak
charges to PyTorch and the increase does not.

Measure on a quiet machine: on CPU cores that other processes keep busy,
PyTorch's OpenMP threads wait on one another and a small model's step can
slow down tens of times (``threads=1`` shows whether that is happening).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dmx.models.bert import BertConfig, BertModel
from dmx.probes import DiffMaskProbe
from dmx.train import (DiffMaskConfig, init_probe_params, init_state,
                       make_train_step, masked_pass)

SIZES = ('tiny', 'minilm', 'base')
IMPLS = ('jax', 'torch')
GATES = ('input', 'hidden')
DTYPES = ('float32', 'bfloat16')
NUM_LABELS = 5
SEED = 0
# the original probe's hidden width: the model's hidden size over 4
PROBE_WIDTH_DIVISOR = 4


class MissingTorchError(ImportError):
  """``--impl torch`` without PyTorch installed."""


def _torch():
  """The ``torch`` module, imported on first use (it is a test extra, not a dependency)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise MissingTorchError("the PyTorch step needs torch and transformers' PyTorch BERT: "
                            "pip install 'dmx[torch]'") from error
  return torch


# ---------------------------------------------------------------------------
# Shared set-up


def bert_config(size: str, dtype: str = 'float32') -> BertConfig:
  """The random-init classifier (5 labels) of ``size``: ``'tiny'``, ``'minilm'`` or ``'base'``.

  ``'tiny'`` is :meth:`BertConfig.tiny` with 512 positions, so it takes the
  same sequence lengths as the others.
  """
  common = dict(head='classification', num_labels=NUM_LABELS, dtype=dtype)
  if size == 'tiny':
    return BertConfig.tiny(max_position_embeddings=512, **common)
  if size == 'minilm':
    return BertConfig.minilm(**common)
  if size == 'base':
    return BertConfig.base(**common)
  raise ValueError(f'size must be one of {SIZES}, got {size!r}')


def check_arguments(size: str, batch: int, seq: int, gate: str, steps: int | None, warmup: int,
                    dtype: str, layer_index: int | None) -> BertConfig:
  """Validates one measurement's arguments; returns the model config. Raises ``ValueError``."""
  if gate not in GATES:
    raise ValueError(f'gate must be one of {GATES}, got {gate!r}')
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  config = bert_config(size, dtype)
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  if not 1 <= seq <= config.max_sequence_length:
    raise ValueError(f'seq must be in [1, {config.max_sequence_length}] for size {size}, got {seq}')
  if steps is not None and steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  if warmup < 0:
    raise ValueError(f'warmup must be >= 0, got {warmup}')
  if layer_index is not None and not 0 <= layer_index < config.num_states:
    raise ValueError(f'layer must be in [0, {config.num_states}) for size {size} '
                     f'({config.num_states} states), got {layer_index}')
  return config


def random_batch(config: BertConfig, batch: int, seq: int, seed: int = SEED
                 ) -> dict[str, np.ndarray]:
  """``{'input_ids' (batch, seq) int32, 'mask' (batch, seq) bool}``: random tokens, no padding.

  Ids avoid the padding id; token types are left to the models' default (zeros).
  """
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1, config.vocab_size, size=(batch, seq), dtype=np.int32)
  input_ids[input_ids == config.pad_token_id] = 1
  return {'input_ids': input_ids, 'mask': np.ones((batch, seq), bool)}


def depth_schedule(num_states: int, steps: int, layer_index: int | None = None) -> list[int]:
  """Depth of each of ``steps`` steps: ``t mod num_states``, or ``layer_index`` every time."""
  if layer_index is not None:
    return [layer_index] * steps
  return [step % num_states for step in range(steps)]


def _resident_mb() -> float:
  """Current resident set size of this process in MB (Linux ``/proc``; else the peak)."""
  try:
    with open('/proc/self/statm') as statm:
      return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError, IndexError):
    return _peak_resident_mb()


def _peak_resident_mb() -> float:
  """Peak resident set size of this process in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10


def _cpu_count() -> int:
  """Cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_description(cpuinfo: str = '/proc/cpuinfo') -> str:
  """``'cpu (2 cores, AMD EPYC, family 26 model 2, x86_64)'``: what a CPU figure was measured on.

  The vendor and family matter: the ratio of two libraries' matrix products
  depends on them (MKL, PyTorch's BLAS, runs far below its peak on some AMD
  CPUs; see docs/BENCHMARKS.md). Linux names them in ``/proc/cpuinfo``;
  elsewhere only the architecture is given.
  """
  fields = {}
  try:
    with open(cpuinfo, encoding='utf-8') as stream:
      for line in stream:
        if not line.strip():
          break  # the first processor's block is enough
        name, _, value = line.partition(':')
        fields.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  parts = [f'{_cpu_count()} cores']
  if fields.get('model name'):
    parts.append(fields['model name'])
  if fields.get('cpu family') and fields.get('model'):
    parts.append(f'family {fields["cpu family"]} model {fields["model"]}')
  parts.append(platform.machine())
  return f'cpu ({", ".join(parts)})'


def _jax_device_and_peak() -> tuple[str, float | None]:
  """``(device description, device peak MB or None)`` of JAX's first device."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_description(), None
  stats = device.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return f'{device.platform}: {device.device_kind}', (peak / 2**20 if peak is not None else None)


def _memory_fields(device_peak_mb: float | None, resident_before_mb: float) -> dict[str, Any]:
  """The peak-memory fields of a result: device peak when known, else the process peak RSS."""
  if device_peak_mb is not None:
    return dict(peak_memory_mb=round(device_peak_mb, 1), peak_memory_kind='device_peak_allocated',
                process_peak_rss_mb=round(_peak_resident_mb(), 1))
  peak = _peak_resident_mb()
  return dict(peak_memory_mb=round(peak, 1), peak_memory_kind='process_peak_rss',
              rss_before_model_mb=round(resident_before_mb, 1),
              peak_memory_increase_mb=round(peak - resident_before_mb, 1))


def _throughput_fields(batch: int, steps: int, seconds: float) -> dict[str, float]:
  """``examples_per_s = batch * steps / seconds`` and ``step_seconds``."""
  return dict(examples_per_s=batch * steps / seconds, step_seconds=seconds / steps)


# ---------------------------------------------------------------------------
# dmx


def time_jax_step(size: str, batch: int, seq: int, gate: str, steps: int | None = None,
                  warmup: int = 2, dtype: str = 'float32', layer_index: int | None = None,
                  cached_clean_pass: bool = False) -> dict[str, Any]:
  """Times dmx's jitted DiffMask train step on a random-init BERT of ``size``.

  Args:
    size: ``'tiny'``, ``'minilm'`` or ``'base'`` (:func:`bert_config`).
    batch, seq: the random batch is ``(batch, seq)`` tokens, no padding.
    gate: ``'input'`` or ``'hidden'``.
    steps: timed steps; ``None`` is one per depth (``L + 2``).
    warmup: untimed steps after compilation.
    dtype: the model's compute dtype.
    layer_index: time this depth only; ``None`` cycles through all depths.
    cached_clean_pass: the batch carries its clean pass, computed once before
      timing (:func:`dmx.train.clean_pass`), as ``dmx diffmask`` trains on a
      fixed dataset whose clean pass fits its cache: the step is then the
      probe, the masked pass and the updates. ``clean_pass_seconds`` reports
      what one clean pass of the batch costs, for amortising it over epochs.

  Returns:
    One flat result (see the module docstring); ``examples_per_s`` is
    ``batch * steps / seconds``.
  """
  config = check_arguments(size, batch, seq, gate, steps, warmup, dtype, layer_index)
  steps = config.num_states if steps is None else steps
  resident_before = _resident_mb()
  model = BertModel(config)
  init_key, probe_key = jax.random.split(jax.random.key(SEED))
  frozen = model.init(init_key, seq)
  data = {name: jnp.asarray(value) for name, value in random_batch(config, batch, seq).items()}
  cache_fields = dict(clean_pass='cached' if cached_clean_pass else 'computed')
  if cached_clean_pass:
    forward = jax.jit(model.forward)
    jax.block_until_ready(forward(frozen, data))  # compiled and warm
    clean_start = time.perf_counter()
    clean_outputs, clean_states = jax.block_until_ready(forward(frozen, data))
    cache_fields['clean_pass_seconds'] = round(time.perf_counter() - clean_start, 3)
    data = dict(data, clean_outputs=clean_outputs, clean_states=clean_states)
  probe = DiffMaskProbe(gate=gate, state_dims=model.state_dims,
                        hidden_size=config.hidden_size // PROBE_WIDTH_DIVISOR)
  diffmask = DiffMaskConfig(gate=gate)
  state = init_state(diffmask, init_probe_params(probe_key, model, probe, frozen, data),
                     config.num_states)
  # the scheduled depth goes in as the step's traced layer_index: one program for all depths
  train_step = make_train_step(model, probe, diffmask)
  step_fn = jax.jit(lambda state, frozen, batch, key, depth: train_step(
      state, frozen, batch, key, layer_index=depth), donate_argnums=0)
  warmup_depths = depth_schedule(config.num_states, warmup, layer_index)
  timed_depths = depth_schedule(config.num_states, steps, layer_index)
  keys = jax.random.split(jax.random.key(SEED), warmup + steps)
  depths = [jnp.int32(depth) for depth in warmup_depths + timed_depths]

  compile_start = time.perf_counter()
  step_fn = step_fn.lower(state, frozen, data, keys[0], depths[0]).compile()
  compile_seconds = time.perf_counter() - compile_start
  for key, depth in zip(keys[:warmup], depths[:warmup]):
    state, _ = step_fn(state, frozen, data, key, depth)
  jax.block_until_ready(state)
  history = []
  start = time.perf_counter()
  for key, depth in zip(keys[warmup:], depths[warmup:]):
    state, metrics = step_fn(state, frozen, data, key, depth)
    history.append(metrics)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start

  history = jax.device_get(history)
  device, device_peak = _jax_device_and_peak()
  return dict(
      impl='jax', size=size, batch=batch, seq=seq, gate=gate, dtype=dtype, steps=steps,
      warmup=warmup, depths='all' if layer_index is None else layer_index, **cache_fields,
      **_throughput_fields(batch, steps, seconds), **_memory_fields(device_peak, resident_before),
      compile_seconds=round(compile_seconds, 2),
      mean_loss=float(np.mean([metrics['loss'] for metrics in history])),
      device=device, jax_version=jax.__version__, flax_version=flax.__version__)


FORWARD_PARTS = ('clean', 'masked', 'masked_grad')


def time_forward(impl: str, size: str, batch: int, seq: int, repeats: int = 3,
                 part: str = 'clean') -> dict[str, Any]:
  """Seconds of one ingredient of the step alone, dmx or transformers, on one random batch.

  ``part``:

  * ``'clean'``: the frozen model's clean pass with every hidden state: dmx's
    jitted ``BertModel.forward`` against ``BertForSequenceClassification(
    output_hidden_states=True)`` under ``torch.no_grad()``;
  * ``'masked'``: the input-gate masked pass, word embeddings ``h0`` mixed with a
    zero baseline by gates ``(batch, seq)`` and the whole model re-run (dmx:
    ``forward_from`` at depth 0, as the step calls it; transformers:
    ``inputs_embeds``);
  * ``'masked_grad'``: the same pass and the gradient of a scalar of its logits
    with respect to the gates: the encoder's backward pass, activations only
    (the frozen weights get no gradient in either).

  Compilation and one warm-up call are excluded; ``seconds`` is the mean of
  ``repeats`` calls. Returns ``{'impl', 'size', 'batch', 'seq', 'part',
  'seconds', 'device', 'xla_flags'}``.
  """
  config = check_arguments(size, batch, seq, 'hidden', None, 0, 'float32', None)
  if repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {repeats}')
  if part not in FORWARD_PARTS:
    raise ValueError(f'part must be one of {FORWARD_PARTS}, got {part!r}')
  data = random_batch(config, batch, seq)
  if impl == 'jax':
    call = _jax_forward_part(config, data, seq, part)
    device = _jax_device_and_peak()[0]
  elif impl == 'torch':
    call = _torch_forward_part(config, data, part)
    device = cpu_description()
  else:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
  call()
  start = time.perf_counter()
  for _ in range(repeats):
    call()
  seconds = (time.perf_counter() - start) / repeats
  return dict(impl=impl, size=size, batch=batch, seq=seq, part=part, seconds=round(seconds, 4),
              device=device, xla_flags=os.environ.get('XLA_FLAGS', ''))


# the gate value of the masked parts: any value strictly between 0 and 1 keeps both paths live
_PART_GATE = 0.7


def _jax_forward_part(config: BertConfig, data: dict, seq: int, part: str):
  model = BertModel(config)
  frozen = model.init(jax.random.key(SEED), seq)
  if part == 'clean':
    forward = jax.jit(model.forward)
    return lambda: jax.block_until_ready(forward(frozen, data))
  _, states = jax.jit(model.forward)(frozen, data)
  baselines = (jnp.zeros((config.hidden_size,), jnp.float32),)

  def masked_logits(gates):
    # the input-gate masked pass exactly as the train step runs it
    return masked_pass(model, frozen, data, states, 'input', gates, baselines, 0)

  gates = jnp.full(data['mask'].shape, _PART_GATE, jnp.float32)
  if part == 'masked':
    function = jax.jit(masked_logits)
  else:
    function = jax.jit(jax.value_and_grad(
        lambda gates: jax.nn.log_softmax(masked_logits(gates)).sum()))
  return lambda: jax.block_until_ready(function(gates))


def _torch_forward_part(config: BertConfig, data: dict, part: str):
  torch = _torch()
  torch.set_num_threads(_cpu_count())
  model = build_torch_classifier(config)
  input_ids = torch.as_tensor(data['input_ids'], dtype=torch.long)
  mask = torch.as_tensor(data['mask'], dtype=torch.long)
  if part == 'clean':
    def call():
      with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return call
  with torch.no_grad():
    word_embedded = model.bert.embeddings.word_embeddings(input_ids)

  def call():
    gates = torch.full(tuple(input_ids.shape) + (1,), _PART_GATE,
                       requires_grad=part == 'masked_grad')
    with torch.set_grad_enabled(part == 'masked_grad'):
      logits = model(inputs_embeds=gates * word_embedded, attention_mask=mask).logits
      if part == 'masked_grad':
        torch.log_softmax(logits, dim=-1).sum().backward()
    return logits
  return call


# ---------------------------------------------------------------------------
# PyTorch, the original's way


def build_torch_classifier(config: BertConfig, state_dict: dict[str, np.ndarray] | None = None):
  """transformers' ``BertForSequenceClassification`` for ``config``, frozen, in eval mode.

  Random-init (transformers' own initialiser, seeded by the caller's
  ``torch.manual_seed``) unless ``state_dict`` (e.g.
  :func:`dmx.models.hf_import.to_state_dict` of dmx parameters) gives the weights.
  """
  torch = _torch()
  import transformers  # pylint: disable=import-outside-toplevel
  from dmx.models.hf_import import hf_config_from_bert  # pylint: disable=import-outside-toplevel

  hf_config = transformers.BertConfig.from_dict(hf_config_from_bert(config))
  model = transformers.BertForSequenceClassification(hf_config)
  if state_dict is not None:
    tensors = {name: torch.from_numpy(np.array(value, np.float32))
               for name, value in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # buffers such as position_ids are not weights; anything else must match exactly
    missing = [name for name in missing if not name.endswith('_ids')]
    if missing or unexpected:
      raise ValueError(f'state dict does not fit: missing {missing}, unexpected {unexpected}')
  if config.dtype == 'bfloat16':
    model = model.to(torch.bfloat16)
  model.eval()
  model.requires_grad_(False)
  return model


class _Lookahead:
  """Lookahead (Zhang et al., 2019) over parameters a torch optimiser updates.

  Every ``sync_period`` steps the slow weights move ``slow_step_size`` of the
  way to the fast ones and the fast ones restart from there, as
  ``optax.lookahead`` does for dmx.
  """

  def __init__(self, parameters, sync_period: int, slow_step_size: float):
    self.parameters = list(parameters)
    self.slow = [parameter.detach().clone() for parameter in self.parameters]
    self.sync_period = sync_period
    self.slow_step_size = slow_step_size
    self.count = 0

  def step(self) -> None:
    self.count += 1
    if self.count % self.sync_period:
      return
    torch = _torch()
    with torch.no_grad():
      for fast, slow in zip(self.parameters, self.slow):
        slow.add_(fast - slow, alpha=self.slow_step_size)
        fast.copy_(slow)


class TorchDiffMaskStep:
  """One DiffMask training step on a frozen transformers BERT, as the original code does it.

  * clean pass under ``no_grad`` with ``output_hidden_states``; ``h0`` (the
    word-embedding lookup) is recorded by a forward hook on the word embeddings;
  * votes ``10 * tanh(MLP(features)) + 5`` per state (the original's
    ``MLPMaxGate``; features ``[h0; h_k]`` for input gates, ``h_k`` for hidden
    gates, ``h0`` alone at depth 0 as in dmx), Hard Concrete samples, input gate
    the product of the votes up to depth ``l``;
  * masked pass: the whole model re-run with the gated state substituted by a
    hook: the word-embedding output for ``h0``, the input of encoder layer
    ``l - 1`` for ``1 <= l <= L`` (a forward pre-hook), the output of the last
    layer for ``l = L + 1``, as the original's ``bert_setter``;
  * loss ``mean(lambda_l * (KL(y || y_hat) - margin) + mean_tokens log P(z != 0))``;
  * one backward; Lookahead over centered RMSprop (probe 3e-4, baselines
    1e-3, linear warm-up) down, Lookahead over RMSprop (0.3) up for the
    multipliers, clamped to ``[0, multiplier_max]``.

  Args:
    config: the dmx config the model was built from (sizes, dtype).
    diffmask: DiffMask hyperparameters (gate, margin, Hard Concrete, optimisers).
    model: a frozen ``BertForSequenceClassification`` (:func:`build_torch_classifier`).
    device: where the probe lives (the model's device).
    probe_hidden_size: width of the votes' hidden layer; hidden size / 4 by default.
    initial_logit: the votes' initial bias.
  """

  def __init__(self, config: BertConfig, diffmask: DiffMaskConfig, model, *, device='cpu',
               probe_hidden_size: int | None = None, initial_logit: float = 5.0):
    torch = _torch()
    self.config = config
    self.diffmask = diffmask
    self.model = model
    self.device = torch.device(device)
    self.compute_dtype = next(model.parameters()).dtype
    self.num_states = config.num_states
    self.logit_scale = 10.0  # the original MLPMaxGate's max_activation, dmx's MlpVote.logit_scale
    hidden = config.hidden_size
    probe_hidden_size = probe_hidden_size or hidden // PROBE_WIDTH_DIVISOR
    input_widths = [hidden if diffmask.gate == 'hidden' or depth == 0 else 2 * hidden
                    for depth in range(self.num_states)]
    self.votes = torch.nn.ModuleList([
        torch.nn.Sequential(torch.nn.Linear(width, probe_hidden_size), torch.nn.Tanh(),
                            torch.nn.Linear(probe_hidden_size, 1), torch.nn.Tanh())
        for width in input_widths]).to(self.device)
    self.vote_bias = torch.nn.Parameter(
        torch.full((self.num_states,), initial_logit, device=self.device))
    num_baselines = 1 if diffmask.gate == 'input' else self.num_states
    self.baselines = torch.nn.Parameter(torch.zeros(num_baselines, hidden, device=self.device))
    self.multipliers = torch.nn.Parameter(
        torch.full((self.num_states,), diffmask.multiplier_init, device=self.device))

    probe_parameters = list(self.votes.parameters()) + [self.vote_bias]
    rmsprop = dict(alpha=diffmask.rmsprop_decay, eps=diffmask.rmsprop_eps)
    self.probe_optimizer = torch.optim.RMSprop(
        [{'params': probe_parameters, 'lr': diffmask.probe_learning_rate},
         {'params': [self.baselines], 'lr': diffmask.baseline_learning_rate}],
        centered=True, **rmsprop)
    warmup = diffmask.warmup_steps
    self.probe_schedule = torch.optim.lr_scheduler.LambdaLR(
        self.probe_optimizer, lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0)
    self.multiplier_optimizer = torch.optim.RMSprop(
        [self.multipliers], lr=diffmask.multiplier_learning_rate, maximize=True, **rmsprop)
    lookahead = dict(sync_period=diffmask.lookahead_sync_period,
                     slow_step_size=diffmask.lookahead_slow_step)
    self.probe_lookahead = _Lookahead(probe_parameters + [self.baselines], **lookahead)
    self.multiplier_lookahead = _Lookahead([self.multipliers], **lookahead)

  def load_flax_probe(self, probe_params) -> None:
    """Copies a dmx :class:`DiffMaskProbe` (mlp form) into the votes and baselines."""
    torch = _torch()
    params = probe_params['params']
    as_tensor = lambda value: torch.as_tensor(np.array(value, np.float32), device=self.device)
    with torch.no_grad():
      for depth, vote in enumerate(self.votes):
        flax_vote = params[f'vote_{depth}']
        for torch_linear, name in ((vote[0], 'hidden'), (vote[2], 'out')):
          torch_linear.weight.copy_(as_tensor(flax_vote[name]['kernel']).T)
          torch_linear.bias.copy_(as_tensor(flax_vote[name]['bias']))
        self.vote_bias[depth] = as_tensor(flax_vote['bias'])
      for index in range(self.baselines.shape[0]):
        self.baselines[index] = as_tensor(params[f'baseline_{index}'])
    # Lookahead's slow weights start at the loaded values
    self.probe_lookahead = _Lookahead(self.probe_lookahead.parameters,
                                      self.probe_lookahead.sync_period,
                                      self.probe_lookahead.slow_step_size)

  def clean_pass(self, input_ids, mask):
    """``(logits (batch, labels), [h0, ..., h_{L+1}] each (batch, seq, hidden))``, no grad."""
    torch = _torch()
    recorded = []
    handle = self.model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda module, inputs, output: recorded.append(output))
    try:
      with torch.no_grad():
        outputs = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    finally:
      handle.remove()
    return outputs.logits, [recorded[0]] + list(outputs.hidden_states)

  def _substitute(self, state_index: int, replacement):
    """A hook handle that makes the next forward pass use ``replacement`` as ``h_l``."""
    bert = self.model.bert
    layers = bert.encoder.layer
    if state_index == 0:
      return bert.embeddings.word_embeddings.register_forward_hook(
          lambda module, inputs, output: replacement)
    if state_index <= len(layers):
      def replace_input(module, args, kwargs):
        if args:
          return (replacement,) + tuple(args[1:]), kwargs
        return args, {**kwargs, 'hidden_states': replacement}
      return layers[state_index - 1].register_forward_pre_hook(replace_input, with_kwargs=True)

    def replace_output(module, inputs, output):
      return replacement if isinstance(output, type(replacement)) else (
          (replacement,) + tuple(output[1:]))
    return layers[-1].register_forward_hook(replace_output)

  def masked_pass(self, input_ids, mask, state_index: int, replacement):
    """Logits of the whole model re-run with ``h_l`` replaced; gradients reach ``replacement``."""
    handle = self._substitute(state_index, replacement)
    try:
      return self.model(input_ids=input_ids, attention_mask=mask).logits
    finally:
      handle.remove()

  def _vote(self, depth: int, anchor, state):
    """Vote logits ``(batch, seq)`` of ``depth`` from float32 states."""
    features = state if anchor is state else _torch().cat([anchor, state], dim=-1)
    return self.logit_scale * self.votes[depth](features)[..., 0] + self.vote_bias[depth]

  def loss(self, input_ids, mask, layer_index: int, noise=None):
    """``(loss, aux)`` of one DiffMask step at depth ``layer_index``.

    ``noise``: optional ``(num_states, batch, seq)`` logistic noise (e.g. the
    one dmx's step draws, to compare the two); fresh noise when ``None``.
    """
    torch = _torch()
    diffmask = self.diffmask
    clean_logits, states = self.clean_pass(input_ids, mask)
    states32 = [state.float() for state in states]
    if diffmask.gate == 'input':
      depths = list(range(layer_index + 1))
      vote_logits = torch.stack([self._vote(depth, states32[0], states32[depth])
                                 for depth in depths])
      state_index = 0
    else:
      depths = [layer_index]
      vote_logits = self._vote(layer_index, states32[layer_index], states32[layer_index])[None]
      state_index = layer_index
    if noise is None:
      uniform = torch.rand_like(vote_logits).clamp(1e-6, 1.0 - 1e-6)
      noise = torch.log(uniform) - torch.log1p(-uniform)
    else:
      noise = torch.as_tensor(np.array(noise, np.float32), device=self.device)[depths]
    low, high = diffmask.stretch
    temperature = diffmask.temperature
    concrete = torch.sigmoid((noise + vote_logits) / temperature)
    votes = (concrete * (high - low) + low).clamp(0.0, 1.0)
    log_keep = torch.nn.functional.logsigmoid(
        vote_logits - temperature * np.log(-low / high))
    # input gate: product of the votes up to depth l (log-probabilities add)
    gates, log_keep = votes.prod(dim=0), log_keep.sum(dim=0)
    baseline = self.baselines[0 if diffmask.gate == 'input' else layer_index]
    replacement = (gates[..., None] * states32[state_index]
                   + (1.0 - gates[..., None]) * baseline).to(self.compute_dtype)
    masked_logits = self.masked_pass(input_ids, mask, state_index, replacement)
    divergence = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=clean_logits.float()),
        torch.distributions.Categorical(logits=masked_logits.float()))
    real = mask.float()
    sparsity = (log_keep * real).sum(-1) / real.sum(-1).clamp_min(1.0)
    loss = (self.multipliers[layer_index] * (divergence - diffmask.margin) + sparsity).mean()
    aux = dict(divergence=divergence.mean().detach(), sparsity=sparsity.mean().detach(),
               masked_logits=masked_logits.detach())
    return loss, aux

  def step(self, input_ids, mask, layer_index: int, noise=None) -> dict:
    """One training step at depth ``layer_index``; returns detached ``loss`` and aux tensors."""
    torch = _torch()
    self.probe_optimizer.zero_grad(set_to_none=True)
    self.multiplier_optimizer.zero_grad(set_to_none=True)
    loss, aux = self.loss(input_ids, mask, layer_index, noise)
    loss.backward()
    self.probe_optimizer.step()
    self.probe_schedule.step()
    self.probe_lookahead.step()
    self.multiplier_optimizer.step()
    self.multiplier_lookahead.step()
    with torch.no_grad():
      self.multipliers.clamp_(0.0, self.diffmask.multiplier_max)
      self.multiplier_lookahead.slow[0].clamp_(0.0, self.diffmask.multiplier_max)
    return dict(aux, loss=loss.detach())


def time_torch_step(size: str, batch: int, seq: int, gate: str, steps: int | None = None,
                    warmup: int = 2, dtype: str = 'float32', layer_index: int | None = None,
                    threads: int | None = None) -> dict[str, Any]:
  """Times :class:`TorchDiffMaskStep` on a random-init transformers BERT of ``size``.

  Same arguments, batch and depth schedule as :func:`time_jax_step`;
  ``threads`` sets ``torch.set_num_threads`` (all cores by default). Runs on
  CUDA when torch sees a GPU.
  """
  config = check_arguments(size, batch, seq, gate, steps, warmup, dtype, layer_index)
  torch = _torch()
  import transformers  # pylint: disable=import-outside-toplevel
  steps = config.num_states if steps is None else steps
  threads = threads or _cpu_count()
  torch.set_num_threads(threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  resident_before = _resident_mb()
  torch.manual_seed(SEED)
  model = build_torch_classifier(config).to(device)
  runner = TorchDiffMaskStep(config, DiffMaskConfig(gate=gate), model, device=device)
  data = random_batch(config, batch, seq)
  input_ids = torch.as_tensor(data['input_ids'], dtype=torch.long, device=device)
  mask = torch.as_tensor(data['mask'], dtype=torch.long, device=device)
  synchronize = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  for depth in depth_schedule(config.num_states, warmup, layer_index):
    runner.step(input_ids, mask, depth)
  synchronize()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  losses = []
  start = time.perf_counter()
  for depth in depth_schedule(config.num_states, steps, layer_index):
    losses.append(runner.step(input_ids, mask, depth)['loss'])
  synchronize()
  seconds = time.perf_counter() - start

  if device.type == 'cuda':
    device_name = f'cuda: {torch.cuda.get_device_name(device)}'
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20
  else:
    device_name = cpu_description()
    device_peak = None
  return dict(
      impl='torch', size=size, batch=batch, seq=seq, gate=gate, dtype=dtype, steps=steps,
      warmup=warmup, depths='all' if layer_index is None else layer_index,
      **_throughput_fields(batch, steps, seconds), **_memory_fields(device_peak, resident_before),
      mean_loss=float(torch.stack(losses).mean()), threads=threads,
      attention=getattr(model.config, '_attn_implementation', None),
      device=device_name, torch_version=torch.__version__,
      transformers_version=transformers.__version__)


# ---------------------------------------------------------------------------
# Attribution: amortised DiffMask against integrated gradients


def time_attribution(size: str, batch: int, seq: int, ig_steps: int = 50, *,
                     ig_batch: int | None = None, path_batch_size: int | None = 10,
                     repeats: int = 3, ig_repeats: int = 1, warmup: int = 1,
                     dtype: str = 'float32', gate: str = 'input') -> dict[str, Any]:
  """Examples/s of amortised DiffMask attribution against integrated gradients.

  DiffMask: :func:`dmx.attribute.attribute`, one clean pass and one probe
  evaluation giving keep probabilities at every depth (the probe's weights do
  not change the cost, so a random-init probe stands for a trained one).
  Integrated gradients: :func:`dmx.baselines.integrated_gradients` of the
  predicted logit with respect to ``h0``, zero baseline, ``ig_steps`` path
  points, ``path_batch_size`` of them vectorised at a time. Both are jitted
  and compiled ahead of timing; DiffMask also runs ``warmup`` untimed calls
  (integrated gradients, ``ig_steps`` times slower per call, runs none).

  Args:
    ig_batch: examples per integrated-gradients call (default ``batch``); a
      smaller batch keeps a BERT-base run on CPU short, and examples/s is per
      example either way.
    repeats, ig_repeats: timed calls of each method.
  """
  from dmx.attribute import attribute  # pylint: disable=import-outside-toplevel
  from dmx.baselines import integrated_gradients  # pylint: disable=import-outside-toplevel

  config = check_arguments(size, batch, seq, gate, None, warmup, dtype, None)
  ig_batch = batch if ig_batch is None else ig_batch
  if not 1 <= ig_batch <= batch:
    raise ValueError(f'ig_batch must be in [1, batch={batch}], got {ig_batch}')
  if ig_steps < 1 or repeats < 1 or ig_repeats < 1:
    raise ValueError('ig_steps, repeats and ig_repeats must be >= 1')
  if path_batch_size is not None and path_batch_size < 1:
    raise ValueError(f'path_batch_size must be >= 1, got {path_batch_size}')
  resident_before = _resident_mb()
  model = BertModel(config)
  init_key, probe_key = jax.random.split(jax.random.key(SEED))
  frozen = model.init(init_key, seq)
  data = {name: jnp.asarray(value) for name, value in random_batch(config, batch, seq).items()}
  ig_data = {name: value[:ig_batch] for name, value in data.items()}
  probe = DiffMaskProbe(gate=gate, state_dims=model.state_dims,
                        hidden_size=config.hidden_size // PROBE_WIDTH_DIVISOR)
  probe_params = init_probe_params(probe_key, model, probe, frozen, data)
  diffmask = DiffMaskConfig(gate=gate)

  explain = jax.jit(lambda params, probe_params, batch: attribute(
      model, params, probe, probe_params, diffmask, batch).keep_prob
                    ).lower(frozen, probe_params, data).compile()
  integrate = jax.jit(lambda params, batch: integrated_gradients(
      model, params, batch, steps=ig_steps, path_batch_size=path_batch_size)
                      ).lower(frozen, ig_data).compile()

  for _ in range(warmup):
    jax.block_until_ready(explain(frozen, probe_params, data))
  start = time.perf_counter()
  for _ in range(repeats):
    keep_prob = explain(frozen, probe_params, data)
  jax.block_until_ready(keep_prob)
  diffmask_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(ig_repeats):
    result = integrate(frozen, ig_data)
  jax.block_until_ready(result)
  ig_seconds = time.perf_counter() - start

  diffmask_rate = batch * repeats / diffmask_seconds
  ig_rate = ig_batch * ig_repeats / ig_seconds
  device, device_peak = _jax_device_and_peak()
  return dict(
      impl='jax', kind='attribution', size=size, batch=batch, seq=seq, dtype=dtype, gate=gate,
      diffmask_examples_per_s=diffmask_rate, ig_examples_per_s=ig_rate,
      ratio=diffmask_rate / ig_rate, ig_steps=ig_steps, ig_batch=ig_batch,
      path_batch_size=path_batch_size, repeats=repeats, ig_repeats=ig_repeats,
      ig_mean_abs_convergence_delta=float(np.mean(np.abs(result.convergence_delta))),
      **_memory_fields(device_peak, resident_before), device=device,
      jax_version=jax.__version__)


def time_step(impl: str, size: str, batch: int, seq: int, gate: str, steps: int | None = None,
              warmup: int = 2, dtype: str = 'float32', layer_index: int | None = None,
              threads: int | None = None, cached_clean_pass: bool = False) -> dict[str, Any]:
  """:func:`time_jax_step` or :func:`time_torch_step` by name.

  ``threads`` applies to torch only, ``cached_clean_pass`` to jax only (the
  original recomputes the clean pass at every step).
  """
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
  if threads is not None and threads < 1:
    raise ValueError(f'threads must be >= 1, got {threads}')
  if impl == 'jax':
    if threads is not None:
      raise ValueError('threads applies to --impl torch only (XLA sizes its own thread pool)')
    return time_jax_step(size, batch, seq, gate, steps, warmup, dtype, layer_index,
                         cached_clean_pass)
  if cached_clean_pass:
    raise ValueError('a cached clean pass applies to --impl jax only (the original recomputes '
                     'it at every step)')
  return time_torch_step(size, batch, seq, gate, steps, warmup, dtype, layer_index, threads)

