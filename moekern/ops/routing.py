"""Triton routing: router logits -> (weights, expert ids) -> the work lists of the grouped GEMM.

Two kernels, no host sync between them, every shape fixed by (tokens, experts, top_k, block_m) alone, so the pair of
launches is fit for a CUDA graph:

  route_kernel   one program per BLOCK_T tokens, the token's whole logit row in registers: the family's scoring,
                 the alive mask, DeepSeek's groups, top-k by k rounds of argmax, renormalisation, scaling, and the
                 per-token skip (a skipped slot gets NO_EXPERT, so it is never computed). Oracle: reference.route.
  align_kernel   one program per expert: the (token, slot) pairs sorted by expert (stable), each expert's run padded
                 to block_m, the expert of each block, the number of rows used. Oracle: reference.align_block_size.
                 A dropped expert or a skipped slot has no pair, so no block; nor has an id past the experts.

Why a program per expert and no grid-wide step: every program counts all pairs (a histogram, the same in each), so
none waits for another, and each writes only its own run; placement is a cumulative sum over the pairs in order, so
the result is deterministic and atomics-free. The counting is repeated E times, but it is a histogram of the pairs,
a few microseconds even at a 2048-token prefill on 256 experts, spread over E programs instead of one looping over
the experts.
"""

import torch
import triton
import triton.language as tl

from moekern.ops.reference import NO_EXPERT, RouterSpec

_alloc = torch.empty  # tests swap in a poisoning allocator: an unwritten element then fails the comparison
SCORING = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}


