"""Expert Drop (He et al., App. A.3; Muzio et al.): keep the experts with the highest mean routing score.

    layer-wise   every MoE layer drops its n lowest-scoring experts                                    (eq. 10)
    global       n x (number of MoE layers) experts are dropped, the lowest scores over all layers      (eq. 11)

Scores (TrimStats.layers[i], see stats.py), compared across layers as they are, as in the paper:
    "softmax"    expert_scores: the mean routing probability over all experts (the authors' code for Mixtral and
                 Qwen: Unified-MoE-Compression, MixtralExpertDropWrapper)
    "topk"       expert_topk_scores: the mean of the top-k routing weights, 0 where the expert was not chosen (the
                 authors' code for DeepSeek: DeepseekExpertDropWrapper scatters MoEGate's top-k weights)

Floor. By default each layer keeps at least top_k experts (so every token still gets k experts) unless
allow_fewer=True, and always at least one (zero experts is Layer Drop). floor=False is Eq. 11 exactly, as the authors'
global_pruning (torch.topk over the concatenated scores of all layers, no per-layer constraint): a layer may keep
fewer than top_k experts (its tokens then route to what is left) or none, and a layer left with none loses its
post-attention norm and MoE, as Layer Drop (the paper, Sec. 4.2: T' = {} is Layer Drop). The authors' released
code keeps that layer's norm and adds its output to the residual (x + Norm(x), modeling_mixtral.py,
MixtralDecoderLayer.forward with block_sparse_moe None); moekern follows the paper's definition instead.
"""

from moekern import surgery
from moekern.compression.trimming.stats import TrimStats
from moekern.errors import MoekernError
from moekern.models import family_of

MODES = ("global", "layerwise")
SCORES = ("softmax", "topk")


def min_experts(top_k: int, alive: int, allow_fewer: bool) -> int:
    """The fewest experts a layer with `alive` experts may keep."""
    return 1 if allow_fewer else min(top_k, alive)


def layer_scores(stats: TrimStats, layer: int, score: str = "softmax"):
    """The importance of each expert of one layer [E] by the chosen score."""
    if score not in SCORES:
        raise MoekernError(f"Expert Drop score must be one of {SCORES}, got {score!r}")
    entry = stats.layers[layer]
    return entry.expert_scores if score == "softmax" else entry.expert_topk_scores


def choose_kept_experts(stats: TrimStats, n: int, mode: str = "global", top_k: int = 2,
                        allow_fewer: bool = False, floor: bool = True, score: str = "softmax") -> dict[int, list[int]]:
    """The experts each MoE layer keeps (original ids) when n experts per layer (on average, for global) go. Without
    the floor a layer may be left with none (an empty list)."""
    if mode not in MODES:
        raise MoekernError(f"Expert Drop mode must be one of {MODES}, got {mode!r}")
    alive = {i: stats.layers[i].alive.nonzero().flatten().tolist() for i in stats.moe_layers()}
    scores = {i: layer_scores(stats, i, score) for i in alive}
    if floor:
        lowest = {i: min_experts(top_k, len(ids), allow_fewer) for i, ids in alive.items()}
    else:
        lowest = {i: 0 for i in alive}
    # Candidates in dropping order: lowest score first; ties by layer then expert, so the choice is deterministic.
    if mode == "layerwise":
        dropped = {}
        for i, ids in alive.items():
            if len(ids) - n < max(lowest[i], 1):
                raise MoekernError(_too_many(n, f"layer {i} has {len(ids)} experts and must keep "
                                                f"{max(lowest[i], 1)}"))
            order = sorted(ids, key=lambda e: (float(scores[i][e]), e))
            dropped[i] = set(order[:n])
    else:
        total = n * len(alive)
        room = sum(len(ids) - lowest[i] for i, ids in alive.items())
        if total > room or (not floor and total >= room):
            raise MoekernError(_too_many(n, f"the {len(alive)} MoE layers can lose at most "
                                            f"{room - (0 if floor else 1)} experts in all"))
        candidates = sorted((float(scores[i][e]), i, e) for i, ids in alive.items() for e in ids)
        dropped = {i: set() for i in alive}
        for _, i, e in candidates:
            if sum(len(d) for d in dropped.values()) == total:
                break
            if len(alive[i]) - len(dropped[i]) > lowest[i]:
                dropped[i].add(e)
    return {i: [e for e in ids if e not in dropped[i]] for i, ids in alive.items()}


def _too_many(n: int, why: str) -> str:
    return f"cannot drop {n} experts per layer: {why}; drop fewer (or pass allow_fewer / --allow-fewer-experts)"


def expert_drop(model, stats: TrimStats, n: int, mode: str = "global", allow_fewer: bool = False,
                floor: bool = True, score: str = "softmax") -> dict[int, list[int]]:
    """Expert Drop of n experts per MoE layer (on average for global), applied with surgery.drop_experts (weights
    freed); a layer left without experts (floor=False) loses its MoE (surgery.remove_moe_layers). Returns the experts
    kept per layer."""
    top_k = family_of(model).router_spec(model.config).top_k
    kept = choose_kept_experts(stats, n, mode, top_k, allow_fewer, floor, score)
    emptied = [i for i, ids in kept.items() if not ids]
    surgery.drop_experts(model, {i: ids for i, ids in kept.items()
                                 if ids and len(ids) < int(stats.layers[i].alive.sum())})
    if emptied:
        surgery.remove_moe_layers(model, emptied)
    return kept
