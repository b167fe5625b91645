"""Attribution methods DiffMask is compared against (paper sec. 4).

Each baseline is a pure JAX function of a :class:`dmx.models.base.MaskableModel`,
its frozen parameters and a batch, so it runs on any model DiffMask runs on.
Every one reads and replaces the state it attributes to through
``forward_from``, DiffMask's injection point, and returns per-token scores
``(batch, seq)`` (zero on padding):

* :func:`integrated_gradients` (Sundararajan et al., 2017);
* :func:`gradient_attribution`: plain gradients and gradient x input;
* :func:`information_bottleneck` (Schulz et al., 2020);
* :func:`guan_noise_scales` (Guan et al., 2019);
* :func:`erasure_search`: exact erasure, smallest kept subsets first;
* :func:`occlusion` (leave-one-out) and :func:`lime`;
* :func:`per_example_diffmask` and :func:`per_example_reinforce`: non-amortised
  masks, one free logit per position (paper sec. 4.2.1, Table 2).

Attention-based methods score attention, not tokens, through
:class:`dmx.models.bert.BertModel`'s attention entry points:
:func:`raw_attention` (the paper's Figure 5) and :func:`self_attention_attribution`
(Hao et al., 2021), with :func:`head_importance`, :func:`head_pruning_curve` and
:func:`attribution_tree`.
"""

from dmx.baselines.attention import (
    PRUNING_ORDERS, AttentionAttribution, AttributionTree, HeadImportance, PruningCurve, TreeEdge,
    attribution_tree, format_attribution_tree, head_importance, head_pruning_curve,
    head_score_maxima, jitted_self_attention_attribution, plot_attribution_tree,
    plot_pruning_curve, pruning_mask, rank_heads, raw_attention, self_attention_attribution)
from dmx.baselines.erasure import ErasureBudgetExceeded, ErasureResult, erasure_search
from dmx.baselines.gradients import GradientAttribution, gradient_attribution
from dmx.baselines.guan import NoiseScaleAttribution, guan_noise_scales
from dmx.baselines.integrated_gradients import (
    IG_VARIANTS, INTEGRATION_RULES, IntegratedGradients, integrated_gradients, path_quadrature)
from dmx.baselines.lime import LimeAttribution, lime, lime_masks
from dmx.baselines.per_example import (PerExampleMasks, per_example_diffmask, per_example_masks,
                                       per_example_reinforce)
from dmx.baselines.occlusion import OcclusionAttribution, occlusion
from dmx.baselines.schulz import (SCHULZ_ATTRIBUTIONS, BottleneckAttribution,
                                  information_bottleneck, state_statistics,
                                  states_statistics)

__all__ = ['PRUNING_ORDERS', 'AttentionAttribution', 'AttributionTree', 'HeadImportance',
           'PruningCurve', 'TreeEdge', 'attribution_tree', 'format_attribution_tree',
           'head_importance', 'head_pruning_curve', 'head_score_maxima',
           'jitted_self_attention_attribution', 'plot_attribution_tree', 'plot_pruning_curve',
           'pruning_mask', 'rank_heads', 'raw_attention', 'self_attention_attribution',
           'PerExampleMasks', 'per_example_diffmask', 'per_example_masks',
           'per_example_reinforce', 'IG_VARIANTS', 'INTEGRATION_RULES', 'SCHULZ_ATTRIBUTIONS', 'BottleneckAttribution',
           'ErasureBudgetExceeded', 'ErasureResult', 'GradientAttribution', 'IntegratedGradients',
           'LimeAttribution', 'NoiseScaleAttribution', 'OcclusionAttribution', 'erasure_search',
           'gradient_attribution', 'guan_noise_scales', 'information_bottleneck',
           'integrated_gradients', 'lime', 'lime_masks', 'occlusion', 'path_quadrature',
           'state_statistics', 'states_statistics']
