"""Launch parameters of the grouped MoE GEMM, per shape, from a small table with a fallback.

A config depends only on host-known shapes (tokens, top_k, experts, N, K, 4-bit or not, dtype), never on the
routing, so choosing one costs no device sync and stays fixed across the replays of a CUDA graph.

BLOCK_M is shared by both GEMMs of one call (they read the same work lists); it follows the expected pairs per
expert, pairs / experts. The kernels compute out^T = W @ x^T, so BLOCK_M is the MMA's N: 16 at decode (its smallest
width on the tensor cores: one to 16 rows an expert cost the same), up to 128 rows at prefill. Each GEMM splits K
when its grid would leave SMs short of two programs each; the partial sums are reduced in a fixed order (gate_up by
the tile's last program, down by the slot-sum kernel), so the result stays deterministic.

The fallback is chosen from the static report of the compiled kernels (python -m moekern.ops.compile_check --sass:
instructions per K step, registers, spills, shared memory on sm_90 and sm_80), not from timings. TABLE entries go
here once a GPU measures them (benchmarks/bench_moe_gemm.py); an absent key falls back.
"""

import contextlib
from dataclasses import dataclass, replace

import triton


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8
    # 4-bit, K steps of whole groups: each group's MMA result is multiplied by its scales (acc += (Wq @ x^T) * s);
    # otherwise the scales multiply each weight in the dequantization, and the MMAs accumulate in place (in flight).
    FACTORED: bool = True


# (op, N, K, quant, tokens-bucket) -> config; op is "gate_up" (N = I, the intermediate width) or "down" (N = H).
TABLE: dict[tuple, GemmConfig] = {}

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 2048)
NUM_SMS = 132  # H100/H200; sizes the split-K choice where no GPU says otherwise
DECODE_ROWS = 16  # the MMA's smallest N on the tensor cores (wgmma n16, two mma.sync n8)
QUANT_K = 64  # a 4-bit K step reads whole 64-k blocks of the tensor-core layout (moe_gemm.mma_pack)
QUANT_K_PAD = 256  # and the layout pads K with zeros to a multiple of this (moe_gemm.MMA_K_PAD)


def group_size_supported(group: int) -> bool:
    """The 4-bit kernels read whole scale rows per 16-k step and tl.dot needs K steps of 16 or more: power-of-two
    groups of at least 16 (16, 32, 64, 128...)."""
    return group >= 16 and group & (group - 1) == 0