@triton.jit
def route_kernel(
    logits_ptr, alive_ptr, bias_ptr, row_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, stride_t, scaling, beta,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_ALIVE: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, G_PAD: tl.constexpr,
    HAS_SKIP: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_PAD)
    t_ok = t < num_tokens
    e_ok = e < num_experts
    logits = tl.load(logits_ptr + t[:, None] * stride_t + e[None, :], mask=t_ok[:, None] & e_ok[None, :],
                     other=float("-inf")).to(tl.float32)
    # dead: a dropped expert, or a padding column. It is out of every step, as if the router had no row for it.
    dead = ~e_ok
    if HAS_ALIVE:
        dead = dead | (tl.load(alive_ptr + e, mask=e_ok, other=0).to(tl.int32) == 0)
    dead2 = dead[None, :] | tl.zeros((BLOCK_T, E_PAD), tl.int1)  # broadcast to [BLOCK_T, E_PAD]

    if SCORING == 2:  # GPT-OSS: choose on the logits, softmax over the k afterwards
        scores = logits
        choice = tl.where(dead2, float("-inf"), logits)
    else:
        if SCORING == 0:
            masked = tl.where(dead2, float("-inf"), logits)
            row_max = tl.max(masked, axis=1)
            row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a padding token's row: no inf - inf
            p = tl.exp(masked - row_max[:, None])
            denom = tl.sum(p, axis=1)
            scores = p / tl.where(denom > 0, denom, 1.0)[:, None]
        else:
            scores = tl.sigmoid(logits)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        choice = tl.where(dead2, float("-inf"), choice)

    if N_GROUP > 1:  # group-limited top-k (DeepSeek): keep only the TOPK_GROUP best groups
        group_size = num_experts // N_GROUP
        gid = e // group_size
        g = tl.arange(0, G_PAD)
        group_scores = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
        for gi in tl.static_range(N_GROUP):
            mine = (gid == gi)[None, :]
            in_group = tl.where(mine, choice, float("-inf"))
            best = tl.max(in_group, axis=1)
            if GROUP_TOP2:  # sum of the best two; a dropped (-inf) member counts 0, an all-dropped group is -inf
                first = tl.argmax(in_group, axis=1)
                second = tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), in_group), axis=1)
                score = tl.where(best == float("-inf"), 0.0, best) + tl.where(second == float("-inf"), 0.0, second)
                best = tl.where(best == float("-inf"), float("-inf"), score)
            group_scores = tl.where(g[None, :] == gi, best[:, None], group_scores)
        keep = tl.zeros((BLOCK_T, G_PAD), tl.int1)
        # padding groups can only be chosen once every real group is taken, which TOPK_GROUP <= N_GROUP prevents
        work = group_scores
        for _ in tl.static_range(TOPK_GROUP):
            best_g = tl.argmax(tl.where(keep, float("-inf"), work), axis=1)
            keep = keep | (g[None, :] == best_g[:, None])
        expert_keep = tl.zeros((BLOCK_T, E_PAD), tl.int1)
        for gi in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where(keep & (g[None, :] == gi), 1, 0), axis=1) > 0
            expert_keep = expert_keep | (kept_g[:, None] & (gid == gi)[None, :])
        choice = tl.where(expert_keep, choice, float("-inf"))

    # top-k: k rounds of argmax over the experts not yet taken. A slot whose best choice is -inf has no eligible
    # expert left (Expert Drop below top_k, or the chosen groups ran out): it is empty.
    s = tl.arange(0, K_PAD)
    taken = tl.zeros((BLOCK_T, E_PAD), tl.int1)
    ids = tl.full((BLOCK_T, K_PAD), -1, tl.int32)
    picked = tl.zeros((BLOCK_T, K_PAD), tl.float32)  # the score (or logit) of each slot
    empty = tl.zeros((BLOCK_T, K_PAD), tl.int1) | (s[None, :] >= TOP_K)
    for slot in tl.static_range(TOP_K):
        avail = tl.where(taken, float("-inf"), choice)
        idx = tl.argmax(avail, axis=1)
        best = tl.max(avail, axis=1)
        hit = e[None, :] == idx[:, None]
        taken = taken | hit
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        here = s[None, :] == slot
        ids = tl.where(here, idx[:, None].to(tl.int32), ids)
        picked = tl.where(here, value[:, None], picked)
        empty = empty | (here & (best == float("-inf"))[:, None])

    if SCORING == 2:
        top = tl.where(empty, float("-inf"), picked)
        top_max = tl.max(top, axis=1)
        top_max = tl.where(top_max == float("-inf"), 0.0, top_max)
        p = tl.where(empty, 0.0, tl.exp(top - top_max[:, None]))
        total = tl.sum(p, axis=1)
        w = p / tl.where(total > 0, total, 1.0)[:, None]
    else:
        w = tl.where(empty, 0.0, picked)
        if RENORMALIZE:
            total = tl.sum(w, axis=1)
            w = w / tl.where(total > 0, total, 1.0)[:, None]
        w = w * scaling
    w = tl.where(empty, 0.0, w)
    ids = tl.where(empty, -1, ids)

    if HAS_SKIP:  # per-token skip: a slot under beta x the top weight is not computed; the rest keep the k's sum
        top_w = tl.max(w, axis=1)
        skip = w < beta * top_w[:, None]
        kept = tl.where(skip, 0.0, w)
        total = tl.sum(w, axis=1)
        kept_total = tl.sum(kept, axis=1)
        factor = tl.where(kept_total > 0, total / tl.where(kept_total > 0, kept_total, 1.0), 0.0)
        w = kept * factor[:, None]
        ids = tl.where(skip, -1, ids)

    out = t[:, None] * TOP_K + s[None, :]
    ok = t_ok[:, None] & (s[None, :] < TOP_K)
    if HAS_ROWS:  # original expert id -> the row it is stored at (Expert Drop slices the weights); NO_EXPERT stays
        ids = tl.where(ids >= 0, tl.load(row_ptr + ids, mask=ok & (ids >= 0), other=-1).to(tl.int32), -1)
    tl.store(weights_ptr + out, w, mask=ok)
    tl.store(ids_ptr + out, ids, mask=ok)


