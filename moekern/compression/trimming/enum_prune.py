"""Enumeration expert pruning (Lu et al., "Not All Experts are Equal"): in each MoE layer keep the r experts whose
layer output best reconstructs the original one on calibration tokens.

For a candidate subset S the layer is run as it would be after Expert Drop to S (tokens route among S: softmax,
top-k and renormalisation over the survivors, as moekern.ops.reference.route does with an `alive` mask), on the
recorded MoE inputs X, and scored against the recorded outputs Y. Shared experts are the same for every subset and
are kept. Two definitions:

  enum-prune=R       (moekern's default) ||Y - MoE_S(X)||_F on a uniform sample of at most 4096 calibration tokens
                     per layer (TrimStats.layers[i].moe_inputs); every subset when C(n, r) <= max_subsets, beyond that
                     (60-64 experts) greedy removal: drop, one at a time, the expert whose removal gives the smallest
                     error, until r remain (sum_{m=r+1..n} m evaluations instead of C(n, r); not guaranteed optimal).
  enum-prune=R:all   Lu et al. exactly: every subset, every calibration token, and their loss, the sum over the
                     calibration batches b of ||Y_b - MoE_S(X_b)||_F (Expert_Sparsity, method/expert_pruning.py and
                     PrunableMixtralSparseMoeBlockWrapper.enumerate; moekern's batches are its calibration batches of
                     `batch_size` sequences, 8 by default as theirs). The losses are accumulated during the calibration
                     pass (TrimStats.layers[i].subset_losses), so no token is stored; what must fit in memory is the
                     subsets themselves, which check_enumeration estimates before any work.

All layers are decided on the statistics of the unpruned model (Lu et al.'s layerwise_pruning), then pruned.
Each expert's output is computed once per token chunk and the subsets only re-weight them, so an evaluation costs
a gather, not an FFN.
"""

import itertools
import math

from moekern import surgery
# subset_errors: its home was here
from moekern.compression.trimming.stats import CHUNK_FLOATS, TrimStats, subset_errors  # noqa: F401
from moekern.errors import MoekernError
from moekern.models import family_of

MAX_SUBSETS = 5000


def enumeration_bytes(num_experts: int, keep: int) -> int:
    """What enum-prune=R:all holds per layer beyond the calibration pass itself: each subset as a Python list of its
    expert ids (64 bytes + 8 per id) and a row of the boolean mask matrix (one byte per expert), a float64 loss, and
    one chunk of per-expert outputs (CHUNK_FLOATS fp32)."""
    subsets = math.comb(num_experts, keep)
    return subsets * (64 + 8 * keep + num_experts + 8) + 4 * CHUNK_FLOATS


def available_memory() -> int:
    """Bytes this process can still allocate on the host (psutil's available memory)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_enumeration(experts: list[int], keep: int, where: str) -> None:
    """Raise before any work if enumerating every subset of `keep` experts of layers with `experts` experts (the
    largest counts) cannot fit in this machine's memory."""
    largest = max(experts, default=0)
    if largest <= keep:
        return
    need, have = enumeration_bytes(largest, keep), available_memory()
    if need > have:
        raise MoekernError(
            f"{where}: enumerating every subset of {keep} of {largest} experts means C({largest}, {keep}) = "
            f"{math.comb(largest, keep):.3g} subsets per layer, about {_human(need)} of memory, more than the "
            f"{_human(have)} available; use enum-prune={keep} (exact up to {MAX_SUBSETS} subsets, greedy beyond, on a "
            f"token sample) or expert-drop")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def best_subset(block, family, num_original: int, x, y, keep: int, max_subsets: int = MAX_SUBSETS):
    """(kept experts, error, "exact" | "greedy") for one layer."""
    alive = block.alive.nonzero().flatten().tolist()
    if math.comb(len(alive), keep) <= max_subsets:
        subsets = [list(s) for s in itertools.combinations(alive, keep)]
        errors = subset_errors(block, family, num_original, x, y, subsets)
        best = int(errors.argmin())  # the first of equal errors: subsets come in lexicographic order
        return subsets[best], float(errors[best]), "exact"
    current, error = list(alive), float("nan")
    while len(current) > keep:
        subsets = [[e for e in current if e != out] for out in current]
        errors = subset_errors(block, family, num_original, x, y, subsets)
        best = int(errors.argmin())
        current, error = subsets[best], float(errors[best])
    return current, error, "greedy"


def enum_prune(model, stats: TrimStats, keep: int, allow_fewer: bool = False,
               max_subsets: int = MAX_SUBSETS) -> dict[int, dict]:
    """Keep `keep` experts in every MoE layer (layers with at most `keep` stay as they are), chosen by
    reconstruction error, and apply it with surgery.drop_experts. Returns per layer {"kept", "error", "search"}."""
    family = family_of(model)
    top_k = family.router_spec(model.config).top_k
    if keep < 1 or (keep < top_k and not allow_fewer):
        raise MoekernError(f"enum-prune={keep}: keep at least top_k={top_k} experts per layer "
                           f"(or allow fewer with allow_fewer / --allow-fewer-experts), and at least 1")
    num_original = surgery.decisions(model)["original_num_experts"]
    found = {}
    for i in stats.moe_layers():
        layer = stats.layers[i]
        if int(layer.alive.sum()) <= keep:
            continue
        if layer.subset_losses is not None and len(layer.subset_losses[0][0]) == keep:  # enum-prune=R:all
            subsets, losses = layer.subset_losses
            best = int(losses.argmin())  # the first of equal losses: subsets come in lexicographic order
            kept, error, search = subsets[best], float(losses[best]), "exact, all tokens"
        elif layer.moe_inputs is None:
            raise MoekernError("enumeration pruning needs the MoE inputs and outputs: measure with record_tokens=True "
                               "(or enumerate_keep=R for every subset on every token)")
        else:
            block = surgery.moe_block(model, i)
            kept, error, search = best_subset(block, family, num_original, layer.moe_inputs, layer.moe_outputs, keep,
                                              max_subsets)
        surgery.drop_experts(model, {i: kept})
        found[i] = {"kept": kept, "error": error, "search": search}
    return found
