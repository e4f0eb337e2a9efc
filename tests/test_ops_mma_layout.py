"""The tensor-core layout of 4-bit weights (moe_gemm.mma_pack) and its decoder: the words put every value where the
documented MMA fragment wants it, that is where Triton's own A-operand layout of tl.dot puts it, and the inline PTX
the compiled kernels run (emulated here instruction by instruction: no GPU) turns a word into exactly the values
the interpreter's portable path computes, in the same order."""

import numpy as np
import pytest
import torch

from moekern.ops import moe_gemm
from moekern.formats import layout


def documented_place(n, k, kwidth):
    """(16-row block, 64-k block, lane, word, value) of element (n, k), from the comment above moe_gemm.MMA_N."""
    nb, g, hi = n // 16, n % 8, (n % 16) // 8
    kb, r = k // 64, k % 64
    if kwidth == 2:  # row g + 8 v1, column 16 j + 2c + v0 + 8 v2
        j, c, v = r // 16, (r % 8) // 2, 4 * ((r % 16) // 8) + 2 * hi + r % 2
    else:  # row g + 8 j0, column 32 j1 + 8c + v
        j, c, v = 2 * (r // 32) + hi, (r % 32) // 8, r % 8
    return nb, kb, 4 * g + c, j, v


def nibble_at(words, nb, kb, lane, j, v):
    shift = 4 * torch.tensor(moe_gemm.NIBBLE)[v]
    return (words[..., nb, kb, lane, j] >> shift) & 0xF


@pytest.mark.parametrize("kwidth", [2, 8])
def test_pack_puts_every_value_where_the_fragment_wants_it(kwidth):
    q = torch.randint(0, 16, (2, 48, 192), dtype=torch.uint8)
    words = moe_gemm.mma_pack(q, kwidth)
    assert words.shape == (2, 3, 3, 32, 4) and words.dtype == torch.int32
    n, k = torch.meshgrid(torch.arange(48), torch.arange(192), indexing="ij")
    nb, kb, lane, j, v = documented_place(n, k, kwidth)
    assert torch.equal(nibble_at(words, nb, kb, lane, j, v).to(torch.uint8), q)
    assert torch.equal(moe_gemm.mma_unpack(words, kwidth), q)


def triton_a_layout(kwidth):
    """Triton's register layout of tl.dot's A operand [64, 64] over 4 warps (wgmma for kwidth 2, mma.sync for 8), as
    (register bases, lane bases, warp bases); None where this Triton cannot say."""
    try:
        import triton.experimental.gluon.language as ttgl
        from triton._C.libtriton import gluon_ir, ir
    except ImportError:
        return None
    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    if kwidth == 2:
        parent = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    else:
        parent = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    operand = ttgl.DotOperandLayout(operand_index=0, parent=parent, k_width=kwidth)
    linear = builder.to_linear_layout(operand._to_ir(builder), [64, 64])
    return linear.reg_bases, linear.lane_bases, linear.warp_bases


@pytest.mark.parametrize("kwidth", [2, 8])
def test_layout_is_the_compilers_a_operand_layout(kwidth):
    """Register r of lane L of warp w holds, in Triton's layout, the element the words hold at (16-row block w, lane
    L, word r // 8, value r % 8): the decoded words need no layout conversion before the MMA."""
    bases = triton_a_layout(kwidth)
    if bases is None:
        pytest.skip("this Triton has no gluon layout bindings")
    reg_bases, lane_bases, warp_bases = bases

    def coord(bits, basis):
        row = col = 0
        for i, (r, c) in enumerate(basis):
            if bits >> i & 1:
                row, col = row ^ r, col ^ c
        return row, col

    q = torch.randint(0, 16, (64, 64), dtype=torch.uint8)
    words = moe_gemm.mma_pack(q, kwidth)
    for w in range(4):
        for lane in range(32):
            for r in range(32):
                (r0, c0), (r1, c1), (r2, c2) = coord(r, reg_bases), coord(lane, lane_bases), coord(w, warp_bases)
                row, col = r0 ^ r1 ^ r2, c0 ^ c1 ^ c2
                assert nibble_at(words, w, 0, lane, r // 8, r % 8) == q[row, col], (w, lane, r)


def test_layout_of_gate_up_halves_and_gpt_oss_interleave():
    """gate_up goes in two halves, gate and up: the first and last I rows, or even and odd rows (GPT-OSS), each
    padded to whole 128-row tiles and K to whole 256-k steps."""
    e, i, k = 2, 24, 96
    q = torch.randint(0, 16, (e, 2 * i, k), dtype=torch.uint8)
    w = moe_gemm.Quant4(layout.pack(q), torch.ones(e, k // 16, 2 * i),
                        torch.zeros(e, k // 16, 2 * i, dtype=torch.uint8))
    for interleaved in (False, True):
        words = moe_gemm.mma_layout(w, 2, interleaved)
        assert words.shape == (e, 2, 8, 4, 32, 4)  # 24 rows -> 8 blocks of 16, 96 k -> 4 blocks of 64
        halves = moe_gemm.mma_unpack(words)[:, :, :i, :k]
        gate, up = (q[:, 0::2], q[:, 1::2]) if interleaved else (q[:, :i], q[:, i:])
        assert torch.equal(halves[:, 0], gate) and torch.equal(halves[:, 1], up)
        padding = moe_gemm.mma_unpack(words)
        assert (padding[:, :, i:] == 0).all() and (padding[:, :, :, k:] == 0).all()


def test_meta_layout_pairs_each_lanes_rows():
    """mma_meta puts the zero and scale of row r of group q of a half at [tile, q, half, 16-row block, g, hi] with
    r = 128 tile + 16 block + 8 hi + g: a lane's rows g and g + 8 side by side, every group of a K step and both
    halves at fixed offsets; rows padded to whole 128-row tiles and groups a widest step (512 k) past K padded to
    256, with zeros."""
    e, i, k, group = 2, 40, 192, 64
    scales = torch.rand(e, k // group, 2 * i, dtype=torch.float64)
    zeros = torch.randint(0, 16, (e, k // group, 2 * i), dtype=torch.uint8)
    w = moe_gemm.Quant4(torch.zeros(e, k // 8, 2 * i, dtype=torch.int32), scales, zeros)
    for interleaved in (False, True):
        s, z = moe_gemm.mma_meta(w, 2, interleaved)
        assert s.shape == z.shape == (e, 1, (256 + 512) // group, 2, 8, 8, 2) and s.dtype == scales.dtype
        for half in (0, 1):
            rows = torch.arange(i) * 2 + half if interleaved else torch.arange(i) + half * i
            for r in range(128):
                nb, hi, g = r // 16, (r % 16) // 8, r % 8
                want_s = scales[:, :, rows[r]] if r < i else torch.zeros(e, k // group, dtype=scales.dtype)
                want_z = zeros[:, :, rows[r]] if r < i else torch.zeros(e, k // group, dtype=torch.uint8)
                assert torch.equal(s[:, 0, : k // group, half, nb, g, hi], want_s)
                assert torch.equal(z[:, 0, : k // group, half, nb, g, hi], want_z)
        assert (s[:, :, k // group:] == 0).all() and (z[:, :, k // group:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# The inline PTX, emulated
# ----------------------------------------------------------------------------------------------------------------------
def asm_text(dtype, scaled):
    """The asm text the compiled kernels hand tl.inline_asm_elementwise, its braces off."""
    name = {("bf16", False): "_ASM_BF16", ("bf16", True): "_ASM_BF16_SCALED", ("fp16", False): "_ASM_F16",
            ("fp16", True): "_ASM_F16_SCALED"}[dtype, scaled]
    text = getattr(moe_gemm, name)
    return getattr(text, "value", text).strip()[1:-1]


def lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def halves(x, dtype):
    lo, hi = (x & 0xFFFF).astype(np.uint16), ((x >> 16) & 0xFFFF).astype(np.uint16)
    if dtype == "bf16":
        return [torch.from_numpy(h.view(np.int16).copy()).view(torch.bfloat16).double().numpy() for h in (lo, hi)]
    return [h.view(np.float16).astype(np.float64) for h in (lo, hi)]


def pack_halves(lo, hi, dtype):
    if dtype == "bf16":
        bits = [torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for v in (lo, hi)]
    else:
        bits = [v.astype(np.float16).view(np.uint16) for v in (lo, hi)]
    return bits[0].astype(np.uint32) | (bits[1].astype(np.uint32) << 16)


def emulate(asm: str, operands: dict, dtype: str):
    """Run the asm's instructions on uint32 arrays (registers $n and named temporaries): registers $0..$3 as the
    two 16-bit halves of each, in float64."""
    regs = emulate_raw(asm, operands, dtype)
    return [halves(regs[f"${i}"], dtype) for i in range(4)]


def emulate_raw(asm: str, operands: dict, dtype: str | None = None) -> dict:
    """The registers after running the asm on uint32 arrays (dtype: of the 16-bit float instructions, if any)."""
    regs = dict(operands)
    like = next(iter(operands.values()))

    def val(token):
        token = token.strip()
        if token in regs:
            return regs[token]
        return np.uint32(int(token, 0))

    for line in asm.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        args = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1]) + np.zeros_like(like)
        elif op == "prmt.b32":  # bytes of {b, a} picked by the selector's nibbles (0-3: a, 4-7: b)
            a, b, sel = val(args[1]), val(args[2]), int(args[3], 0)
            pool = [(x >> np.uint32(8 * i)) & 0xFF for x in (a, b) for i in range(4)]
            out = np.zeros_like(a)
            for i in range(4):
                out |= pool[(sel >> 4 * i) & 7].astype(np.uint32) << np.uint32(8 * i)
            regs[args[0]] = out
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> np.uint32(int(args[2]))
        elif op == "lop3.b32":
            regs[args[0]] = lop3(val(args[1]), val(args[2]), val(args[3]), int(args[4], 0))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2", "mul.rn.f16x2"):
            a, b = halves(val(args[1]), dtype), halves(val(args[2]), dtype)
            c = halves(val(args[3]), dtype) if op.startswith("fma") else [0.0, 0.0]
            exact = [a[i] * b[i] + c[i] for i in (0, 1)]  # exact in float64 for these 16-bit operands
            regs[args[0]] = pack_halves(exact[0], exact[1], dtype)
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


@pytest.mark.parametrize("dtype,scaled", [("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False)])
def test_inline_ptx_decodes_words_like_the_portable_path(dtype, scaled):
    """Registers $0..$3 hold values (0, 1), (2, 3), (4, 5), (6, 7) of a word, low half first (the order in which
    tl.inline_asm_elementwise packs its two outputs of four): each q - zero of its row (g for $0, $2; g + 8 for $1,
    $3), times the row's scale where scaled, rounded once as the reference's dequantization rounds."""
    asm = asm_text(dtype, scaled)
    rng = np.random.default_rng(0)
    n = 4096
    word = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    z = rng.integers(0, 16, (2, n)).astype(np.uint32)  # zero of row g (lo) and g + 8 (hi)
    scale = rng.uniform(1e-3, 0.1, (2, n))
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    scale = torch.from_numpy(scale).to(tdtype).double().numpy()  # the scales as the kernel holds them
    neg = 0xC300 if dtype == "bf16" else 0xE400
    zpair = [((neg | z[i]) * 0x10001).astype(np.uint32) for i in (0, 1)]
    spair = [pack_halves(scale[i], scale[i], dtype) for i in (0, 1)]
    ops = {"$4": word}
    for i in range(4):  # pack=4: four copies of each broadcast operand; the asm reads the first
        ops[f"${5 + i}"], ops[f"${9 + i}"] = zpair[0], zpair[1]
        ops[f"${13 + i}"], ops[f"${17 + i}"] = spair[0], spair[1]
    out = emulate(asm, ops, dtype)
    values = [out[v // 2][v % 2] for v in range(8)]
    for v in range(8):
        hi = (v >> 1) & 1  # values 2, 3, 6, 7 are row g + 8
        q = (word >> np.uint32(4 * moe_gemm.NIBBLE[v])) & 0xF
        expected = q.astype(np.float64) - z[hi]
        if scaled:
            expected = torch.from_numpy(expected * scale[hi]).to(tdtype).double().numpy()
        np.testing.assert_array_equal(values[v], expected)


@pytest.mark.parametrize("dtype,scaled", [("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False)])
def test_inline_ptx_makes_the_decoders_operands_from_packed_pairs(dtype, scaled):
    """The meta asm (moe_gemm._meta_asm) turns a packed zero pair (row g in the low byte, g + 8 in the next) into
    -(MAGIC + zero) of each row in both halves, and a packed 16-bit scale pair into each row's scale twice: the
    operands the decoder takes (test above)."""
    text = getattr(moe_gemm, {("bf16", False): "_META_BF16", ("bf16", True): "_META_BF16_SCALED",
                               ("fp16", False): "_META_F16", ("fp16", True): "_META_F16_SCALED"}[dtype, scaled])
    asm = getattr(text, "value", text).strip()[1:-1]
    rng = np.random.default_rng(1)
    n = 4096
    z = rng.integers(0, 16, (2, n)).astype(np.uint32)
    zz = z[0] | (z[1] << np.uint32(8))
    regs = {"$0": np.zeros(n, np.uint32), "$1": np.zeros(n, np.uint32)}
    ss = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    if scaled:
        regs.update({"$4": zz, "$5": ss})
    else:
        regs["$2"] = zz
    regs = emulate_raw(asm, regs)
    neg = 0xC300 if dtype == "bf16" else 0xE400
    for row in (0, 1):
        np.testing.assert_array_equal(regs[f"${row}"], ((neg | z[row]) * 0x10001).astype(np.uint32))
        if scaled:
            half = (ss >> np.uint32(16 * row)) & 0xFFFF
            np.testing.assert_array_equal(regs[f"${2 + row}"], (half * 0x10001).astype(np.uint32))
