"""Dynamic expert skipping (Lu et al.): per layer, a token's slot is not computed when its routing weight is below
beta times the token's top weight; beta is the median (or another quantile q) of that ratio on calibration data
(w2/w1 for top-2; for top-k > 2 the ratios of every non-top slot to the top one, pooled)."""

import torch

from moekern import surgery
from moekern.compression.trimming.stats import TrimStats
from moekern.errors import MoekernError


def skip_thresholds(stats: TrimStats, quantile: float = 0.5) -> dict[int, float]:
    """beta per MoE layer: the `quantile` of the recorded weight ratios (linear interpolation, so q=0.5 is the
    median as numpy defines it). Layers without any ratio (top-1 routing) get none."""
    if not 0.0 <= quantile <= 1.0:
        raise MoekernError(f"skip quantile must be in [0, 1], got {quantile}")
    return {i: float(torch.quantile(stats.layers[i].weight_ratios.double(), quantile))
            for i in stats.moe_layers() if stats.layers[i].weight_ratios.numel()}


def dynamic_skip(model, stats: TrimStats, quantile: float = 0.5) -> dict[int, float]:
    """Set each MoE layer's skip beta (surgery.set_skip_beta); returns the betas."""
    betas = skip_thresholds(stats, quantile)
    surgery.set_skip_beta(model, betas)
    return betas
