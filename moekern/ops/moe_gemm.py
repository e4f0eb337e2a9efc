"""Fused grouped MoE GEMM in Triton over the work lists of moekern.ops.routing: bf16/fp16/fp32 weights, or
moekern's 4-bit layout (moekern.formats.layout) dequantized in registers. Oracle: reference.moe_experts.

    pairs      p = t * top_k + s, one per (token, slot); a slot whose id is NO_EXPERT has no pair in the lists
    gate_up    inter[p, :I] = act(x[t] @ W_gate_up[e].T + b)     act in the epilogue; the intermediate written once
    down       part[split, p, :H] = weight[p] * (inter[p] @ W_down[e].T + b)   weight in the epilogue
    slot sum   out[t] = sum over s, split of part[split, t*k + s]   a skipped slot is read as 0, never computed

Why per-slot outputs and a second small kernel instead of atomics into out[t]: a sum in a fixed order gives the
same bits on every run (atomics add in arrival order), needs no zero fill of `out` before the GEMM (one launch and
one write of out less), works for bf16 out without bf16 atomics, and absorbs the down GEMM's split-K for free.

Orientation (swap AB, as vLLM/SGLang/Marlin do for few rows): every tile computes out^T = W @ x^T, acc [BLOCK_N,
BLOCK_M], so the weights are the MMA's M operand and the routed rows its N operand. That lets the decode path (one to
16 rows an expert) use the tensor cores at their smallest N, 16 (wgmma m64n16k16 on sm_90, mma.sync m16n8k16 on
sm_80), and lets 4-bit weights feed the MMA from registers: wgmma and mma.sync take their A operand from registers,
while wgmma's B must come from shared memory.

4-bit weights run on a tensor-core layout made once from moekern's (mma_pack, cached per weight by mma_words): each
lane's eight 4-bit values of one MMA fragment sit in one int32 word, in the register order Triton gives tl.dot's A
operand on the target (wgmma on sm_90, mma.sync on sm_80: two layouts, see MMA_N), and a lane's words for 64
consecutive k are 16 contiguous bytes. A K step is then one 16-byte cp.async per lane and 64 k, and the words,
decoded in place, are already the MMA's A fragments: no layout conversion and no shared-memory round trip of
dequantized values (the reshapes in _q4_decode only rename registers; the SASS has no STS in the loop). The decode of
one word is the lop3 / magic-number trick: (word >> 4i) & 0x000F000F | 0x43004300 gives two bf16 of value 128 + q,
and one fused multiply-add with -(128 + zero) leaves q - zero exactly, 1.4 instructions a weight in all
(tl.inline_asm_elementwise; Triton's interpreter cannot run PTX, so it takes a portable shift-and-mask path over the
same layout, and tests/test_ops_mma_layout.py emulates the PTX). K steps are whole quantization groups of 64 or more
(at decode up to five: tuning.decode_k_step): at decode each group's MMA result is multiplied by the group's scales
(fewest instructions); at prefill the scales go into the dequantization (one more multiply a pair) so that the MMAs
accumulate in place and stay in flight. Their zeros and scales come from a second load-time layout (mma_meta): a
lane's rows g and g + 8 side by side, so that each is one load at a fixed offset from one pointer, no masks, read a
step ahead, and one prmt turns a zero pair into the decoder's operands. Groups of 16 or 32 take a zero and scale per
16-k word from moekern's layout. The static report (python -m moekern.ops.compile_check --sass, in
benchmarks/results/static/) counts every variant's instructions.

Tiles: BLOCK_M rows of the sorted pairs (one expert per block) x BLOCK_N outputs, a K loop of BLOCK_K, split into
SPLIT_K ranges where the grid would leave SMs idle (tuning.py). gate_up's split-K partials are summed in a fixed
order by the last of the tile's programs to arrive (a counter per tile, reset by that program), which then applies
the activation: no extra launch. down's partials are summed by the slot-sum kernel. Programs are ordered in groups
of GROUP_M blocks so that tiles sharing weights run together.

No host sync and no data-dependent Python: every grid is a static bound of the work lists (a block past the used
rows reads block_expert = -1 and returns), so the whole call can be captured in a CUDA graph once the 4-bit layout
exists (the first eager call makes it, or mma_words before capture). Row offsets are int64: pairs x row stride
passes 2^31 in long prefills (DeepSeek-V3's part buffer from 37,450 tokens).
"""

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekern.ops import routing, tuning
from moekern.ops.reference import Activation

ACT = {"silu": 0, "clamped_swiglu": 1}


# Triton decides at decoration time whether a kernel is interpreted; the host code follows the same decision.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those bits; the kernels then take an fp32
# dot for bf16. A test that mends the interpreter's dot sets this to run the bf16 tl.dot path itself.
INTERPRETER_BF16_DOT = False


