"""Plain PyTorch for every kernel in moekern: readable, slow, and the oracle of the tests.

Each function here states the exact contract of its fast twin (Triton in this package, CUDA in csrc/).
"""

from dataclasses import dataclass
from typing import Literal

import torch


def align_block_size(expert_of_pair: torch.Tensor, num_experts: int, block_m: int):
    """Sort routed (token, slot) pairs by expert, each expert's run padded to a multiple of `block_m`.

    expert_of_pair: int32 [num_pairs], the expert of each pair (row-major over tokens then slots); a negative id marks
    a pair that is not computed (a skipped slot) and is left out.

    Returns (sorted_pairs, block_expert, num_padded):
      sorted_pairs int32 [max_padded]: pair indices grouped by expert in increasing pair order; padding rows hold
        num_pairs (one past the last pair), so a kernel that reads them can mask them by `row < num_pairs`.
      block_expert int32 [max_padded // block_m]: the expert of each block of block_m rows, -1 past the used rows.
      num_padded int32 [1]: the number of rows used.
    max_padded = num_pairs + num_experts * (block_m - 1), rounded up to block_m (at least block_m): a bound that
    does not depend on the routing, so the shapes are static (CUDA graphs).
    """
    pairs = expert_of_pair.reshape(-1).to(torch.int64)
    n = pairs.numel()
    max_padded = max(-(-(n + num_experts * (block_m - 1)) // block_m) * block_m, block_m)
    sorted_pairs = torch.full((max_padded,), n, dtype=torch.int32)
    block_expert = torch.full((max_padded // block_m,), -1, dtype=torch.int32)
    row = 0
    for e in range(num_experts):
        mine = torch.nonzero(pairs == e).flatten()  # increasing pair order
        sorted_pairs[row : row + mine.numel()] = mine.to(torch.int32)
        padded = -(-mine.numel() // block_m) * block_m
        block_expert[row // block_m : (row + padded) // block_m] = e
        row += padded
    return sorted_pairs, block_expert, torch.tensor([row], dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------------
NO_EXPERT = -1  # the expert id of a slot that is not computed (skipped, or fewer survivors than top_k)


@dataclass(frozen=True)
class RouterSpec:
    """How one model family turns router logits into (weights, expert ids). The adapters in moekern.models fill it.

    scoring:      "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2), "sigmoid" (DeepSeek-V3), or "topk_softmax" (GPT-OSS:
                  top-k on the logits, then a softmax over the k).
    renormalize:  divide the k weights by their sum (Mixtral always; Qwen/OLMoE/DeepSeek-V3 with norm_topk_prob).
    scaling:      DeepSeek's routed_scaling_factor, applied last.
    n_group, topk_group, group_score: group-limited top-k (DeepSeek): only experts in the topk_group best groups are
                  eligible; a group's score is its best expert ("max", V2) or the sum of its best two ("top2_sum", V3).
    """

    scoring: Literal["softmax", "sigmoid", "topk_softmax"]
    top_k: int
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"


def route(
    logits: torch.Tensor,
    spec: RouterSpec,
    alive: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    skip_beta: float | None = None,
):
    """Router logits [T, E] over the model's original experts -> (weights [T, k] fp32, ids [T, k] int64).

    alive [E] bool: the experts that survive Expert Drop. Dropped experts are out of every step (softmax, groups, top-k),
      exactly as if the router had only the survivors' rows; a slot left without a surviving expert gets NO_EXPERT.
    correction_bias [E]: DeepSeek-V3's e_score_correction_bias, used for the choice of experts, not for the weights.
    skip_beta: per-token skip (Lu et al.): a slot whose weight over the token's top weight is below beta is not computed
      (its id becomes NO_EXPERT) and the kept weights are rescaled to the sum the k weights had, so a renormalised
      router still sums to 1.
    """
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    k = spec.top_k
    dead = None if alive is None else ~alive.to(torch.bool)

    if spec.scoring == "topk_softmax":
        choice = logits if dead is None else logits.masked_fill(dead, float("-inf"))
        top, ids = choice.topk(k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        if spec.scoring == "softmax":
            scores = torch.softmax(logits if dead is None else logits.masked_fill(dead, float("-inf")), dim=-1)
        else:
            scores = torch.sigmoid(logits)
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if dead is not None:
            choice = choice.masked_fill(dead, float("-inf"))
        if spec.n_group > 1:
            choice = _keep_best_groups(choice, spec)
        ids = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, ids).masked_fill(_empty_slots(choice, ids), 0.0)
        if spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * spec.scaling
    # Fewer eligible experts than k (Expert Drop below top_k, or the eligible groups run out): those slots are empty.
    empty = _empty_slots(choice, ids)
    weights, ids = weights.masked_fill(empty, 0.0), ids.masked_fill(empty, NO_EXPERT)

    if skip_beta is not None and skip_beta > 0:
        weights, ids = skip_weak_slots(weights, ids, skip_beta)
    return weights, ids


def _empty_slots(choice: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return choice.gather(1, ids) == float("-inf")


def _keep_best_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Mask (with -inf) every expert outside the token's topk_group best groups."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, spec.n_group, num_experts // spec.n_group)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        best_two = grouped.topk(2, dim=-1).values
        group_scores = best_two.masked_fill(best_two == float("-inf"), 0.0).sum(dim=-1)
        group_scores = group_scores.masked_fill(best_two[..., 0] == float("-inf"), float("-inf"))  # all dropped
    best_groups = group_scores.topk(spec.topk_group, dim=-1).indices
    in_best = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return choice.masked_fill(~in_best.repeat_interleave(num_experts // spec.n_group, dim=-1), float("-inf"))


def skip_weak_slots(weights: torch.Tensor, ids: torch.Tensor, beta: float):
    """Dynamic skipping: drop slots whose weight is below beta times the token's top weight (the top slot stays)."""
    top = weights.max(dim=-1, keepdim=True).values
    skip = weights < beta * top
    kept = weights.masked_fill(skip, 0.0)
    total, kept_total = weights.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
    kept = kept * torch.where(kept_total > 0, total / kept_total, torch.zeros_like(total))
    return kept, ids.masked_fill(skip, NO_EXPERT)


# ----------------------------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """The gated activation between the two expert GEMMs.

    "silu": SiLU(gate) * up, with gate the first I rows of gate_up and up the last I (Mixtral, Qwen, OLMoE, DeepSeek).
    "clamped_swiglu": GPT-OSS: gate and up interleaved (even, odd rows); gate clamped above at `limit`, up to
        [-limit, limit]; out = (up + 1) * gate * sigmoid(alpha * gate).
    """

    kind: Literal["silu", "clamped_swiglu"] = "silu"
    alpha: float = 1.702
    limit: float = 7.0


def gated_activation(gate_up: torch.Tensor, act: Activation) -> torch.Tensor:
    if act.kind == "silu":
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * gate * torch.sigmoid(gate * act.alpha)


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    act: Activation = Activation(),
) -> torch.Tensor:
    """out[t] = sum over slots s with ids[t, s] != NO_EXPERT of weights[t, s] * FFN_{ids[t, s]}(x[t]).

    x [T, H]; ids, weights [T, k]; w_gate_up [E, 2I, H] and w_down [E, H, I] in (out, in) layout (a transposed view is
    fine); biases [E, 2I] and [E, H]. Each expert's FFN: down(act(gate_up(x))). Accumulates in fp32.
    """
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e == NO_EXPERT:
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        h = x[token] @ w_gate_up[e].T
        if b_gate_up is not None:
            h = h + b_gate_up[e]
        y = gated_activation(h, act) @ w_down[e].T
        if b_down is not None:
            y = y + b_down[e]
        out.index_add_(0, token, y.float() * weights[token, slot, None].float())
    return out.to(x.dtype)
