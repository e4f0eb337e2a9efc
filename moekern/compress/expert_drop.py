"""Expert Drop (He et al., App. A.3; Muzio et al.): keep the experts with the highest mean routing score.

    layer-wise   every MoE layer drops its n lowest-scoring experts                                    (eq. 10)
    global       n x (number of MoE layers) experts are dropped, the lowest scores over all layers      (eq. 11)

Scores are TrimStats.layers[i].expert_scores (mean routing probability over all experts; see moekern.compress.stats).
Scores of different layers are compared as they are, as in the paper. Each layer keeps at least top_k experts (so
every token still gets k experts) unless allow_fewer=True, and always at least one (zero experts is Layer Drop).
"""

from moekern import surgery
from moekern.compress.stats import TrimStats
from moekern.errors import MoekernError
from moekern.models import family_of

MODES = ("global", "layerwise")


def min_experts(top_k: int, alive: int, allow_fewer: bool) -> int:
    """The fewest experts a layer with `alive` experts may keep."""
    return 1 if allow_fewer else min(top_k, alive)


def choose_kept_experts(stats: TrimStats, n: int, mode: str = "global", top_k: int = 2,
                        allow_fewer: bool = False) -> dict[int, list[int]]:
    """The experts each MoE layer keeps (original ids) when n experts per layer (on average, for global) go."""
    if mode not in MODES:
        raise MoekernError(f"Expert Drop mode must be one of {MODES}, got {mode!r}")
    alive = {i: stats.layers[i].alive.nonzero().flatten().tolist() for i in stats.moe_layers()}
    floor = {i: min_experts(top_k, len(ids), allow_fewer) for i, ids in alive.items()}
    # Candidates in dropping order: lowest score first; ties by layer then expert, so the choice is deterministic.
    if mode == "layerwise":
        dropped = {}
        for i, ids in alive.items():
            if len(ids) - n < floor[i]:
                raise MoekernError(_too_many(n, f"layer {i} has {len(ids)} experts and must keep {floor[i]}"))
            order = sorted(ids, key=lambda e: (float(stats.layers[i].expert_scores[e]), e))
            dropped[i] = set(order[:n])
    else:
        total = n * len(alive)
        room = sum(len(ids) - floor[i] for i, ids in alive.items())
        if total > room:
            raise MoekernError(_too_many(n, f"the {len(alive)} MoE layers can lose at most {room} experts in all"))
        candidates = sorted((float(stats.layers[i].expert_scores[e]), i, e) for i, ids in alive.items() for e in ids)
        dropped = {i: set() for i in alive}
        for _, i, e in candidates:
            if sum(len(d) for d in dropped.values()) == total:
                break
            if len(alive[i]) - len(dropped[i]) > floor[i]:
                dropped[i].add(e)
    return {i: [e for e in ids if e not in dropped[i]] for i, ids in alive.items()}


def _too_many(n: int, why: str) -> str:
    return f"cannot drop {n} experts per layer: {why}; drop fewer (or pass allow_fewer / --allow-fewer-experts)"


def expert_drop(model, stats: TrimStats, n: int, mode: str = "global", allow_fewer: bool = False
                ) -> dict[int, list[int]]:
    """Expert Drop of n experts per MoE layer (on average for global), applied with surgery.drop_experts (weights
    freed). Returns the experts kept per layer."""
    top_k = family_of(model).router_spec(model.config).top_k
    kept = choose_kept_experts(stats, n, mode, top_k, allow_fewer)
    surgery.drop_experts(model, {i: ids for i, ids in kept.items() if len(ids) < int(stats.layers[i].alive.sum())})
    return kept
