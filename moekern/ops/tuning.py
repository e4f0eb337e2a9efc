"""Launch parameters of the grouped MoE GEMM, per shape, from a small table with a fallback.

A config depends only on host-known shapes (tokens, top_k, experts, N, K, 4-bit or not), never on the routing, so
choosing one costs no device sync and stays fixed across the replays of a CUDA graph.

BLOCK_M is shared by both GEMMs of one call (they read the same work lists); it follows the expected pairs per expert,
pairs / experts. Under 16 rows the kernel takes its decode path (no tl.dot: a broadcast multiply and a sum over K,
a GEMV over a few rows) and the down GEMM splits K when the grid would leave most SMs idle. The split-K partial sums
are reduced in a fixed order by the slot-sum kernel, so the result stays deterministic.

TABLE entries are placeholders until measured on a lent GPU (benchmarks/bench_moe_gemm.py): the keys name the
model shapes of the benchmark, the values are the fallback's choice unless a measurement said otherwise.
"""

from dataclasses import dataclass, replace

import triton


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3


# (op, N, K, quant, tokens-bucket) -> config; op is "gate_up" (N = I, the intermediate width) or "down" (N = H).
# Measured entries go here; an absent key falls back to `fallback`.
TABLE: dict[tuple, GemmConfig] = {}

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 2048)
NUM_SMS = 132  # H100/H200; only sizes the split-K choice


def group_size_supported(group: int) -> bool:
    """The 4-bit kernels read one scale row per K step and tl.dot needs K steps of 16 or more: power-of-two groups
    of at least 16 (16, 32, 64, 128...)."""
    return group >= 16 and group & (group - 1) == 0


def block_m(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per block of the work lists: about the pairs an expert gets, between 1 and 64, a power of two."""
    per_expert = max(1, num_tokens * top_k // max(1, num_experts))
    if per_expert <= 8:
        return min(8, triton.next_power_of_2(per_expert))  # decode path: 1, 2, 4 or 8 rows, no wasted padding
    return 16 if per_expert <= 32 else (32 if per_expert <= 128 else 64)


def bucket(num_tokens: int) -> int:
    return next((b for b in TOKEN_BUCKETS if num_tokens <= b), TOKEN_BUCKETS[-1])


def fallback(op: str, n: int, k: int, quant: bool, num_tokens: int, bm: int, num_blocks: int) -> GemmConfig:
    """Chosen from ptxas's resource report for sm_90 (python -m moekern.ops.compile_check --resources, and the
    sweep in the report of issue 5), not from timings: no variant below spills. gate_up carries two accumulators
    (gate and up), so it gets 8 warps and stays 64 wide; at BLOCK_N 128 and 64 rows it spilled."""
    if bm < 16:  # GEMV tiles: the [BM, BK, BN] product lives in registers, so keep it at 8K elements:
        # BLOCK_K 128, 64, 32, 16 for 1, 2, 4, 8 rows
        cfg = GemmConfig(BLOCK_N=64, BLOCK_K=max(16, 8192 // (64 * bm)), num_warps=8 if op == "gate_up" else 4,
                         num_stages=2)
    else:
        wide = op == "down" and bm >= 64
        cfg = GemmConfig(BLOCK_N=128 if wide else 64, BLOCK_K=64, num_warps=8, num_stages=3)
    if op == "down":
        programs = num_blocks * triton.cdiv(n, cfg.BLOCK_N)
        split = 1
        while programs * split * 2 <= NUM_SMS * 2 and k // (split * 2) >= 4 * cfg.BLOCK_K and split < 8:
            split *= 2
        cfg = replace(cfg, SPLIT_K=split)
    return cfg


def config(op: str, n: int, k: int, quant: bool, num_tokens: int, bm: int, num_blocks: int,
           group_size: int | None = None) -> GemmConfig:
    cfg = TABLE.get((op, n, k, quant, bucket(num_tokens))) or fallback(op, n, k, quant, num_tokens, bm, num_blocks)
    # Keep BLOCK_K within the problem and, for 4-bit, inside one quantization group (one scale row per K step).
    bk = min(cfg.BLOCK_K, max(16, triton.next_power_of_2(k)))
    if group_size is not None:
        bk = min(bk, group_size)
    bn = min(cfg.BLOCK_N, max(16, triton.next_power_of_2(n)))
    return replace(cfg, BLOCK_K=bk, BLOCK_N=bn)
