"""Attribution methods DiffMask is compared against (paper sec. 4).

Each baseline is a pure JAX function of a :class:`dmx.models.base.MaskableModel`,
its frozen parameters and a batch, so it runs on any model DiffMask runs on.
"""

from dmx.baselines.integrated_gradients import (
    INTEGRATION_RULES, IntegratedGradients, integrated_gradients, path_alphas)

__all__ = ['INTEGRATION_RULES', 'IntegratedGradients', 'integrated_gradients', 'path_alphas']