def route(logits: torch.Tensor, spec: RouterSpec, alive: torch.Tensor | None = None,
          correction_bias: torch.Tensor | None = None, skip_beta: float | None = None, block_t: int = 16,
          expert_row: torch.Tensor | None = None):
    """reference.route on the GPU: logits [T, E] -> (weights [T, k] fp32, ids [T, k] int32, NO_EXPERT = -1).

    expert_row [E] (int32 or int64): where each original expert is stored after Expert Drop sliced the weights
    (NO_EXPERT for a dropped one); the ids returned are then storage rows, mapped in the same launch (a caller that
    remaps ids itself pays four more kernel launches a layer)."""
    num_tokens, num_experts = logits.shape
    k = spec.top_k
    if spec.n_group > 1 and num_experts % spec.n_group:
        raise ValueError(f"{num_experts} experts do not split into {spec.n_group} groups")
    logits = logits.contiguous()
    weights = _alloc(num_tokens, k, dtype=torch.float32, device=logits.device)
    ids = _alloc(num_tokens, k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    # bool or int8 alive masks are read as they are (no cast kernel); logits stand in for absent tensors
    alive_t = (alive if alive.dtype in (torch.bool, torch.int8) else alive.to(torch.int8)).contiguous() \
        if alive is not None else logits
    bias_t = correction_bias.float().contiguous() if correction_bias is not None else logits
    rows_t = expert_row.contiguous() if expert_row is not None else logits
    has_skip = skip_beta is not None and skip_beta > 0
    e_pad = triton.next_power_of_2(num_experts)
    # A whole logit row lives in registers, in some eight [BLOCK_T, E_PAD] tensors at once: keep each at 8 elements
    # a thread (2K elements over 8 warps), so that DeepSeek-V3's 256 experts in groups fit (ptxas, sm_90: 80
    # registers; 16 tokens a program took 254).
    block_t = max(1, min(block_t, triton.next_power_of_2(num_tokens), 2048 // e_pad or 1))
    warps = max(4, min(8, block_t * e_pad // 256))
    grid = (triton.cdiv(num_tokens, block_t),)
    route_kernel[grid](
        logits, alive_t, bias_t, rows_t, weights, ids,
        num_tokens, num_experts, logits.stride(0), float(spec.scaling), float(skip_beta or 0.0),
        TOP_K=k, K_PAD=triton.next_power_of_2(k), E_PAD=e_pad, BLOCK_T=block_t,
        SCORING=SCORING[spec.scoring], RENORMALIZE=spec.renormalize and spec.scoring != "topk_softmax",
        HAS_ALIVE=alive is not None, HAS_BIAS=correction_bias is not None and spec.scoring != "topk_softmax",
        N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, GROUP_TOP2=spec.group_score == "top2_sum",
        G_PAD=triton.next_power_of_2(spec.n_group), HAS_SKIP=has_skip, HAS_ROWS=expert_row is not None,
        num_warps=warps,
    )
    return weights, ids


# ----------------------------------------------------------------------------------------------------------------------
# Sort and pad: reference.align_block_size
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def align_kernel(
    expert_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_experts, max_padded,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per expert. Each counts every expert's pairs (a histogram: the same numbers in every program, so
    no program waits for another), takes its run's start from their padded prefix sum, and writes its own run: its
    pairs in pair order, its padding, its blocks. The rows and blocks past the used ones are shared out."""
    me = tl.program_id(0)
    programs = tl.num_programs(0)
    c = tl.arange(0, CHUNK)
    # Pass 1: pairs per expert. Ids outside 0..num_experts - 1 (skipped slots, empty ones) count in the spare bin
    # E_PAD - 1, never an expert's (E_PAD > num_experts).
    counts = tl.zeros((E_PAD,), tl.int32)
    for base in range(0, num_pairs, CHUNK):
        ex = tl.load(expert_ptr + base + c, mask=base + c < num_pairs, other=-1)
        counts += tl.histogram(tl.where((ex >= 0) & (ex < num_experts), ex, E_PAD - 1), E_PAD)
    e = tl.arange(0, E_PAD)
    counts = tl.where(e < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    mine = e == me
    start = tl.sum(tl.where(mine, ends - padded, 0), axis=0)
    count = tl.sum(tl.where(mine, counts, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    if me == 0:
        tl.store(num_padded_ptr, total)
    if count > 0:
        # Pass 2: my pairs, in pair order (stable): row = start + the pairs of mine before it
        running = start
        for base in range(0, num_pairs, CHUNK):
            pair = base + c
            hit = (tl.load(expert_ptr + pair, mask=pair < num_pairs, other=-1) == me).to(tl.int32)
            tl.store(sorted_ptr + running + tl.cumsum(hit, axis=0) - 1, pair, mask=hit > 0)
            running += tl.sum(hit, axis=0)
        # my run's padding (under BLOCK_M rows) points past the last pair; my blocks are mine
        m = tl.arange(0, BLOCK_M)
        pad = start + count + m
        tl.store(sorted_ptr + pad, tl.zeros((BLOCK_M,), tl.int32) + num_pairs, mask=pad < end)
        for b in range(start // BLOCK_M, end // BLOCK_M, CHUNK):
            tl.store(block_expert_ptr + b + c, tl.zeros((CHUNK,), tl.int32) + me, mask=b + c < end // BLOCK_M)
    # Rows past the used ones point past the last pair, blocks past them have no expert (-1): chunks dealt out
    # round-robin to the programs.
    for base in range(total + me * CHUNK, max_padded, programs * CHUNK):
        tl.store(sorted_ptr + base + c, tl.zeros((CHUNK,), tl.int32) + num_pairs, mask=base + c < max_padded)
    num_blocks = max_padded // BLOCK_M
    for base in range(total // BLOCK_M + me * CHUNK, num_blocks, programs * CHUNK):
        tl.store(block_expert_ptr + base + c, tl.full((CHUNK,), -1, tl.int32), mask=base + c < num_blocks)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The static bound of reference.align_block_size: rows enough for any routing of num_pairs pairs."""
    return max(triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m, block_m)


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """How many blocks any routing of num_pairs pairs can use: each expert's run takes floor(count / block_m) full
    blocks and at most one partial block, and at most min(experts, pairs) experts have pairs. Tighter than
    max_padded_rows / block_m where pairs are few (decode: 8 pairs on 256 experts use at most 8 blocks, not 241): the
    GEMM grids use it, and align_block_size marks the blocks past it -1 like every unused block."""
    return max(1, min(max_padded_rows(num_pairs, num_experts, block_m) // block_m,
                      num_pairs // block_m + min(num_experts, num_pairs)))


def align_block_size(expert_of_pair: torch.Tensor, num_experts: int, block_m: int):
    """reference.align_block_size on the GPU: (sorted_pairs, block_expert, num_padded), all int32, static shapes.
    One launch, one program per expert."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, not {block_m}")
    pairs = expert_of_pair.reshape(-1)
    if pairs.dtype != torch.int32:
        pairs = pairs.to(torch.int32)
    pairs = pairs.contiguous()
    n = pairs.numel()
    max_padded = max_padded_rows(n, num_experts, block_m)
    device = pairs.device
    sorted_pairs = _alloc(max_padded, dtype=torch.int32, device=device)
    block_expert = _alloc(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = _alloc(1, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts + 1)  # one spare bin for ids that name no expert
    chunk = max(32, min(1024, triton.next_power_of_2(max(n, 1))))
    align_kernel[(num_experts,)](pairs, sorted_pairs, block_expert, num_padded, n, num_experts, max_padded,
                                 BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    return sorted_pairs, block_expert, num_padded


__all__ = ["route", "align_block_size", "max_padded_rows", "max_blocks", "NO_EXPERT"]
