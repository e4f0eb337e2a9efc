"""Layer Drop and Block Drop (He et al., Sec. 4.2): remove the most redundant MoE layers or whole decoder blocks.

    Layer Drop   the n MoE layers with the highest S^(NM) = cos(x', x' + MoE(Norm(x'))): their post-attention norm
                 and MoE are removed, attention stays (surgery.remove_moe_layers)
    Block Drop   the n decoder layers with the highest cos(block input, block output) (surgery.remove_blocks)

One-shot (the default) ranks once on the given statistics; iterative drops one at a time and measures the changed
model again before each next choice (a removal changes what the later layers see). Ties go to the lower layer.
"""

from moekern import surgery
from moekern.compression.trimming.stats import TrimStats
from moekern.errors import MoekernError


def most_similar(scores: dict[int, float], n: int) -> list[int]:
    """The n keys with the highest score (ties: the lower key first), in increasing order."""
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:n])


def layer_scores(stats: TrimStats) -> dict[int, float]:
    return {i: stats.layers[i].s_nm for i in stats.moe_layers()}


def block_scores(stats: TrimStats) -> dict[int, float]:
    return {i: s.block_similarity for i, s in stats.layers.items()}


def layer_drop(model, stats: TrimStats, n: int, iterative: bool = False) -> list[int]:
    """Layer Drop of n MoE layers; returns the removed layers (original ids)."""
    available = len(stats.moe_layers())
    if not 0 < n <= available:
        raise MoekernError(f"layer-drop={n}: the model has {available} MoE layers; drop between 1 and {available}")
    return _drop(model, stats, n, iterative, layer_scores, surgery.remove_moe_layers)


def block_drop(model, stats: TrimStats, n: int, iterative: bool = False) -> list[int]:
    """Block Drop of n decoder layers (at least one stays); returns the removed blocks (original ids)."""
    available = len(stats.layers)
    if not 0 < n < available:
        raise MoekernError(f"block-drop={n}: the model has {available} decoder layers; drop between 1 and "
                           f"{available - 1} (one must stay)")
    return _drop(model, stats, n, iterative, block_scores, surgery.remove_blocks)


def _drop(model, stats, n, iterative, scores_of, remove) -> list[int]:
    if not iterative:
        chosen = most_similar(scores_of(stats), n)
        remove(model, chosen)
        return chosen
    chosen = []
    for step in range(n):
        if step:
            stats = stats.remeasure(model, record_tokens=False)
        pick = most_similar(scores_of(stats), 1)
        remove(model, pick)
        chosen += pick
    return sorted(chosen)
