"""Fused grouped MoE GEMM in Triton over the work lists of moekern.ops.routing: bf16/fp16/fp32 weights, or
moekern's 4-bit layout (moekern.quant.layout) dequantized inside the K loop. Oracle: reference.moe_experts.

    pairs      p = t * top_k + s, one per (token, slot); a slot whose id is NO_EXPERT has no pair in the lists
    gate_up    inter[p, :I] = act(x[t] @ W_gate_up[e].T + b)     act in the epilogue; the intermediate written once
    down       part[split, p, :H] = weight[p] * (inter[p] @ W_down[e].T + b)   weight in the epilogue
    slot sum   out[t] = sum over s, split of part[split, t*k + s]   a skipped slot is read as 0, never computed

Why per-slot outputs and a second small kernel instead of atomics into out[t]: a sum in a fixed order gives the
same bits on every run (atomics add in arrival order), needs no zero fill of `out` before the GEMM (one launch and
one write of out less), works for bf16 out without bf16 atomics, and absorbs split-K for free. Its cost is writing
and reading [pairs, H] in fp32 once: nothing next to the weights at decode; at a 2048-token prefill of OLMoE shapes
(k = 8) about 270 MB, some 20% of the GEMMs' compute floor on an H200 (bf16 partials when SPLIT_K is 1 would halve
it, at the price of rounding each slot before the sum; not done).

Layouts: a weight is [E, N, K] (out, in) with any strides (GPT-OSS's (in, out) tensors come as transposed views);
the kernel reads a [BLOCK_K, BLOCK_N] tile of W^T. 4-bit: qweight int32 [E, K/8, N], scales [E, K/G, N], zeros
uint8 [E, K/G, N], N contiguous: a K step reads [BLOCK_K/8, BLOCK_N] words once (16-byte loads along N), unpacks
them with a shift, a mask and a reshape, and, lying inside one group, reads one row of scales and zeros.

Tiles: BLOCK_M rows of the sorted pairs (one expert per block) x BLOCK_N outputs, a K loop of BLOCK_K. With BLOCK_M
>= 16 the inner product is tl.dot (tensor cores); under 16 (decode: few tokens per expert) it is a broadcast
multiply and a sum over K, a GEMV over a few rows, and the down GEMM may split K (see tuning.py). Compiled for
sm_90 (python -m moekern.ops.compile_check --resources): dense tiles use wgmma fed by cp.async; the 4-bit tiles,
dequantized in registers, use mma.sync; no variant spills.

No host sync and no data-dependent Python: every grid is the static bound of the work lists (a block past the used
rows reads block_expert = -1 and returns), so the whole call can be captured in a CUDA graph.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekern.ops import routing, tuning
from moekern.ops.reference import Activation

ACT = {"silu": 0, "clamped_swiglu": 1}


# Triton decides at decoration time whether a kernel is interpreted; the host code follows the same decision.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Quant4:
    """A stacked 4-bit weight in moekern's layout (moekern.quant.layout) for W [E, N, K]."""

    qweight: torch.Tensor  # int32 [E, K // 8, N]
    scales: torch.Tensor  # [E, K // G, N]
    zeros: torch.Tensor  # uint8 [E, K // G, N]
    # AWQ's per-expert input scale [E, K] where it could not be folded into the op before (moekern.modules.quant):
    # W_eff[e] = dequantize(W[e]) * input_scale[e][None, :], applied to the activation tile in the K loop
    input_scale: torch.Tensor | None = None

    @property
    def shape(self):  # the shape of the dense W it stands for
        e, rows, n = self.qweight.shape
        return (e, n, rows * 8)

    @property
    def group_size(self) -> int:
        return self.qweight.shape[1] * 8 // self.scales.shape[1]


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_w_tile(w_ptr, s_ptr, z_ptr, e, n_rows, k0, n_ok, K,
                 stride_we, stride_wn, stride_wk, stride_se, stride_sg, stride_sn,
                 BLOCK_K: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """W[e, n_rows, k0:k0+BLOCK_K]^T as a [BLOCK_K, BLOCK_N] tile, zero past K.

    4-bit: the [BLOCK_K / 8, BLOCK_N] int32 words are read once (coalesced along N), each word's 8 nibbles spread
    by a shift and a mask into [BLOCK_K / 8, 8, BLOCK_N] and reshaped to rows 8r + j (the packing order), then
    (q - zero) * scale. The caller's K step lies in one group (BLOCK_K divides GROUP, K steps start at multiples of
    BLOCK_K), so scales and zeros are one row per step. K is a multiple of 8, so masking whole words is exact."""
    e = e.to(tl.int64)  # E x (N x K) passes 2^31 elements in large models (DeepSeek-V3: 256 x 29M)
    if QUANT:
        offs_r = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(w_ptr + e * stride_we + offs_r[:, None] * stride_wk + n_rows[None, :] * stride_wn,
                        mask=(offs_r * 8 < K)[:, None] & n_ok[None, :], other=0)
        shifts = tl.arange(0, 8) * 4
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q, (BLOCK_K, q.shape[2]))
        g = k0 // GROUP
        scale = tl.load(s_ptr + e * stride_se + g * stride_sg + n_rows * stride_sn, mask=n_ok, other=0.0)
        zero = tl.load(z_ptr + e * stride_se + g * stride_sg + n_rows * stride_sn, mask=n_ok, other=0)
        w = (q.to(tl.float32) - zero.to(tl.float32)[None, :]) * scale.to(tl.float32)[None, :]
        return w.to(scale.dtype)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + e * stride_we + offs_k[:, None] * stride_wk + n_rows[None, :] * stride_wn,
                       mask=(offs_k < K)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _scale_input(a, in_scale_ptr, e, offs_k, k_ok, stride_ie, HAS_IN_SCALE: tl.constexpr):
    """a [BM, BK] times expert e's input scale over columns offs_k (AWQ, unfolded): x * s @ W^T = x @ (W * s)^T."""
    if HAS_IN_SCALE:
        s = tl.load(in_scale_ptr + e.to(tl.int64) * stride_ie + offs_k, mask=k_ok, other=0.0)
        a = (a.to(tl.float32) * s.to(tl.float32)[None, :]).to(a.dtype)
    return a


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BM, BN] fp32 += a [BM, BK] @ b [BK, BN]. DOT_FP32: the interpreter (its bf16 tl.dot is wrong) and fp32
    weights (exact fp32, not tf32). Without USE_DOT (BLOCK_M < 16, where tl.dot cannot go): broadcast and sum."""
    if USE_DOT:
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc


# ----------------------------------------------------------------------------------------------------------------------
# GEMM 1: gate_up with the gated activation in the epilogue
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def gate_up_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, in_scale_ptr, inter_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, K, I, stride_xt,
    stride_we, stride_wn, stride_wk, stride_se, stride_sg, stride_sn, stride_be, stride_ie, stride_it,
    alpha, limit,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:  # -1: a block past the used rows; it does nothing (the grid is the static bound)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs  # padding rows hold num_pairs
        token = pairs // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        # silu: gate rows n, up rows I + n. clamped_swiglu (GPT-OSS): interleaved, gate 2n, up 2n + 1.
        if ACT == 0:
            gate_rows = offs_n
            up_rows = offs_n + I
        else:
            gate_rows = 2 * offs_n
            up_rows = 2 * offs_n + 1
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                        mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            a = _scale_input(a, in_scale_ptr, e, offs_k, offs_k < K, stride_ie, HAS_IN_SCALE)
            wg = _load_w_tile(w_ptr, s_ptr, z_ptr, e, gate_rows, k0, n_ok, K, stride_we, stride_wn, stride_wk,
                              stride_se, stride_sg, stride_sn, BLOCK_K, QUANT, GROUP)
            acc_g = _mma(acc_g, a, wg, USE_DOT, DOT_FP32)
            wu = _load_w_tile(w_ptr, s_ptr, z_ptr, e, up_rows, k0, n_ok, K, stride_we, stride_wn, stride_wk,
                              stride_se, stride_sg, stride_sn, BLOCK_K, QUANT, GROUP)
            acc_u = _mma(acc_u, a, wu, USE_DOT, DOT_FP32)
        if HAS_BIAS:
            acc_g += tl.load(b_ptr + e * stride_be + gate_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_ptr + e * stride_be + up_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 0:
            h = acc_g * tl.sigmoid(acc_g) * acc_u
        else:
            gate = tl.minimum(acc_g, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        tl.store(inter_ptr + pairs[:, None] * stride_it + offs_n[None, :], h.to(inter_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# GEMM 2: down with the routing weight in the epilogue; split-K partials for the decode path
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def down_kernel(
    inter_ptr, w_ptr, s_ptr, z_ptr, b_ptr, in_scale_ptr, weight_ptr, part_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, K, N, k_per_split, stride_it,
    stride_we, stride_wn, stride_wk, stride_se, stride_sg, stride_sn, stride_be, stride_ie, stride_ps, stride_pp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(inter_ptr + pairs[:, None] * stride_it + offs_k[None, :],
                        mask=row_ok[:, None] & (offs_k < k_end)[None, :], other=0.0)
            a = _scale_input(a, in_scale_ptr, e, offs_k, offs_k < k_end, stride_ie, HAS_IN_SCALE)
            w = _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n, k0, n_ok, k_end, stride_we, stride_wn, stride_wk,
                             stride_se, stride_sg, stride_sn, BLOCK_K, QUANT, GROUP)
            acc = _mma(acc, a, w, USE_DOT, DOT_FP32)
        if HAS_BIAS:  # the bias once, in split 0; it is scaled by the routing weight like the product
            bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + offs_n, mask=n_ok & (split == 0), other=0.0)
            acc += bias.to(tl.float32)[None, :]
        acc *= tl.load(weight_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(part_ptr + split * stride_ps + pairs[:, None] * stride_pp + offs_n[None, :], acc,
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def slot_sum_kernel(part_ptr, ids_ptr, out_ptr, N, stride_ps, stride_pp, stride_ot,
                    TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum over slots, then splits, in a fixed order; a slot with NO_EXPERT was never written: read as 0."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for s in tl.static_range(TOP_K):
        live = tl.load(ids_ptr + t * TOP_K + s) >= 0
        for sp in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + sp * stride_ps + (t * TOP_K + s) * stride_pp + offs_n, mask=n_ok & live,
                           other=0.0)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------
_alloc = torch.empty  # tests swap in a NaN-filling allocator: an element read before it is written then shows


def _weight_args(w):
    """(w, scales, zeros, strides e/n/k, scale strides e/g/n, quant, group) for a dense [E, N, K] or a Quant4."""
    if isinstance(w, Quant4):
        q, s, z = w.qweight, w.scales, w.zeros.contiguous()
        if s.stride() != z.stride():
            s = s.contiguous()
        group = w.group_size
        if not tuning.group_size_supported(group):
            raise ValueError(f"the 4-bit kernels need a power-of-two group size of at least 16, not {group}")
        return (q, s, z, q.stride(0), q.stride(2), q.stride(1), s.stride(0), s.stride(1), s.stride(2), True, group)
    return (w, w, w, w.stride(0), w.stride(1), w.stride(2), 0, 0, 0, False, 1)


def _input_scale_args(w, fallback):
    """(pointer, expert stride, present) of a Quant4's input scale; `fallback` is a dummy pointer when absent."""
    scale = w.input_scale if isinstance(w, Quant4) else None
    if scale is None:
        return fallback, 0, False
    scale = scale.contiguous()
    return scale, scale.stride(0), True