@dataclass(frozen=True)
class Quant4:
    """A stacked 4-bit weight in moekern's layout (moekern.formats.layout) for W [E, N, K]."""

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
# The tensor-core layout of 4-bit weights
# ----------------------------------------------------------------------------------------------------------------------
# A [BLOCK_N, BLOCK_K] A-operand tile of the MMA, per 16-row block and 64-k block, is 32 lanes x 4 words x 8 values:
# lane L = 4g + c, word j, value v. Where each lands is the register layout Triton gives the A operand of tl.dot:
#   kwidth 2 (wgmma, sm_90; PTX's mma.m16n8k16 fragment): row g + 8 v1, column 16 j + 2c + v0 + 8 v2
#   kwidth 8 (mma.sync as Triton lays it out on sm_80):   row g + 8 j0, column 32 j1 + 8c + v
# (v = 4 v2 + 2 v1 + v0, j = 2 j1 + j0). The decoder turns nibbles (i, i + 4) of a word into values (2i, 2i + 1):
# value v sits at nibble NIBBLE[v]. Words: [..., N / 16, K / 64, 32 lanes, 4 words]: a lane reads 16 contiguous bytes
# a 64-k block, and a 16-row block's K runs on in 512-byte steps. Either layout gives the same products on any GPU;
# the one that matches the compiler's saves a layout conversion through shared memory.
MMA_N, MMA_K = 16, 64
MMA_K_PAD = 256  # K is padded to whole K steps of the widest tile (zeros, against activations masked to zero)
MMA_N_PAD = 128  # and N to whole tiles of the widest BLOCK_N, so that no tile reads past a half's words
MMA_META_AHEAD = 2 * MMA_K_PAD  # mma_meta's groups run this far past K padded: the read a step ahead of the widest step
NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def mma_pack(q: torch.Tensor, kwidth: int = 2) -> torch.Tensor:
    """q uint8 [..., N, K] of 4-bit values (N % 16 == 0, K % 64 == 0) -> int32 words [..., N/16, K/64, 32, 4]."""
    *lead, n, k = q.shape
    if n % MMA_N or k % MMA_K:
        raise ValueError(f"mma_pack needs N % {MMA_N} == 0 and K % {MMA_K} == 0, got N={n}, K={k}")
    d = len(lead)
    if kwidth == 2:  # n = 16 nb + 8 v1 + g ; k = 64 kb + 16 j + 8 v2 + 2 c + v0
        q = q.reshape(*lead, n // 16, 2, 8, k // 64, 4, 2, 4, 2)
        q = q.permute(*range(d), d, d + 3, d + 2, d + 6, d + 4, d + 5, d + 1, d + 7)  # nb kb g c j v2 v1 v0
    else:  # n = 16 nb + 8 j0 + g ; k = 64 kb + 32 j1 + 8 c + v
        q = q.reshape(*lead, n // 16, 2, 8, k // 64, 2, 4, 8)
        q = q.permute(*range(d), d, d + 3, d + 2, d + 5, d + 4, d + 1, d + 6)  # nb kb g c j1 j0 v
    q = q.reshape(*lead, n // 16, k // 64, 32, 4, 8).to(torch.int64)
    shifts = 4 * torch.tensor(NIBBLE, dtype=torch.int64, device=q.device)
    words = (q << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def mma_unpack(words: torch.Tensor, kwidth: int = 2) -> torch.Tensor:
    """The inverse of mma_pack: int32 [..., N/16, K/64, 32, 4] -> q uint8 [..., N, K]."""
    *lead, nb, kb, lanes, j = words.shape
    d = len(lead)
    shifts = 4 * torch.tensor(NIBBLE, dtype=torch.int32, device=words.device)
    q = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., nb, kb, 32, 4, 8 (v)]
    if kwidth == 2:
        q = q.reshape(*lead, nb, kb, 8, 4, 4, 2, 2, 2)  # nb kb g c j v2 v1 v0
        q = q.permute(*range(d), d, d + 6, d + 2, d + 1, d + 4, d + 5, d + 3, d + 7)  # nb v1 g kb j v2 c v0
    else:
        q = q.reshape(*lead, nb, kb, 8, 4, 2, 2, 8)  # nb kb g c j1 j0 v
        q = q.permute(*range(d), d, d + 5, d + 2, d + 1, d + 4, d + 3, d + 6)  # nb j0 g kb j1 c v
    return q.reshape(*lead, nb * 16, kb * 64).to(torch.uint8)


def mma_kwidth(device: torch.device) -> int:
    """The A-fragment layout the target's tl.dot uses (see above): 2 on sm_90 (wgmma), 8 elsewhere (mma.sync)."""
    return 2 if tuning.target_arch(device) // 10 == 9 else 8


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return torch.nn.functional.pad(t, pad)


def mma_layout(w: Quant4, halves: int = 1, interleaved: bool = False, kwidth: int = 2) -> torch.Tensor:
    """moekern's 4-bit words of w -> the tensor-core words [E, halves, N'/16, K'/64, 32, 4] (padded with zeros).

    halves = 2 for gate_up: the gate and up rows go to separate halves (first I rows and last I rows, or even and odd
    rows where interleaved, as GPT-OSS stores them), each padded to MMA_N_PAD rows. Made one expert at a time so that
    the temporaries stay small next to the weights."""
    from moekern.formats import layout

    e, n, k = w.shape
    rows = n // halves
    kp, np_ = k + -k % MMA_K_PAD, rows + -rows % MMA_N_PAD
    out = torch.empty(e, halves, np_ // MMA_N, kp // MMA_K, 32, 4, dtype=torch.int32, device=w.qweight.device)
    for i in range(e):
        q = layout.unpack(w.qweight[i])  # [N, K]
        if interleaved:
            q = torch.stack([q[0::2], q[1::2]])
        else:
            q = q.reshape(halves, rows, k)
        out[i] = mma_pack(_pad_to(_pad_to(q, 1, MMA_N_PAD), 2, MMA_K_PAD), kwidth)
    return out


def mma_meta(w: Quant4, halves: int = 1, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """moekern's scales and zeros [E, K/G, N] -> (scales, zeros) for K steps of whole groups, each
    [E, N'/128, G', halves, 8, 8, 2]: per 128-row tile, group, half, 16-row block and row g < 8, the pair of rows
    g and g + 8. A lane's two rows are one load (zeros as an int16, scales as an int32 or int64), and every load of
    a K step, both halves, each 16-row block and each group, sits at a fixed offset from one pointer. Rows are
    padded like the words' (MMA_N_PAD), groups to K padded to MMA_K_PAD plus MMA_META_AHEAD (the kernels read a step
    ahead), with scale 0 and zero 0. Halves as in mma_layout. Scales keep their dtype, zeros uint8: 3 bytes a
    row and group with 16-bit scales, as in moekern's layout."""
    e, n, k = w.shape
    rows, group = n // halves, w.group_size
    if MMA_K_PAD % group:
        raise ValueError(f"the tensor-core meta layout needs groups that divide {MMA_K_PAD}, not {group}")
    np_, gp = rows + -rows % MMA_N_PAD, (k + -k % MMA_K_PAD + MMA_META_AHEAD) // group

    def arrange(t):  # [E, G, N] -> [E, N'/128, G', halves, 8, 8, 2]
        g = t.shape[1]
        if interleaved:
            t = torch.stack([t[:, :, 0::2], t[:, :, 1::2]], 1)
        else:
            t = t.reshape(e, g, halves, rows).transpose(1, 2)
        t = _pad_to(_pad_to(t, 3, MMA_N_PAD), 2, gp)  # [E, halves, G', N'], N' = 128 tile + 16 nb + 8 hi + g
        t = t.reshape(e, halves, gp, np_ // 128, 8, 2, 8).permute(0, 3, 2, 1, 4, 6, 5)  # e tile grp half nb g hi
        return t.contiguous()

    return arrange(w.scales), arrange(w.zeros)


_MMA_CACHE: dict[tuple, tuple] = {}


def _cached(kind: str, sources: tuple, params: tuple, make):
    """make(), kept per (kind, first source tensor) while that tensor lives and no source is modified in place."""
    key = (kind, id(sources[0]))
    stamp = tuple((t.data_ptr(), t.shape, t._version) for t in sources) + params
    hit = _MMA_CACHE.get(key)
    if hit is not None and hit[0]() is sources[0] and hit[1] == stamp:
        return hit[2]
    value = make()
    _MMA_CACHE[key] = (weakref.ref(sources[0], lambda _, key=key: _MMA_CACHE.pop(key, None)), stamp, value)
    return value


def mma_words(w: Quant4, halves: int = 1, interleaved: bool = False, kwidth: int = 2) -> torch.Tensor:
    """mma_layout(w), made once per weight tensor and kept while it lives (and is not modified in place).

    The cache holds a second copy of the 4-bit words next to the module's (saved) layout. Call it once before a CUDA
    graph capture (an eager forward does), so that the capture records only the GEMMs."""
    return _cached("words", (w.qweight,), (halves, interleaved, kwidth),
                   lambda: mma_layout(w, halves, interleaved, kwidth))


def mma_meta_cached(w: Quant4, halves: int = 1, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """mma_meta(w), made once per scales tensor like mma_words (a second copy of the scales and zeros)."""
    return _cached("meta", (w.scales, w.zeros), (halves, interleaved), lambda: mma_meta(w, halves, interleaved))


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------
def _decode_asm(dtype: str, scaled: bool) -> str:
    """The PTX that turns one word ($4) into registers $0..$3 = values (0, 1), (2, 3), (4, 5), (6, 7): for i = 0..3,
    lop3 puts nibbles i and i + 4 (word >> 4i, masked) into the mantissas of MAGIC + q (two bf16 or f16, MAGIC 128 or
    1024: the mantissa's last bit is worth 1), one fma with 1 and -(MAGIC + zero) leaves q - zero exactly (zero: $5
    for the even registers, row g; $9 for the odd ones, row g + 8), and where scaled one more fma with the row's
    scale ($13, $17) and -0 rounds the product once, as the reference's dequantization does."""
    magic, one, fma = (("0x43004300", "0x3F803F80", "fma.rn.bf16x2") if dtype == "bf16" else
                       ("0x64006400", "0x3C003C00", "fma.rn.f16x2"))
    lines = [".reg .b32 t, one, nz;", f"mov.b32 one, {one};", "mov.b32 nz, 0x80008000;"]
    for i in range(4):
        zero, scale = ("$5", "$13") if i % 2 == 0 else ("$9", "$17")
        if i:
            lines.append(f"shr.b32 t, $4, {4 * i};")
        lines.append(f"lop3.b32 ${i}, {'t' if i else '$4'}, 0x000f000f, {magic}, 0xea;")
        lines.append(f"{fma} ${i}, ${i}, one, {zero};")
        if scaled:
            lines.append(f"{fma} ${i}, ${i}, {scale}, nz;")
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_BF16 = tl.constexpr(_decode_asm("bf16", False))
_ASM_BF16_SCALED = tl.constexpr(_decode_asm("bf16", True))
_ASM_F16 = tl.constexpr(_decode_asm("f16", False))
_ASM_F16_SCALED = tl.constexpr(_decode_asm("f16", True))
# four output registers; the word ($4), then four copies of each broadcast operand (pack=4), the asm reads the first
_OPERANDS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 8)
_SCALED_OPERANDS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 16)


@triton.jit
def _decode_words_asm(wb, zlo, zhi, slo, shi, BF16: tl.constexpr, SCALED: tl.constexpr):
    """uint8 [..., 4] bytes of one word a lane (pack=4 hands the asm the four bytes as one register) -> two tensors of
    4 values, (v0..v3) and (v4..v7), by _decode_asm. zlo / zhi: -(MAGIC + zero) of rows g / g + 8 twice (a bf16x2 or
    f16x2 in an int32); slo / shi: the scales of those rows twice (SCALED only)."""
    if BF16:
        if SCALED:
            r0, r1 = tl.inline_asm_elementwise(asm=_ASM_BF16_SCALED, constraints=_SCALED_OPERANDS,
                                               args=[wb, zlo, zhi, slo, shi], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)
        else:
            r0, r1 = tl.inline_asm_elementwise(asm=_ASM_BF16, constraints=_OPERANDS, args=[wb, zlo, zhi],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        if SCALED:
            r0, r1 = tl.inline_asm_elementwise(asm=_ASM_F16_SCALED, constraints=_SCALED_OPERANDS,
                                               args=[wb, zlo, zhi, slo, shi], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            r0, r1 = tl.inline_asm_elementwise(asm=_ASM_F16, constraints=_OPERANDS, args=[wb, zlo, zhi],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return r0, r1


@triton.jit
def _q4_words(w_ptr, e, half, n0, k0, stride_we, stride_wh, stride_wnb, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """Pointers to the words of rows n0.. and columns k0.. of half `half` of a 4-bit weight in the tensor-core
    layout: each lane's 16 contiguous bytes of every 64-k block, [KB, NB, 8, 4, 16] bytes (ASM: the asm decoder takes
    a word as its four bytes) or [KB, NB, 8, 4, 4] int32 words. The caller advances them by _q4_step a K step."""
    KB: tl.constexpr = BLOCK_K // 64
    NB: tl.constexpr = BLOCK_N // 16
    kb = tl.arange(0, KB)[:, None, None, None, None]
    nb = tl.arange(0, NB)[None, :, None, None, None]
    lane = tl.arange(0, 8)[None, None, :, None, None] * 4 + tl.arange(0, 4)[None, None, None, :, None]
    base = e * stride_we + half * stride_wh + (n0 // 16) * stride_wnb + (k0 // 64) * 512
    if ASM:
        ptrs = w_ptr + base + nb * stride_wnb + kb * 512 + lane * 16 + tl.arange(0, 16)[None, None, None, None, :]
    else:
        ptrs = w_ptr + base // 4 + nb * (stride_wnb // 4) + kb * 128 + lane * 4 + \
            tl.arange(0, 4)[None, None, None, None, :]
    return ptrs


@triton.jit
def _q4_step(BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """How far _q4_words' pointers move a K step: BLOCK_K / 64 blocks of 512 bytes."""
    STEP: tl.constexpr = (BLOCK_K // 64) * (512 if ASM else 128)
    return STEP


@triton.jit
def _q4_meta_ptrs(z_ptr, s_ptr, e, n0, grp, stride_me, stride_mt, HALVES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the row pairs (g, g + 8) of zeros (two uint8 as one uint16) and scales (two as one int32, or int64
    for fp32 scales) of each 16-row block of rows n0.. in group `grp` and half 0, in the tensor-core meta layout
    (mma_meta; strides in pairs), shaped [1, NB, 8, 1, 1, 1]: a lane's rows, as _q4_decode broadcasts them. Half h
    is 64 pairs on, the next group HALVES * 64: every load of a step is a fixed offset from these two pointers."""
    NB: tl.constexpr = BLOCK_N // 16
    PAIR: tl.constexpr = tl.int32 if s_ptr.dtype.element_ty.primitive_bitwidth == 16 else tl.int64
    nb = (n0 % 128) // 16 + tl.arange(0, NB)[None, :, None, None, None, None]
    g = tl.arange(0, 8)[None, None, :, None, None, None]
    off = e * stride_me + (n0 // 128) * stride_mt + grp * (HALVES * 64) + nb * 8 + g
    return z_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + off, s_ptr.to(tl.pointer_type(PAIR), bitcast=True) + off


@triton.jit
def _q4_step_meta(zp, sp, half: tl.constexpr, HALVES: tl.constexpr, SUB: tl.constexpr):
    """The packed (zeros, scales) pairs of half `half` for each of the SUB groups of a K step: a flat tuple of 2 SUB
    tensors, unpacked where used (_q4_unpair), so that a step read ahead holds one register a pair. No masks and no
    clamping: mma_meta is padded with zeros to whole tiles of rows and a step of groups past K."""
    meta = ()
    for sub in tl.static_range(SUB):
        off = (sub * HALVES + half) * 64
        meta = meta + (tl.load(zp + off), tl.load(sp + off))
    return meta


@triton.jit
def _q4_unpair(zz, ss, SDT: tl.constexpr, F32: tl.constexpr):
    """(zero of row g, zero of row g + 8) as int32 and (scale of g, scale of g + 8), in SDT or (F32) in fp32, from
    their packed pairs. bf16 to fp32 is a shift or a mask of the pair's bits."""
    z = zz.to(tl.int32)  # zero-extended: the high byte is row g + 8's zero
    if SDT == tl.bfloat16 and F32:
        s_lo = (ss << 16).to(tl.float32, bitcast=True)
        s_hi = (ss & -65536).to(tl.float32, bitcast=True)  # & 0xFFFF0000
    elif SDT.primitive_bitwidth == 16:
        s_lo = (ss & 0xFFFF).to(tl.int16).to(SDT, bitcast=True)
        s_hi = (ss >> 16).to(tl.int16).to(SDT, bitcast=True)
    else:
        s_lo = ss.to(tl.int32).to(SDT, bitcast=True)
        s_hi = (ss >> 32).to(tl.int32).to(SDT, bitcast=True)
    if F32:
        s_lo = s_lo.to(tl.float32)
        s_hi = s_hi.to(tl.float32)
    return z & 0xFF, z >> 8, s_lo, s_hi


def _meta_asm(dtype: str, scaled: bool) -> str:
    """PTX from a packed zero pair ($4 or $2: bytes z_g, z_g+8) and, where scaled, a packed 16-bit scale pair ($5)
    to the decoder's operands: -(MAGIC + zero) of row g ($0) and g + 8 ($1) as two equal halves (bytes zero, the
    magic's sign-and-exponent byte, zero, that byte: one prmt each), and each row's scale twice ($2, $3)."""
    neg = "0xC3" if dtype == "bf16" else "0xE4"
    z = "$4" if scaled else "$2"
    lines = [".reg .b32 m;", f"mov.b32 m, {neg};", f"prmt.b32 $0, {z}, m, 0x4040;", f"prmt.b32 $1, {z}, m, 0x4141;"]
    if scaled:
        lines += ["prmt.b32 $2, $5, 0, 0x1010;", "prmt.b32 $3, $5, 0, 0x3232;"]
    return "{\n" + "\n".join(lines) + "\n}"


_META_BF16 = tl.constexpr(_meta_asm("bf16", False))
_META_BF16_SCALED = tl.constexpr(_meta_asm("bf16", True))
_META_F16 = tl.constexpr(_meta_asm("f16", False))
_META_F16_SCALED = tl.constexpr(_meta_asm("f16", True))


@triton.jit
def _meta_words(zz, ss, BF16: tl.constexpr, SCALED: tl.constexpr):
    """The decoder's zero (and scale) operands of rows g and g + 8 from their packed pairs (_meta_asm): four int32
    tensors (the zero words again in place of the scales where not SCALED). SCALED needs scales in the activations'
    16-bit dtype."""
    z = zz.to(tl.int32)
    if SCALED:
        if BF16:
            z_lo, z_hi, s_lo, s_hi = tl.inline_asm_elementwise(
                asm=_META_BF16_SCALED, constraints="=r,=r,=r,=r,r,r", args=[z, ss],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            z_lo, z_hi, s_lo, s_hi = tl.inline_asm_elementwise(
                asm=_META_F16_SCALED, constraints="=r,=r,=r,=r,r,r", args=[z, ss],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        if BF16:
            z_lo, z_hi = tl.inline_asm_elementwise(asm=_META_BF16, constraints="=r,=r,r", args=[z],
                                                   dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            z_lo, z_hi = tl.inline_asm_elementwise(asm=_META_F16, constraints="=r,=r,r", args=[z],
                                                   dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        s_lo, s_hi = z_lo, z_hi
    return z_lo, z_hi, s_lo, s_hi


@triton.jit
def _q4_group_acc(acc, wp, xt, zz, ss, sub: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                  DT: tl.constexpr, SDT: tl.constexpr, ASM: tl.constexpr, KW: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += dequantize(W)[rows, group `sub` of the K step] @ xt, factored (decode): the MMA takes q - zero and its
    result is multiplied by the rows' scales, put in the order of the MMA's rows (16 nb + 8 hi + g) so that they meet
    it without a layout conversion: the fewest instructions, but each wgmma is waited for. The group's words start
    sub * GROUP / 64 blocks past wp; its zeros and scales come packed in zz, ss (_q4_step_meta)."""
    NB: tl.constexpr = BLOCK_N // 16
    wp = wp + sub * _q4_step(GROUP, ASM)
    if ASM:  # the asm decoder's zero operands straight from the pair
        z_lo, z_hi = _meta_words(zz, ss, DT == tl.bfloat16, False)[:2]
    else:
        z_lo, z_hi = _q4_unpair(zz, ss, SDT, False)[:2]
    w = _q4_decode(wp, z_lo, z_hi, z_lo, z_hi, BLOCK_N, GROUP, DT, ASM, False, KW, ASM)
    s_lo, s_hi = _q4_unpair(zz, ss, SDT, True)[2:]
    s = tl.join(s_lo.reshape(NB, 8), s_hi.reshape(NB, 8)).permute(0, 2, 1).reshape(BLOCK_N)
    return _mma(acc, w, xt, s, True, DOT_FP32)


@triton.jit
def _stack_groups(a, b, KB: tl.constexpr):
    """Two groups' [1, NB, 8, 1, 1, 1] -> [KB, NB, 8, 1, 1, 1]: the step's first KB / 2 64-k blocks take a, the
    rest b (registers only: each lane already holds both)."""
    NB: tl.constexpr = a.shape[1]
    t = tl.join(a, b).permute(6, 0, 1, 2, 3, 4, 5)  # [2, 1, NB, 8, 1, 1, 1]
    return tl.broadcast_to(t, (2, KB // 2, NB, 8, 1, 1, 1)).reshape(KB, NB, 8, 1, 1, 1)


@triton.jit
def _q4_step_acc(acc, wp, xt, meta, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr, DT: tl.constexpr, SDT: tl.constexpr, ASM: tl.constexpr, KW: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """acc += dequantize(W)[rows, K step] @ xt for a step of one or two whole groups, scales in the dequantization,
    decoded at once and one MMA: the asynchronous wgmma accumulates in place and stays in flight into the next step
    (a dot a group would wait for the first). meta: _q4_step_meta's tuple; each 64-k block takes its group's zeros
    and scales."""
    NG: tl.constexpr = BLOCK_K // GROUP
    KB: tl.constexpr = BLOCK_K // 64
    tl.static_assert(NG == 1 or NG == 2, "prefill steps are one or two groups")
    WORDS: tl.constexpr = ASM and SDT == DT  # the asm decoder's operands straight from the pairs
    if WORDS:
        z_lo, z_hi, s_lo, s_hi = _meta_words(meta[0], meta[1], DT == tl.bfloat16, True)
    else:
        z_lo, z_hi, s_lo, s_hi = _q4_unpair(meta[0], meta[1], SDT, False)
    if NG == 2:
        if WORDS:
            z_lo1, z_hi1, s_lo1, s_hi1 = _meta_words(meta[2], meta[3], DT == tl.bfloat16, True)
        else:
            z_lo1, z_hi1, s_lo1, s_hi1 = _q4_unpair(meta[2], meta[3], SDT, False)
        z_lo = _stack_groups(z_lo, z_lo1, KB)
        z_hi = _stack_groups(z_hi, z_hi1, KB)
        s_lo = _stack_groups(s_lo, s_lo1, KB)
        s_hi = _stack_groups(s_hi, s_hi1, KB)
    w = _q4_decode(wp, z_lo, z_hi, s_lo, s_hi, BLOCK_N, BLOCK_K, DT, ASM, True, KW, WORDS)
    return _mma(acc, w, xt, acc, False, DOT_FP32)


@triton.jit
def _q4_scaled_meta(z_ptr, s_ptr, e, half, n0, k0, N, num_groups, stride_se, stride_sg, stride_sn, half_col,
                    N_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Zeros and scales of rows g and g + 8 at the group of each 64-k block of the step at k0 (each 16-k word where
    groups are narrower), [KB, NB, 8, 1, 4 or 1, 1]: the scale goes into the dequantization. Groups past K read zero
    and scale 0."""
    KB: tl.constexpr = BLOCK_K // 64
    NB: tl.constexpr = BLOCK_N // 16
    JG: tl.constexpr = 4 if GROUP < 64 else 1
    kb = tl.arange(0, KB)[:, None, None, None, None, None]
    j = tl.arange(0, JG)[None, None, None, None, :, None]
    grp = (k0 + 64 * kb + 16 * j) // GROUP
    row = n0 + tl.arange(0, NB)[None, :, None, None, None, None] * 16 + tl.arange(0, 8)[None, None, :, None, None, None]
    meta = e * stride_se + grp * stride_sg + (row * N_MUL + half * half_col) * stride_sn
    hi = 8 * N_MUL * stride_sn
    ok_lo = (row < N) & (grp < num_groups)
    ok_hi = (row + 8 < N) & (grp < num_groups)
    z_lo = tl.load(z_ptr + meta, mask=ok_lo, other=0).to(tl.int32)
    z_hi = tl.load(z_ptr + meta + hi, mask=ok_hi, other=0).to(tl.int32)
    s_lo = tl.load(s_ptr + meta, mask=ok_lo, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + meta + hi, mask=ok_hi, other=0.0).to(tl.float32)
    return z_lo, z_hi, s_lo, s_hi


@triton.jit
def _q4_decode(wp, z_lo, z_hi, s_lo, s_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
               ASM: tl.constexpr, SCALED: tl.constexpr, KW: tl.constexpr, WORDS: tl.constexpr = False):
    """The A operand [BLOCK_N, BLOCK_K] from the words at wp (_q4_words): q - zero in DT, times the scale where
    SCALED. Zeros and scales of rows g (lo) and g + 8 (hi) broadcast over the words: in the kwidth-2 layout a word
    holds both rows (values 2, 3, 6, 7 are row g + 8), in the kwidth-8 layout word j holds row g + 8 (j % 2).
    WORDS (ASM only): they come as the asm's operands already (_meta_words)."""
    KB: tl.constexpr = BLOCK_K // 64
    NB: tl.constexpr = BLOCK_N // 16
    jj = tl.arange(0, 4)[None, None, None, None, :, None]
    if ASM:
        wb = tl.load(wp).reshape(KB, NB, 8, 4, 4, 4)  # word j, its 4 bytes: pack=4 hands the asm one word
        # -(MAGIC + zero) twice, as the bits of a bf16x2 / f16x2: the magic's sign bit set, the zero in the mantissa
        NEG: tl.constexpr = 0xC300 if DT == tl.bfloat16 else 0xE400
        if WORDS:
            zlo, zhi, slo, shi = z_lo, z_hi, s_lo, s_hi
        else:
            zlo = (NEG | z_lo) * 0x10001
            zhi = (NEG | z_hi) * 0x10001
        if SCALED and not WORDS:
            slo = s_lo.to(DT).to(tl.uint16, bitcast=True).to(tl.int32) * 0x10001
            shi = s_hi.to(DT).to(tl.uint16, bitcast=True).to(tl.int32) * 0x10001
        elif not SCALED:
            slo = zlo
            shi = zhi
        if KW != 2:  # one row a word: its zero (and scale) for all four registers
            zlo = tl.where((jj & 1) == 0, zlo, zhi)
            zhi = zlo
            slo = tl.where((jj & 1) == 0, slo, shi)
            shi = slo
        r0, r1 = _decode_words_asm(wb, zlo, zhi, slo, shi, DT == tl.bfloat16, SCALED)
        v = tl.join(r0, r1)  # [KB, NB, 8, 4, 4 words, 4 values, 2 halves]: values 4 * half + i
        v = v.permute(0, 1, 2, 3, 4, 6, 5).reshape(KB, NB, 8, 4, 4, 8)
    else:  # the interpreter (and fp32): the same values by shift and mask, in fp32
        words = tl.load(wp)  # int32 [KB, NB, 8, 4, 4]
        vi = tl.arange(0, 8)[None, None, None, None, None, :]
        shift = (vi & 1) * 16 + (vi >> 1) * 4  # value v sits at bit 4 * NIBBLE[v]
        q = ((words[:, :, :, :, :, None] >> shift) & 0xF).to(tl.float32)
        if KW == 2:
            upper = ((vi >> 1) & 1) == 1
        else:
            upper = (jj & 1) == 1
        q = q - tl.where(upper, z_hi, z_lo).to(tl.float32)
        if SCALED:
            q = q * tl.where(upper, s_hi, s_lo)
        v = q.to(DT)
    # rows and columns of [kb, nb, g, c, j, v] (see mma_pack): only registers are renamed
    if KW == 2:
        v = v.reshape(KB, NB, 8, 4, 4, 2, 2, 2).permute(1, 6, 2, 0, 4, 5, 3, 7)  # nb v1 g | kb j v2 c v0
    else:
        v = v.reshape(KB, NB, 8, 4, 2, 2, 8).permute(1, 5, 2, 0, 4, 3, 6)  # nb j0 g | kb j1 c v
    return v.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _load_rows(ptrs, k0, k_end, in_scale_ptr, e, stride_ie, DT: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_IN_SCALE: tl.constexpr, EVEN_K: tl.constexpr):
    """The activation rows at ptrs [BLOCK_M, BLOCK_K] (columns k0..) as the B operand [BLOCK_K, BLOCK_M] in DT, zero
    past k_end; AWQ's input scale of expert e over those columns applied (x * s @ W^T = x @ (W * s)^T)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    if EVEN_K:
        a = tl.load(ptrs)
    else:
        a = tl.load(ptrs, mask=k_ok[None, :], other=0.0)
    if HAS_IN_SCALE:
        s = tl.load(in_scale_ptr + e * stride_ie + offs_k, mask=k_ok, other=0.0)
        a = a.to(tl.float32) * s.to(tl.float32)[None, :]
    return tl.trans(a.to(DT))


@triton.jit
def _load_dense(ptrs, k0, k_end, row_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """A dense weight tile at ptrs [BLOCK_N, BLOCK_K], zero past k_end and on rows that do not exist."""
    if EVEN_N and EVEN_K:
        return tl.load(ptrs)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_k < k_end)[None, :], other=0.0)


@triton.jit
def _mma(acc, w, xt, s, FACTORED: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BN, BM] fp32 += w [BN, BK] @ xt [BK, BM], times the rows' scales s where FACTORED (4-bit, one group a
    K step). DOT_FP32: fp32 operands (exact fp32, not tf32), and bf16 in Triton's interpreter."""
    if DOT_FP32:
        part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        if FACTORED:
            part = part * s[:, None]
        acc += part
    elif FACTORED:
        acc += tl.dot(w, xt) * s[:, None]
    else:
        acc = tl.dot(w, xt, acc)
    return acc


@triton.jit
def _tile_ids(num_blocks, num_n, GROUP_M: tl.constexpr):
    """(block, n tile) of this program: groups of GROUP_M blocks, n tiles in order inside a group, so that the
    programs running together share weight tiles (blocks of one expert) and activation rows (L2)."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_n
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(num_blocks - first, GROUP_M)
    return first + (pid % in_group) % size, (pid % in_group) // size


# ----------------------------------------------------------------------------------------------------------------------
# GEMM 1: gate_up with the gated activation in the epilogue
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def gate_up_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, in_scale_ptr, inter_ptr, ws_ptr, count_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_blocks, K, I, k_per_split, num_groups, stride_xt,
    stride_we, stride_wh, stride_wn, stride_wk, stride_se, stride_sg, stride_sn, stride_be, stride_ie, stride_it,
    alpha, limit,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_IN_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, ASM: tl.constexpr,
    GROUPED: tl.constexpr, FACTORED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, KW: tl.constexpr,
):
    """4-bit weights: w_ptr holds the tensor-core words (stride_wn: between 16-row blocks). GROUPED: a K step is
    whole groups (see _q4_group_acc for FACTORED), scales and zeros in the tensor-core meta layout (mma_meta), whose
    expert and 128-row-tile strides (in row pairs) come as stride_se and stride_sg; else 64-k steps with a zero and
    scale per 16-k word (groups of 16 and 32) read from moekern's layout [E, K / G, N] (stride_se, stride_sg,
    stride_sn as named)."""
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_blocks, num_n, GROUP_M)
    split = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:  # -1: a block past the used rows; it does nothing (the grid is the static bound)
        DT: tl.constexpr = tl.float32 if x_ptr.dtype.element_ty == tl.float32 else x_ptr.dtype.element_ty
        SDT: tl.constexpr = s_ptr.dtype.element_ty
        MP: tl.constexpr = 16 if BLOCK_M < 16 else BLOCK_M  # the MMA's N: at least 16 (blocks of fewer rows pad)
        m = tl.arange(0, MP)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + m, mask=m < BLOCK_M, other=num_pairs)
        row_ok = pairs < num_pairs  # padding rows hold num_pairs: they read token 0 and are never stored
        token = tl.where(row_ok, pairs // TOP_K, 0)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        # silu: gate rows n, up rows I + n. clamped_swiglu (GPT-OSS): interleaved, gate 2n, up 2n + 1.
        N_MUL: tl.constexpr = 1 if ACT == 0 else 2
        half_col = I if ACT == 0 else 1
        acc_g = tl.zeros((BLOCK_N, MP), tl.float32)
        acc_u = tl.zeros((BLOCK_N, MP), tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        # GROUPED: a K step is SUB whole groups (of 64 or more), zeros and scales read a step ahead; FACTORED: each
        # group its own MMA (KS = GROUP wide), else the step decoded at once and one MMA (KS = BLOCK_K)
        KS: tl.constexpr = GROUP if QUANT and GROUPED and FACTORED else BLOCK_K
        SUB: tl.constexpr = BLOCK_K // GROUP if QUANT and GROUPED else 1
        xp = x_ptr + token[:, None].to(tl.int64) * stride_xt + (k_start + tl.arange(0, KS))[None, :]
        if QUANT:
            wp_g = _q4_words(w_ptr, e, 0, n0, k_start, stride_we, stride_wh, stride_wn, BLOCK_N, KS, ASM)
            wp_u = _q4_words(w_ptr, e, 1, n0, k_start, stride_we, stride_wh, stride_wn, BLOCK_N, KS, ASM)
            if GROUPED:  # zeros and scales of the first step; the loop reads each next step's ahead
                mz, ms = _q4_meta_ptrs(z_ptr, s_ptr, e, n0, k_start // GROUP, stride_se, stride_sg, 2, BLOCK_N)
                meta_g = _q4_step_meta(mz, ms, 0, 2, SUB)
                meta_u = _q4_step_meta(mz, ms, 1, 2, SUB)
        else:
            rows = offs_n * N_MUL
            wp_g = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + \
                (k_start + tl.arange(0, BLOCK_K))[None, :] * stride_wk
            wp_u = wp_g + half_col * stride_wn
        for k0 in range(k_start, k_end, BLOCK_K):
            if QUANT and GROUPED and FACTORED:
                for sub in tl.static_range(SUB):
                    xt = _load_rows(xp + sub * KS, k0 + sub * KS, k_end, in_scale_ptr, e, stride_ie, DT, KS,
                                    HAS_IN_SCALE, EVEN_K)
                    acc_g = _q4_group_acc(acc_g, wp_g, xt, meta_g[2 * sub], meta_g[2 * sub + 1], sub, BLOCK_N, GROUP,
                                          DT, SDT, ASM, KW, DOT_FP32)
                    acc_u = _q4_group_acc(acc_u, wp_u, xt, meta_u[2 * sub], meta_u[2 * sub + 1], sub, BLOCK_N, GROUP,
                                          DT, SDT, ASM, KW, DOT_FP32)
            elif QUANT and GROUPED:
                xt = _load_rows(xp, k0, k_end, in_scale_ptr, e, stride_ie, DT, BLOCK_K, HAS_IN_SCALE, EVEN_K)
                acc_g = _q4_step_acc(acc_g, wp_g, xt, meta_g, BLOCK_N, BLOCK_K, GROUP, DT, SDT, ASM, KW, DOT_FP32)
                acc_u = _q4_step_acc(acc_u, wp_u, xt, meta_u, BLOCK_N, BLOCK_K, GROUP, DT, SDT, ASM, KW, DOT_FP32)
            if QUANT and GROUPED:
                mz += SUB * 2 * 64
                ms += SUB * 2 * 64
                meta_g = _q4_step_meta(mz, ms, 0, 2, SUB)
                meta_u = _q4_step_meta(mz, ms, 1, 2, SUB)
                wp_g += _q4_step(BLOCK_K, ASM)
                wp_u += _q4_step(BLOCK_K, ASM)
            else:
                xt = _load_rows(xp, k0, k_end, in_scale_ptr, e, stride_ie, DT, BLOCK_K, HAS_IN_SCALE, EVEN_K)
                if QUANT:
                    z_lo, z_hi, s_lo, s_hi = _q4_scaled_meta(z_ptr, s_ptr, e, 0, n0, k0, I, num_groups, stride_se,
                                                             stride_sg, stride_sn, half_col, N_MUL, BLOCK_N, BLOCK_K,
                                                             GROUP)
                    wg = _q4_decode(wp_g, z_lo, z_hi, s_lo, s_hi, BLOCK_N, BLOCK_K, DT, ASM, True, KW)
                    acc_g = _mma(acc_g, wg, xt, acc_g, False, DOT_FP32)
                    z_lo, z_hi, s_lo, s_hi = _q4_scaled_meta(z_ptr, s_ptr, e, 1, n0, k0, I, num_groups, stride_se,
                                                             stride_sg, stride_sn, half_col, N_MUL, BLOCK_N, BLOCK_K,
                                                             GROUP)
                    wu = _q4_decode(wp_u, z_lo, z_hi, s_lo, s_hi, BLOCK_N, BLOCK_K, DT, ASM, True, KW)
                    acc_u = _mma(acc_u, wu, xt, acc_u, False, DOT_FP32)
                    wp_g += _q4_step(BLOCK_K, ASM)
                    wp_u += _q4_step(BLOCK_K, ASM)
                else:
                    wg = _load_dense(wp_g, k0, k_end, n_ok, EVEN_N, EVEN_K, BLOCK_K)
                    acc_g = _mma(acc_g, wg.to(DT), xt, acc_g, False, DOT_FP32)
                    wu = _load_dense(wp_u, k0, k_end, n_ok, EVEN_N, EVEN_K, BLOCK_K)
                    acc_u = _mma(acc_u, wu.to(DT), xt, acc_u, False, DOT_FP32)
                    wp_g += BLOCK_K * stride_wk
                    wp_u += BLOCK_K * stride_wk
            xp += BLOCK_K
        last = True
        if SPLIT_K > 1:
            # Partials to the workspace; the last of the tile's SPLIT_K programs to arrive sums them in split order
            # (the same bits whoever arrives last), applies the activation and resets the tile's counter.
            tile = pid_m.to(tl.int64) * num_n + pid_n
            r = tl.arange(0, BLOCK_N)[:, None] * MP + m[None, :]
            mine = ws_ptr + ((tile * SPLIT_K + split) * 2) * (BLOCK_N * MP)
            tl.store(mine + r, acc_g)
            tl.store(mine + BLOCK_N * MP + r, acc_u)
            tl.debug_barrier()  # every thread's partial is written before the count is raised
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = arrived == SPLIT_K - 1
            if last:
                acc_g = tl.zeros((BLOCK_N, MP), tl.float32)
                acc_u = tl.zeros((BLOCK_N, MP), tl.float32)
                for sp in tl.static_range(SPLIT_K):
                    theirs = ws_ptr + ((tile * SPLIT_K + sp) * 2) * (BLOCK_N * MP)
                    acc_g += tl.load(theirs + r, cache_modifier=".cg")
                    acc_u += tl.load(theirs + BLOCK_N * MP + r, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
        if last:
            if HAS_BIAS:
                gate_rows = offs_n * N_MUL
                acc_g += tl.load(b_ptr + e * stride_be + gate_rows, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                acc_u += tl.load(b_ptr + e * stride_be + gate_rows + half_col, mask=n_ok,
                                 other=0.0).to(tl.float32)[:, None]
            if ACT == 0:
                h = acc_g * tl.sigmoid(acc_g) * acc_u
            else:
                gate = tl.minimum(acc_g, limit)
                up = tl.minimum(tl.maximum(acc_u, -limit), limit)
                h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
            tl.store(inter_ptr + pairs[None, :].to(tl.int64) * stride_it + offs_n[:, None],
                     h.to(inter_ptr.dtype.element_ty), mask=row_ok[None, :] & n_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# GEMM 2: down with the routing weight in the epilogue; split-K partials summed by the slot-sum kernel
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def down_kernel(
    inter_ptr, w_ptr, s_ptr, z_ptr, b_ptr, in_scale_ptr, weight_ptr, part_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_blocks, K, N, k_per_split, num_groups, stride_it,
    stride_we, stride_wh, stride_wn, stride_wk, stride_se, stride_sg, stride_sn, stride_be, stride_ie, stride_ps,
    stride_pp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, ASM: tl.constexpr, GROUPED: tl.constexpr, FACTORED: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, KW: tl.constexpr,
):
    """Weights, scales and zeros as in gate_up_kernel (one half)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_blocks, num_n, GROUP_M)
    split = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        DT: tl.constexpr = tl.float32 if inter_ptr.dtype.element_ty == tl.float32 else inter_ptr.dtype.element_ty
        SDT: tl.constexpr = s_ptr.dtype.element_ty
        MP: tl.constexpr = 16 if BLOCK_M < 16 else BLOCK_M
        m = tl.arange(0, MP)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + m, mask=m < BLOCK_M, other=num_pairs)
        row_ok = pairs < num_pairs
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_N, MP), tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        KS: tl.constexpr = GROUP if QUANT and GROUPED and FACTORED else BLOCK_K
        SUB: tl.constexpr = BLOCK_K // GROUP if QUANT and GROUPED else 1
        xp = inter_ptr + tl.where(row_ok, pairs, 0)[:, None].to(tl.int64) * stride_it + \
            (k_start + tl.arange(0, KS))[None, :]
        if QUANT:
            wp = _q4_words(w_ptr, e, 0, n0, k_start, stride_we, stride_wh, stride_wn, BLOCK_N, KS, ASM)
            if GROUPED:
                mz, ms = _q4_meta_ptrs(z_ptr, s_ptr, e, n0, k_start // GROUP, stride_se, stride_sg, 1, BLOCK_N)
                meta = _q4_step_meta(mz, ms, 0, 1, SUB)
        else:
            wp = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + \
                (k_start + tl.arange(0, BLOCK_K))[None, :] * stride_wk
        for k0 in range(k_start, k_end, BLOCK_K):
            if QUANT and GROUPED and FACTORED:
                for sub in tl.static_range(SUB):
                    xt = _load_rows(xp + sub * KS, k0 + sub * KS, k_end, in_scale_ptr, e, stride_ie, DT, KS,
                                    HAS_IN_SCALE, EVEN_K)
                    acc = _q4_group_acc(acc, wp, xt, meta[2 * sub], meta[2 * sub + 1], sub, BLOCK_N, GROUP, DT, SDT,
                                        ASM, KW, DOT_FP32)
            elif QUANT and GROUPED:
                xt = _load_rows(xp, k0, k_end, in_scale_ptr, e, stride_ie, DT, BLOCK_K, HAS_IN_SCALE, EVEN_K)
                acc = _q4_step_acc(acc, wp, xt, meta, BLOCK_N, BLOCK_K, GROUP, DT, SDT, ASM, KW, DOT_FP32)
            if QUANT and GROUPED:
                mz += SUB * 64
                ms += SUB * 64
                meta = _q4_step_meta(mz, ms, 0, 1, SUB)
                wp += _q4_step(BLOCK_K, ASM)
            else:
                xt = _load_rows(xp, k0, k_end, in_scale_ptr, e, stride_ie, DT, BLOCK_K, HAS_IN_SCALE, EVEN_K)
                if QUANT:
                    z_lo, z_hi, s_lo, s_hi = _q4_scaled_meta(z_ptr, s_ptr, e, 0, n0, k0, N, num_groups, stride_se,
                                                             stride_sg, stride_sn, 0, 1, BLOCK_N, BLOCK_K, GROUP)
                    w = _q4_decode(wp, z_lo, z_hi, s_lo, s_hi, BLOCK_N, BLOCK_K, DT, ASM, True, KW)
                    acc = _mma(acc, w, xt, acc, False, DOT_FP32)
                    wp += _q4_step(BLOCK_K, ASM)
                else:
                    w = _load_dense(wp, k0, k_end, n_ok, EVEN_N, EVEN_K, BLOCK_K)
                    acc = _mma(acc, w.to(DT), xt, acc, False, DOT_FP32)
                    wp += BLOCK_K * stride_wk
            xp += BLOCK_K
        if HAS_BIAS:  # the bias once, in split 0; it is scaled by the routing weight like the product
            bias = tl.load(b_ptr + e * stride_be + offs_n, mask=n_ok & (split == 0), other=0.0)
            acc += bias.to(tl.float32)[:, None]
        acc *= tl.load(weight_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(part_ptr + split.to(tl.int64) * stride_ps + pairs[None, :].to(tl.int64) * stride_pp + offs_n[:, None],
                 acc, mask=row_ok[None, :] & n_ok[:, None])


@triton.jit
def slot_sum_kernel(part_ptr, ids_ptr, out_ptr, N, num_experts, stride_ps, stride_pp, stride_ot,
                    TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum over slots, then splits, in a fixed order. A slot is live where its id names an expert (0 <= id
    < num_experts), as in align_block_size: any other slot was never computed and reads as 0."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for s in tl.static_range(TOP_K):
        ex = tl.load(ids_ptr + t * TOP_K + s)
        live = (ex >= 0) & (ex < num_experts)
        for sp in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + sp * stride_ps + (t * TOP_K + s) * stride_pp + offs_n, mask=n_ok & live,
                           other=0.0)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------
_alloc = torch.empty  # tests swap in a NaN-filling allocator: an element read before it is written then shows


@dataclass(frozen=True)
class _Weight:
    """What a GEMM launch reads of one weight: pointers, strides, and the constexprs of its kind."""

    w: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    strides: tuple  # stride_we, stride_wh, stride_wn, stride_wk (4-bit words: e, half, k64 block, -)
    meta_strides: tuple  # stride_se, stride_sg, stride_sn
    quant: bool
    group: int
    num_groups: int


def _weight(w, halves: int, act: Activation | None, kwidth: int, cfg: tuning.GemmConfig) -> _Weight:
    if isinstance(w, Quant4):
        group = w.group_size
        if not tuning.group_size_supported(group):
            raise ValueError(f"the 4-bit kernels need a power-of-two group size of at least 16, not {group}")
        interleaved = act is not None and act.kind == "clamped_swiglu"
        words = mma_words(w, halves, interleaved, kwidth)
        if _grouped(group, cfg):  # whole groups a K step: the tensor-core meta layout (expert, half, block strides)
            s, z = mma_meta_cached(w, halves, interleaved)
            meta_strides = (s.stride(0) // 2, s.stride(1) // 2, 0)  # in pairs: expert, 128-row tile
        else:
            s, z = w.scales, w.zeros.contiguous()
            if s.stride() != z.stride():
                s = s.contiguous()
            meta_strides = tuple(s.stride())
        b = words.element_size()  # byte strides (expert, half, 16-row block): the kernel reads the words as bytes
        strides = (words.stride(0) * b, words.stride(1) * b, words.stride(2) * b, 0)
        return _Weight(words, s, z, strides, meta_strides, True, group, w.scales.shape[1])
    return _Weight(w, w, w, (w.stride(0), 0, w.stride(1), w.stride(2)), (0, 0, 0), False, 1, 1)


def _input_scale_args(w, fallback):
    """(pointer, expert stride, present) of a Quant4's input scale; `fallback` is a dummy pointer when absent."""
    scale = w.input_scale if isinstance(w, Quant4) else None
    if scale is None:
        return fallback, 0, False
    scale = scale.contiguous()
    return scale, scale.stride(0), True


def _dot_fp32(x: torch.Tensor, w) -> bool:
    if x.dtype == torch.float32 or (not isinstance(w, Quant4) and w.dtype == torch.float32):
        return True
    return INTERPRETED and x.dtype == torch.bfloat16 and not INTERPRETER_BF16_DOT


def _asm(x: torch.Tensor, wt: _Weight) -> bool:
    """The inline-PTX decoder: compiled kernels with 16-bit activations; the interpreter runs the portable path."""
    return wt.quant and not INTERPRETED and x.dtype in (torch.bfloat16, torch.float16)


def _check_tile(wt: _Weight, cfg: tuning.GemmConfig):
    if wt.quant and cfg.BLOCK_N > MMA_N_PAD:
        raise ValueError(f"4-bit tiles of {cfg.BLOCK_N} rows would read past the words (padded to {MMA_N_PAD} rows)")


def _grouped(group: int, cfg: tuning.GemmConfig) -> bool:
    """K steps of whole groups of 64 to MMA_K_PAD (zeros and scales read a step ahead from mma_meta, whose padding
    past K covers a step of up to MMA_META_AHEAD)."""
    return tuning.QUANT_K <= group <= MMA_K_PAD and cfg.BLOCK_K % group == 0 and cfg.BLOCK_K <= MMA_META_AHEAD


def _word_view(wt: _Weight, asm: bool) -> torch.Tensor:
    return wt.w.view(torch.uint8) if asm else wt.w


_COUNTERS: dict = {}


def _counters(device, stream_key, n: int) -> torch.Tensor:
    """Zeroed int32 counters of gate_up's split-K tiles, one buffer per device and stream (each launch leaves them
    zero again). Made on first use; grown (zeroed) when a larger grid needs more."""
    key = (str(device), stream_key)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _stream_key(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def gate_up(x, w, b, act: Activation, sorted_pairs, block_expert, num_pairs, top_k, bm, num_tokens, num_blocks=None):
    """GEMM 1 over the work lists -> inter [num_pairs, I] in x's dtype (rows of skipped pairs left unwritten).
    num_blocks: how many blocks of the lists can be used (default all): the grid's static bound."""
    e, n2, k = w.shape
    i = n2 // 2
    num_blocks = num_blocks or block_expert.numel()
    kwidth = mma_kwidth(x.device)
    quant = isinstance(w, Quant4)
    cfg = tuning.config("gate_up", i, k, quant, num_tokens, bm, num_blocks, w.group_size if quant else None,
                        x.device)
    wt = _weight(w, 2, act, kwidth, cfg)
    _check_tile(wt, cfg)
    inter = _alloc(max(num_pairs, 1), i, dtype=x.dtype, device=x.device)
    in_scale, stride_ie, has_in_scale = _input_scale_args(w, x)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.SPLIT_K), cfg.BLOCK_K) * cfg.BLOCK_K
    split = triton.cdiv(k, k_per_split)
    num_n = triton.cdiv(i, cfg.BLOCK_N)
    if split > 1:
        ws = _alloc(num_blocks * num_n * split * 2 * cfg.BLOCK_N * max(bm, 16), dtype=torch.float32, device=x.device)
        counts = _counters(x.device, _stream_key(x.device), num_blocks * num_n)
    else:
        ws, counts = x, x  # unused
    asm = _asm(x, wt)
    gate_up_kernel[(num_blocks * num_n, split)](
        x, _word_view(wt, asm), wt.scales, wt.zeros, b if b is not None else x, in_scale, inter, ws, counts,
        sorted_pairs, block_expert,
        num_pairs, num_blocks, k, i, k_per_split, wt.num_groups, x.stride(0), *wt.strides, *wt.meta_strides,
        b.stride(0) if b is not None else 0, stride_ie, inter.stride(0), float(act.alpha), float(act.limit),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split, GROUP_M=cfg.GROUP_M,
        QUANT=wt.quant, GROUP=wt.group, ACT=ACT[act.kind], HAS_BIAS=b is not None, HAS_IN_SCALE=has_in_scale,
        DOT_FP32=_dot_fp32(x, w), ASM=asm, GROUPED=wt.quant and _grouped(wt.group, cfg), FACTORED=cfg.FACTORED,
        EVEN_N=i % cfg.BLOCK_N == 0,
        EVEN_K=k % cfg.BLOCK_K == 0 and k_per_split % cfg.BLOCK_K == 0, KW=kwidth,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return inter


def down(inter, w, b, pair_weights, sorted_pairs, block_expert, num_pairs, bm, num_tokens, num_blocks=None):
    """GEMM 2 -> part [SPLIT_K, num_pairs, H] fp32, each row times its routing weight (skipped pairs unwritten)."""
    e, n, k = w.shape
    num_blocks = num_blocks or block_expert.numel()
    kwidth = mma_kwidth(inter.device)
    quant = isinstance(w, Quant4)
    cfg = tuning.config("down", n, k, quant, num_tokens, bm, num_blocks, w.group_size if quant else None,
                        inter.device)
    wt = _weight(w, 1, None, kwidth, cfg)
    _check_tile(wt, cfg)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.SPLIT_K), cfg.BLOCK_K) * cfg.BLOCK_K
    split = triton.cdiv(k, k_per_split)
    part = _alloc(split, max(num_pairs, 1), n, dtype=torch.float32, device=inter.device)
    in_scale, stride_ie, has_in_scale = _input_scale_args(w, inter)
    asm = _asm(inter, wt)
    down_kernel[(num_blocks * triton.cdiv(n, cfg.BLOCK_N), split)](
        inter, _word_view(wt, asm), wt.scales, wt.zeros, b if b is not None else inter, in_scale, pair_weights, part,
        sorted_pairs, block_expert,
        num_pairs, num_blocks, k, n, k_per_split, wt.num_groups, inter.stride(0), *wt.strides, *wt.meta_strides,
        b.stride(0) if b is not None else 0, stride_ie, part.stride(0), part.stride(1),
        BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, QUANT=wt.quant, GROUP=wt.group,
        HAS_BIAS=b is not None, HAS_IN_SCALE=has_in_scale, DOT_FP32=_dot_fp32(inter, w), ASM=asm,
        GROUPED=wt.quant and _grouped(wt.group, cfg), FACTORED=cfg.FACTORED, EVEN_N=n % cfg.BLOCK_N == 0,
        EVEN_K=k % cfg.BLOCK_K == 0 and k_per_split % cfg.BLOCK_K == 0, KW=kwidth,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def slot_sum(part, ids, out_dtype, num_experts: int):
    split, _, n = part.shape
    t, k = ids.shape
    out = _alloc(t, n, dtype=out_dtype, device=part.device)
    block_n = min(1024, triton.next_power_of_2(n))
    slot_sum_kernel[(t, triton.cdiv(n, block_n))](part, ids, out, n, num_experts, part.stride(0), part.stride(1),
                                                  out.stride(0), TOP_K=k, SPLIT_K=split, BLOCK_N=block_n)
    return out


def moe_experts(x, ids, weights, w_gate_up, w_down, b_gate_up=None, b_down=None, act: Activation = Activation(),
                block_m: int | None = None):
    """reference.moe_experts in Triton. x [T, H]; ids, weights [T, k] (NO_EXPERT = -1 not computed); w_gate_up
    [E, 2I, H] and w_down [E, H, I] dense (any strides) or Quant4; biases [E, 2I], [E, H]. Returns [T, H] in x's
    dtype. Every launch's grid follows from the shapes alone: no host sync, CUDA-graph and torch.compile safe.
    Launches: align, gate_up, down, slot_sum (and a cast where ids are not int32 already)."""
    num_tokens, top_k = ids.shape
    num_experts = w_gate_up.shape[0]
    x = x.contiguous()
    ids32 = ids if ids.dtype == torch.int32 else ids.to(torch.int32)
    ids32 = ids32.contiguous()
    num_pairs = num_tokens * top_k
    bm = block_m or tuning.block_m(num_tokens, top_k, num_experts)
    sorted_pairs, block_expert, _ = routing.align_block_size(ids32, num_experts, bm)
    num_blocks = routing.max_blocks(num_pairs, num_experts, bm)
    pair_weights = weights.reshape(-1).contiguous()
    inter = gate_up(x, w_gate_up, b_gate_up, act, sorted_pairs, block_expert, num_pairs, top_k, bm, num_tokens,
                    num_blocks)
    part = down(inter, w_down, b_down, pair_weights, sorted_pairs, block_expert, num_pairs, bm, num_tokens, num_blocks)
    return slot_sum(part, ids32, x.dtype, num_experts)
