"""dmx: Differentiable Masking (De Cao et al., EMNLP 2020) in JAX/Flax.

DiffMask learns, for every layer of a frozen network, which input tokens or
hidden states can be replaced by a learned baseline without changing the
prediction. The pieces:

* :mod:`dmx.hard_concrete`: the gates' distribution, pure functions;
* :mod:`dmx.relaxations`: Hard Concrete and its relatives behind one interface;
* :mod:`dmx.probes`: the probes that predict gates from a model's states;
* :mod:`dmx.objective`: divergences, sparsity losses, the Lagrangian;
* :mod:`dmx.optim`: the saddle-point optimisers, on optax;
* :mod:`dmx.train`: the config, state and jitted train step;
* :mod:`dmx.attribute`: keep probabilities from a trained probe;
* :mod:`dmx.models`: frozen models with explicit injection points (toy, BERT/RoBERTa);
* :mod:`dmx.data`: the toy generator, SST-5 and SQuAD readers.
"""

from dmx import (attribute, checkpoint, hard_concrete, metrics, objective, optim, probes, relaxations,
                 train)
from dmx.attribute import Attribution, masked_agreement
from dmx.models import (BertConfig, BertModel, MaskableModel, ModelLoadError, ToyModel, ToyModelConfig,
                        load_pretrained)
from dmx.probes import DiffMaskProbe, PerExampleProbe
from dmx.relaxations import Relaxation
from dmx.train import DiffMaskConfig, DiffMaskState, fit, init_probe_params, init_state, make_train_step

__version__ = '0.1.0'