def _dot_fp32(x: torch.Tensor, w) -> bool:
    dense_fp32 = not isinstance(w, Quant4) and w.dtype == torch.float32
    return INTERPRETED or x.dtype == torch.float32 or dense_fp32


def gate_up(x, w, b, act: Activation, sorted_pairs, block_expert, num_pairs, top_k, bm, num_tokens):
    """GEMM 1 over the work lists -> inter [num_pairs, I] in x's dtype (rows of skipped pairs left unwritten)."""
    e, n2, k = w.shape
    i = n2 // 2
    wargs = _weight_args(w)
    cfg = tuning.config("gate_up", i, k, wargs[-2], num_tokens, bm, block_expert.numel(),
                        wargs[-1] if wargs[-2] else None)
    inter = _alloc(max(num_pairs, 1), i, dtype=x.dtype, device=x.device)
    in_scale, stride_ie, has_in_scale = _input_scale_args(w, x)
    grid = (block_expert.numel(), triton.cdiv(i, cfg.BLOCK_N))
    gate_up_kernel[grid](
        x, *wargs[:3], b if b is not None else x, in_scale, inter, sorted_pairs, block_expert,
        num_pairs, k, i, x.stride(0), *wargs[3:9], b.stride(0) if b is not None else 0, stride_ie, inter.stride(0),
        float(act.alpha), float(act.limit),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, QUANT=wargs[-2], GROUP=wargs[-1],
        ACT=ACT[act.kind], HAS_BIAS=b is not None, HAS_IN_SCALE=has_in_scale, USE_DOT=bm >= 16,
        DOT_FP32=_dot_fp32(x, w),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return inter


def down(inter, w, b, pair_weights, sorted_pairs, block_expert, num_pairs, bm, num_tokens):
    """GEMM 2 -> part [SPLIT_K, num_pairs, H] fp32, each row times its routing weight (skipped pairs unwritten)."""
    e, n, k = w.shape
    wargs = _weight_args(w)
    cfg = tuning.config("down", n, k, wargs[-2], num_tokens, bm, block_expert.numel(),
                        wargs[-1] if wargs[-2] else None)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.SPLIT_K), cfg.BLOCK_K) * cfg.BLOCK_K
    split = triton.cdiv(k, k_per_split)
    part = _alloc(split, max(num_pairs, 1), n, dtype=torch.float32, device=inter.device)
    in_scale, stride_ie, has_in_scale = _input_scale_args(w, inter)
    grid = (block_expert.numel(), triton.cdiv(n, cfg.BLOCK_N), split)
    down_kernel[grid](
        inter, *wargs[:3], b if b is not None else inter, in_scale, pair_weights, part, sorted_pairs, block_expert,
        num_pairs, k, n, k_per_split, inter.stride(0), *wargs[3:9], b.stride(0) if b is not None else 0,
        stride_ie, part.stride(0), part.stride(1),
        BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, QUANT=wargs[-2], GROUP=wargs[-1],
        HAS_BIAS=b is not None, HAS_IN_SCALE=has_in_scale, USE_DOT=bm >= 16, DOT_FP32=_dot_fp32(inter, w),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def slot_sum(part, ids, out_dtype):
    split, _, n = part.shape
    t, k = ids.shape
    out = _alloc(t, n, dtype=out_dtype, device=part.device)
    block_n = min(1024, triton.next_power_of_2(n))
    slot_sum_kernel[(t, triton.cdiv(n, block_n))](part, ids, out, n, part.stride(0), part.stride(1), out.stride(0),
                                                  TOP_K=k, SPLIT_K=split, BLOCK_N=block_n)
    return out


def moe_experts(x, ids, weights, w_gate_up, w_down, b_gate_up=None, b_down=None, act: Activation = Activation(),
                block_m: int | None = None):
    """reference.moe_experts in Triton. x [T, H]; ids, weights [T, k] (NO_EXPERT = -1 not computed); w_gate_up
    [E, 2I, H] and w_down [E, H, I] dense (any strides) or Quant4; biases [E, 2I], [E, H]. Returns [T, H] in x's
    dtype. Every launch's grid follows from the shapes alone: no host sync, CUDA-graph and torch.compile safe."""
    num_tokens, top_k = ids.shape
    num_experts = w_gate_up.shape[0]
    x = x.contiguous()
    ids32 = ids.to(torch.int32).contiguous()
    num_pairs = num_tokens * top_k
    bm = block_m or tuning.block_m(num_tokens, top_k, num_experts)
    sorted_pairs, block_expert, _ = routing.align_block_size(ids32, num_experts, bm)
    pair_weights = weights.reshape(-1).contiguous()
    inter = gate_up(x, w_gate_up, b_gate_up, act, sorted_pairs, block_expert, num_pairs, top_k, bm, num_tokens)
    part = down(inter, w_down, b_down, pair_weights, sorted_pairs, block_expert, num_pairs, bm, num_tokens)
    return slot_sum(part, ids32, x.dtype)