def block_m(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per block of the work lists: about the pairs an expert gets, a power of two from 16 to 128."""
    per_expert = max(1, num_tokens * top_k // max(1, num_experts))
    if per_expert <= DECODE_ROWS:
        return DECODE_ROWS
    return 32 if per_expert <= 48 else (64 if per_expert <= 96 else 128)


def bucket(num_tokens: int) -> int:
    return next((b for b in TOKEN_BUCKETS if num_tokens <= b), TOKEN_BUCKETS[-1])


# (arch, SMs) to plan for instead of the device at hand: compile_check plans sm_80 and sm_90 launches on a CPU
_TARGET: tuple[int, int] | None = None
SMS = {80: 108, 90: 132}  # A100, H100/H200


@contextlib.contextmanager
def planning_for(arch: int, sms: int | None = None):
    """Choose launches as for a GPU of compute capability `arch` (80, 90...) with `sms` SMs."""
    global _TARGET
    saved, _TARGET = _TARGET, (arch, sms or SMS.get(arch, NUM_SMS))
    try:
        yield
    finally:
        _TARGET = saved


def _device_props(device):
    import torch

    if device is not None and getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device)
    return None


def target_arch(device=None) -> int:
    """Compute capability x 10 of the GPU the launch is for (90 where there is none: the interpreter)."""
    if _TARGET is not None:
        return _TARGET[0]
    props = _device_props(device)
    return props.major * 10 + props.minor if props is not None else 90


def num_sms(device=None) -> int:
    if _TARGET is not None:
        return _TARGET[1]
    props = _device_props(device)
    return props.multi_processor_count if props is not None else NUM_SMS


def fallback(op: str, n: int, k: int, quant: bool, num_tokens: int, bm: int, num_blocks: int,
             group_size: int | None = None, device=None) -> GemmConfig:
    """From the static report (python -m moekern.ops.compile_check --sass): every variant below keeps its loop free
    of spills on sm_90 and sm_80.

    Decode (BLOCK_M 16, the MMA's N): one warpgroup. 4-bit: K steps of whole groups (decode_k_step: 256 k at group
    128, 320 at GPT-OSS's group 64 and K 2880; three stages where a step is wider than 256), gate_up 64 rows a half
    (89-121 registers; at GPT-OSS's shape 128 rows need 5% fewer instructions a byte but 255 registers),
    down 128 rows (two m64 blocks a warpgroup: the per-step cost is shared by twice the weights); groups of 16 and
    32 take 128 rows in both. bf16: 64 rows, K steps of 128. Prefill: 128 weight rows over two warpgroups
    (a weight is decoded once, not once per warpgroup), K steps of 64 (bf16); 4-bit on sm_90 two groups of 64, or of
    128 up to 64 rows (255 registers, no spill; 128 rows of 256-k steps wait for their wgmmas), else one group of at
    most 128, two stages (as far ahead in k as bf16's three), on sm_80 64-k steps."""
    if bm <= DECODE_ROWS:
        wide = quant and (op == "down" or (group_size or 0) < QUANT_K)
        cfg = GemmConfig(BLOCK_N=128 if wide else 64, BLOCK_K=128, num_warps=4, num_stages=4)
    else:
        cfg = GemmConfig(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, FACTORED=False)
        if op == "gate_up" and bm >= 128 and not quant and target_arch(device) < 90:
            cfg = replace(cfg, BLOCK_N=64)  # mma.sync's accumulators of two 128 x 128 tiles spill (GPT-OSS's epilogue)
    if quant and group_size is not None:
        # Whole groups a K step where the groups are 64 or wider: at decode each group's MMA result is multiplied by
        # its scales (fewest instructions); at prefill the scales go into the dequantization and the MMAs accumulate
        # in place, in flight. 16- and 32-wide groups: 64-k steps.
        grouped = QUANT_K <= group_size <= QUANT_K_PAD
        decode = bm <= DECODE_ROWS
        steps = decode_k_step(k, group_size) if decode else min(group_size, 128)
        if not decode and target_arch(device) >= 90 and group_size <= 128 and (group_size <= 64 or bm <= 64):
            steps = 2 * group_size  # two groups decoded at once, one wgmma: the per-step cost shared by twice the k
        if not decode and target_arch(device) >= 90 and steps >= 128:
            cfg = replace(cfg, num_stages=2)  # one step ahead is 128 k or more ahead, as bf16's three 64-k stages
        if not decode and target_arch(device) < 90:  # mma.sync needs more registers a tile: 128-k steps spill
            steps = QUANT_K
        cfg = replace(cfg, BLOCK_K=steps if grouped else QUANT_K, FACTORED=grouped and decode)
        if decode and cfg.BLOCK_K > QUANT_K_PAD:  # 30 KB a stage at GPT-OSS's 320-k steps: three stages, not four
            cfg = replace(cfg, num_stages=3)
    # Decode tiles split K until the grid gives every SM two programs, keeping at least two K steps a split. (Compute
    # tiles do not: their grids are large at real batch sizes, and gate_up's split epilogue, which sums two 128 x 128
    # partials, spills there.)
    programs = num_blocks * triton.cdiv(n, cfg.BLOCK_N)
    split, sms = 1, num_sms(device)
    while bm <= DECODE_ROWS and programs * split < 2 * sms and k // (split * 2) >= 2 * cfg.BLOCK_K and split < 8:
        split *= 2
    return replace(cfg, SPLIT_K=split)


DECODE_K_MAX = 320  # the widest decode K step: five groups of 64 (6 KB of words and activations a group, 128 rows)


def decode_k_step(k: int, group_size: int) -> int:
    """A decode K step of whole groups, at most DECODE_K_MAX wide (one group where a group is wider): of the widths
    that leave the least padding past K (a step's work is the same whether its k exist or not), the widest, whose
    per-step cost (barriers, loop, prefetch) is shared by the most weights. Group 128: 256 on every model's K (a
    step of 384 pads 4096). Group 64 at GPT-OSS's K = 2880: 320, nine steps exactly (256 would pad the last of
    12 steps by 192)."""
    if group_size >= DECODE_K_MAX:
        return group_size
    widths = range(group_size, DECODE_K_MAX + 1, group_size)
    return min(widths, key=lambda w: (triton.cdiv(k, w) * w, -w))


def config(op: str, n: int, k: int, quant: bool, num_tokens: int, bm: int, num_blocks: int,
           group_size: int | None = None, device=None) -> GemmConfig:
    cfg = TABLE.get((op, n, k, quant, bucket(num_tokens))) or fallback(op, n, k, quant, num_tokens, bm, num_blocks,
                                                                      group_size, device)
    # Keep the tile within the problem; 4-bit K steps are whole 64-k blocks of the tensor-core layout, and a factored
    # scale needs steps of whole groups.
    bk = min(cfg.BLOCK_K, max(16, triton.next_power_of_2(k)))
    bn = min(cfg.BLOCK_N, max(16, triton.next_power_of_2(n)))
    factored = cfg.FACTORED and quant
    if quant:
        bk = max(QUANT_K, bk)
        if QUANT_K_PAD % bk and k % bk:  # a step that divides neither the padding nor K would read past the words
            bk = min(QUANT_K_PAD, 1 << (bk.bit_length() - 1))
        factored = factored and group_size is not None and group_size >= QUANT_K and bk % group_size == 0
    return replace(cfg, BLOCK_K=bk, BLOCK_N=bn, FACTORED=factored)
