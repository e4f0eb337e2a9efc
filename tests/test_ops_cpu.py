"""The C++ CPU kernels (moekern.ops.cpu, csrc/cpu/) equal reference.moe_experts on fresh random inputs, in every ISA
variant this CPU runs (avx512, avx2, portable: MOEKERN_CPU_ISA forces each) and every inner product: 4-bit with group
sizes 8 to 128, SiLU and GPT-OSS's interleaved clamped SwiGLU with biases, AWQ input scales, odd sizes, one token,
empty experts, every expert dropped, every slot skipped; dense fp32 and bf16 (the fused kernel and the GEMM path);
the 4-bit Linear; bf16 and fp16 scales; the router. Every buffer the C++ ops allocate is poisoned first (NaN, or a
wild integer), so an element read before it is written fails.

Bounds, relative to the largest output element:
  FP32 (fp32 activations, and dense fp32): 1e-5, only the order of the fp32 sums differs from the reference.
  INT8 (activations rounded to int8 per block of 32 inputs: a step of max|x|/127, the error of each product at most
    half a step): 3e-2 against the reference (about 1e-2 on these inputs). Against the same rounding done in PyTorch
    (int8_emulation below) the bound is 1e-5, so the kernel is checked exactly, not only to the rounding.
  BF16 activations (8 mantissa bits): 1e-2.  Dense bf16 (the reference rounds each GEMM's output to bf16): 2e-2.
"""

import os

import pytest
import torch

from moekern.ops import cpu
from moekern.ops import reference as R
from moekern.formats import layout

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

FP32_BOUND = 1e-5
INT8_BOUND = 3e-2
BF16_BOUND = 1e-2
DENSE_BF16_BOUND = 2e-2

ISAS = [isa for isa in ("avx512", "avx2", "portable")
        if isa == "portable" or (isa == "avx2" and "avx2" in cpu.cpu_flags().split())
        or (isa == "avx512" and "avx512vnni" in cpu.cpu_flags().split())]
INNERS = ["int8", "fp32"] + (["bf16"] if "avx512bf16" in cpu.cpu_flags().split() else [])
VARIANTS = [(isa, inner) for isa in ISAS for inner in INNERS if inner != "bf16" or isa == "avx512"]


@pytest.fixture(autouse=True)
def poisoned():
    before = cpu.ops().set_poison(True)
    yield
    cpu.ops().set_poison(before)


@pytest.fixture(params=["whole-experts", "k-blocks"])
def decode_items(request):
    """Each way the decode path splits its work (auto picks whole experts for small ones that share evenly)."""
    before = cpu.set_decode_items(request.param)
    yield request.param
    cpu.set_decode_items(before)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MOEKERN_CPU_ISA", request.param)
    return request.param


def rel(a, b):
    assert not a.isnan().any(), "NaN: an element was read or returned unwritten"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def random_routing(tokens, experts, k, skip=0.0, usable=None):
    usable = torch.arange(experts) if usable is None else usable
    ids = torch.stack([usable[torch.randperm(usable.numel())[:k]] for _ in range(tokens)])
    ids = ids.masked_fill(torch.rand(tokens, k) < skip, R.NO_EXPERT)
    return ids, torch.rand(tokens, k)


def quant4(experts, n, k, group):
    """Random packed weights [E, N, K] in moekern's layout and their dequantized values."""
    q = torch.randint(0, 16, (experts, n, k), dtype=torch.uint8)
    scales = torch.rand(experts, k // group, n) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (experts, k // group, n), dtype=torch.uint8)
    qweight = layout.pack(q)
    return (qweight, scales, zeros), layout.dequantize(qweight, scales, zeros)


def int8_rounded(x, block):
    """What the INT8 inner product sees of x [..., K]: each block of inputs rounded to int8 steps of max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape)


def int8_emulation(x, ids, weights, w1, w2, b1, b2, act, s1, s2, group):
    """reference.moe_experts with the activations of both GEMMs rounded as the INT8 kernel rounds them."""
    block = 32 if group % 32 == 0 else (16 if group % 16 == 0 else 8)
    out = torch.zeros(x.shape[0], w2.shape[1])
    for e in ids.unique().tolist():
        if e == R.NO_EXPERT:
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[token] * (s1[e] if s1 is not None else 1)
        h = int8_rounded(xe, block) @ w1[e].T + (b1[e] if b1 is not None else 0)
        a = R.gated_activation(h, act) * (s2[e] if s2 is not None else 1)
        y = int8_rounded(a, block) @ w2[e].T + (b2[e] if b2 is not None else 0)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


# (tokens, experts, hidden, inter, k, group, skip, bias, input scales, activation). Up to 16 rows per expert the
# 4-bit kernels take the decode path (rows streamed in memory order), above the tile path: the cases have both.
CASES_4BIT = [
    (1, 4, 64, 32, 2, 32, 0.0, False, False, "silu"),  # one token
    (7, 5, 96, 48, 2, 48, 0.25, False, True, "silu"),  # AWQ input scales, skipped slots, group 48 (int8 blocks of 16)
    (23, 6, 128, 40, 3, 8, 0.3, False, False, "silu"),  # inter not a multiple of the 16-row tile; group 8
    (9, 4, 64, 24, 2, 8, 0.2, True, True, "clamped_swiglu"),  # GPT-OSS: interleaved rows, biases, clamps
    (33, 16, 128, 64, 2, 64, 0.0, False, False, "silu"),  # 16 experts for 33 tokens: some get nothing
    (5, 3, 256, 128, 2, 128, 0.0, True, False, "silu"),  # group 128
    (40, 2, 64, 32, 2, 32, 0.0, False, False, "silu"),  # 40 rows per expert: every row-block size of the cores
    (3, 4, 72, 40, 2, 8, 0.0, True, False, "silu"),  # decode path (few rows per expert) with widths past whole tiles
]


@pytest.mark.parametrize("case", CASES_4BIT, ids=lambda c: f"T{c[0]}-E{c[1]}-H{c[2]}-I{c[3]}-g{c[5]}-{c[9]}")
@pytest.mark.parametrize("isa,inner", VARIANTS)  # the bf16 inner product is AVX-512 BF16 only
def test_4bit_moe_equals_reference(isa, inner, case, decode_items, monkeypatch):
    monkeypatch.setenv("MOEKERN_CPU_ISA", isa)
    monkeypatch.setenv("MOEKERN_CPU_INNER", inner)
    tokens, experts, hidden, inter, k, group, skip, bias, scales, act_kind = case
    act = R.Activation(act_kind, alpha=1.702, limit=1.5)
    x = torch.randn(tokens, hidden) * (3 if act_kind == "clamped_swiglu" else 1)  # large enough that clamps bite
    (p1, w1), (p2, w2) = quant4(experts, 2 * inter, hidden, group), quant4(experts, hidden, inter, group)
    b1, b2 = (torch.randn(experts, 2 * inter), torch.randn(experts, hidden)) if bias else (None, None)
    s1, s2 = (torch.rand(experts, hidden) + 0.5, torch.rand(experts, inter) + 0.5) if scales else (None, None)
    ids, weights = random_routing(tokens, experts, k, skip)
    got = cpu.moe_experts_4bit(x, ids, weights, p1, p2, b1, b2, s1, s2, act)
    eff1 = w1 if s1 is None else w1 * s1[:, None, :]
    eff2 = w2 if s2 is None else w2 * s2[:, None, :]
    expected = R.moe_experts(x, ids, weights, eff1, eff2, b1, b2, act)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert rel(got, expected) <= {"fp32": FP32_BOUND, "int8": INT8_BOUND, "bf16": BF16_BOUND}[inner]
    if inner == "int8":
        emulated = int8_emulation(x, ids, weights, w1, w2, b1, b2, act, s1, s2, group)
        assert rel(got, emulated) <= FP32_BOUND
    again = cpu.moe_experts_4bit(x, ids, weights, p1, p2, b1, b2, s1, s2, act)
    assert torch.equal(got, again), "not deterministic"


@pytest.mark.parametrize("what", ["every slot skipped", "every expert dropped"])
def test_4bit_nothing_to_compute_gives_zeros(isa, what):
    """Every slot skipped (per-token skip), or every expert of the layer dropped (ids all NO_EXPERT): zeros, and
    nothing read from the weights (here: weights of zero experts)."""
    experts = 0 if what == "every expert dropped" else 3
    (p1, _), (p2, _) = quant4(max(experts, 1), 32, 64, 32), quant4(max(experts, 1), 64, 16, 16)
    if experts == 0:
        p1, p2 = tuple(t[:0] for t in p1), tuple(t[:0] for t in p2)
    x = torch.randn(5, 64)
    ids = torch.full((5, 2), R.NO_EXPERT)
    out = cpu.moe_experts_4bit(x, ids, torch.rand(5, 2), p1, p2)
    assert torch.equal(out, torch.zeros(5, 64))


def test_4bit_bf16_and_fp16_activations(isa):
    """A bf16 (or fp16) model: scales in that dtype, output in that dtype, close to the fp32 reference."""
    (p1, w1), (p2, w2) = quant4(4, 64, 64, 32), quant4(4, 64, 32, 32)
    x = torch.randn(6, 64)
    ids, weights = random_routing(6, 4, 2)
    expected = R.moe_experts(x, ids, weights, w1, w2)
    for dtype in (torch.bfloat16, torch.float16):
        gate_up, down = (p1[0], p1[1].to(dtype), p1[2]), (p2[0], p2[1].to(dtype), p2[2])
        got = cpu.moe_experts_4bit(x.to(dtype), ids, weights, gate_up, down)
        assert got.dtype == dtype and rel(got, expected) <= INT8_BOUND + 1e-2


# (tokens, experts, hidden, inter, k, skip): few rows per expert (the fused kernel; for bf16 one row) and many (the
# GEMM path)
CASES_DENSE = [(1, 4, 32, 24, 2, 0.0), (7, 5, 40, 24, 2, 0.25), (9, 6, 35, 17, 3, 0.2), (64, 4, 48, 40, 2, 0.1)]


@pytest.mark.parametrize("case", CASES_DENSE, ids=lambda c: f"T{c[0]}-E{c[1]}-H{c[2]}-I{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_moe_equals_reference(isa, dtype, case):
    tokens, experts, hidden, inter, k, skip = case
    x = torch.randn(tokens, hidden).to(dtype)
    w1 = (torch.randn(experts, 2 * inter, hidden) * 0.2).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) * 0.2).to(dtype)
    ids, weights = random_routing(tokens, experts, k, skip)
    expected = R.moe_experts(x, ids, weights, w1, w2)
    got = cpu.moe_experts_dense(x, ids, weights, w1, w2)
    assert got.dtype == dtype
    assert rel(got, expected) <= (FP32_BOUND if dtype == torch.float32 else DENSE_BF16_BOUND)


def test_dense_gpt_oss_transposed_with_biases(isa):
    """GPT-OSS stores (in, out): transposed views, interleaved gate/up rows, biases, the clamped SwiGLU."""
    tokens, experts, hidden, inter, k = 9, 4, 32, 24, 2
    w1 = torch.randn(experts, hidden, 2 * inter).transpose(1, 2) * 0.2
    w2 = torch.randn(experts, inter, hidden).transpose(1, 2) * 0.2
    b1, b2 = torch.randn(experts, 2 * inter), torch.randn(experts, hidden)
    act = R.Activation("clamped_swiglu", alpha=1.702, limit=1.5)
    x = torch.randn(tokens, hidden) * 3
    ids, weights = random_routing(tokens, experts, k, 0.3)
    expected = R.moe_experts(x, ids, weights, w1, w2, b1, b2, act)
    assert rel(cpu.moe_experts_dense(x, ids, weights, w1, w2, b1, b2, act), expected) <= FP32_BOUND


# Experts large enough that the decode path splits each one's k-blocks in several items, which the threads claim one
# at a time, and sums the items' partials in pieces of columns (widths past a whole piece), or (whole experts) that
# the threads take an expert each: the cases above are small enough to run on the calling thread.
CASES_4BIT_SPLIT = [
    (2, 3, 1152, 1040, 2, 16, 0.0, True, False, "clamped_swiglu"),
    (3, 4, 1024, 1024, 2, 128, 0.3, True, True, "silu"),
]


@pytest.mark.parametrize("case", CASES_4BIT_SPLIT, ids=lambda c: f"T{c[0]}-E{c[1]}-H{c[2]}-I{c[3]}-g{c[5]}-{c[9]}")
@pytest.mark.parametrize("isa,inner", VARIANTS)
def test_4bit_moe_decode_items_split_among_threads(isa, inner, case, decode_items, monkeypatch):
    test_4bit_moe_equals_reference(isa, inner, case, decode_items, monkeypatch)


@pytest.mark.parametrize("inner", ["int8", "fp32"])
def test_4bit_linear_split_among_threads(isa, inner, monkeypatch):
    """One row through a Linear wide enough for several items and pieces: the decode path's sums [rows, N]."""
    monkeypatch.setenv("MOEKERN_CPU_INNER", inner)
    (packed, w) = quant4(1, 1040, 1024, 64)
    weight = tuple(t[0] for t in packed)
    x, bias = torch.randn(1, 1024), torch.randn(1040)
    got = cpu.linear_4bit(x, weight, bias)
    assert rel(got, torch.nn.functional.linear(x, w[0], bias)) <= (FP32_BOUND if inner == "fp32" else INT8_BOUND)
    assert torch.equal(got, cpu.linear_4bit(x, weight, bias)), "not deterministic"


@pytest.mark.parametrize("inner", ["int8", "fp32"])
def test_4bit_linear(isa, inner, monkeypatch):
    monkeypatch.setenv("MOEKERN_CPU_INNER", inner)
    (packed, w) = quant4(1, 40, 96, 32)
    weight = tuple(t[0] for t in packed)
    x, bias, scale = torch.randn(3, 5, 96), torch.randn(40), torch.rand(96) + 0.5
    expected = torch.nn.functional.linear(x * scale, w[0], bias)
    got = cpu.linear_4bit(x, weight, bias, scale)
    assert got.shape == (3, 5, 40)
    assert rel(got, expected) <= (FP32_BOUND if inner == "fp32" else INT8_BOUND)


def test_variants_agree_and_bad_choices_are_clear(monkeypatch):
    """The same INT8 arithmetic in every variant (up to the order of fp32 sums); a bad choice names the options."""
    (p1, _), (p2, _) = quant4(3, 64, 64, 32), quant4(3, 64, 32, 32)
    gate_up, down = p1, p2
    x = torch.randn(4, 64)
    ids, weights = random_routing(4, 3, 2)
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("MOEKERN_CPU_ISA", isa)
        outs[isa] = cpu.moe_experts_4bit(x, ids, weights, gate_up, down)
    assert all(rel(o, outs["portable"]) <= FP32_BOUND for o in outs.values())
    monkeypatch.setenv("MOEKERN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="MOEKERN_CPU_ISA='sse9'; choose auto, avx512, avx2, portable"):
        cpu.isa()
    monkeypatch.setenv("MOEKERN_CPU_ISA", "auto")
    monkeypatch.setenv("MOEKERN_CPU_INNER", "int4")
    with pytest.raises(ValueError, match="MOEKERN_CPU_INNER"):
        cpu.inner()


def test_read_probe_reads_every_byte():
    buf = torch.arange(1 << 20, dtype=torch.int64)
    assert cpu.read_bytes(buf) == int(buf.sum())


def test_work_is_spread_over_torchs_threads():
    """The kernels split their work with at::parallel_for, which runs on one thread unless the library was built with
    OpenMP: every op would then read memory at one core's rate."""
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, 2, before}):
            torch.set_num_threads(threads)
            assert cpu.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_auto_picks_the_best_variant_this_cpu_has():
    flags = cpu.cpu_flags().split()
    best = "avx512" if "avx512vnni" in flags else ("avx2" if "avx2" in flags else "portable")
    assert os.environ.get("MOEKERN_CPU_ISA", "auto") != "auto" or cpu.isa_name() == best


ROUTERS = {
    "mixtral": R.RouterSpec("softmax", 2, renormalize=True),
    "olmoe": R.RouterSpec("softmax", 3),
    "deepseek_v2": R.RouterSpec("softmax", 2, scaling=2.5, n_group=4, topk_group=2, group_score="max"),
    "deepseek_v3": R.RouterSpec("sigmoid", 3, renormalize=True, scaling=1.5, n_group=4, topk_group=2,
                                group_score="top2_sum"),
    "gpt_oss": R.RouterSpec("topk_softmax", 2),
}


@pytest.mark.parametrize("family", list(ROUTERS))
@pytest.mark.parametrize("tokens,experts", [(1, 8), (19, 16), (11, 60)])
def test_router_equals_reference(family, tokens, experts):
    """The C++ router: every family's scoring, dropped experts (all but k, too), correction bias, per-token skip,
    and the mapping of ids to stored rows after Expert Drop."""
    spec = ROUTERS[family]
    if experts % spec.n_group:
        spec = R.RouterSpec(spec.scoring, spec.top_k, spec.renormalize, spec.scaling)
    logits = torch.randn(tokens, experts) * 2
    some_dead = torch.rand(experts) > 0.3
    some_dead[torch.randperm(experts)[: spec.top_k]] = True
    only_k = torch.zeros(experts, dtype=torch.bool)
    only_k[torch.randperm(experts)[: spec.top_k - 1]] = True  # fewer survivors than k: empty slots
    bias = torch.randn(experts) * 0.3 if spec.scoring == "sigmoid" else None
    for alive in (None, some_dead, only_k):
        for beta in (None, 0.6):
            w_ref, ids_ref = R.route(logits, spec, alive, bias, beta)
            w, ids = cpu.route(logits, spec, alive, bias, beta)
            assert ids.dtype == torch.int64 and w.dtype == torch.float32
            assert torch.equal(ids, ids_ref), (ids, ids_ref)
            torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
            if alive is not None:
                row = torch.full((experts,), R.NO_EXPERT)
                row[alive] = torch.arange(int(alive.sum()))
                _, rows = cpu.route(logits, spec, alive, bias, beta, row)
                assert torch.equal(rows, row[ids_ref.clamp(min=0)].masked_fill(ids_ref == R.NO_EXPERT, R.NO_EXPERT))


@pytest.mark.parametrize("act", [R.Activation("silu"), R.Activation("clamped_swiglu", alpha=1.702, limit=7.0)])
def test_gated_activation_equals_reference(isa, act):
    """The decode path's epilogue (a vector exp in the avx512 and avx2 variants) against torch's SiLU / sigmoid, over
    odd widths and the whole fp32 range: where exp overflows or underflows, 0, inf and NaN. fp32 bound: 1e-6 of each
    element (a few ulp), and 1e-30 absolute (e^x of x below -87 is a subnormal or 0 in torch, and the avx2 variant
    stops at 1.2e-38)."""
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 20.0, -20.0, 87.0, -87.0, 88.5, -88.5, 89.5, -89.5,
                            103.0, -103.0, 110.0, -110.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan")])
    for width in (1, 15, 16, 17, 37, 1024 + 5):
        gate_up = torch.randn(3, 2 * width) * torch.tensor([1.0, 10.0, 100.0]).unsqueeze(1)
        flat = gate_up.view(-1)
        flat[torch.randperm(flat.numel())[:special.numel()]] = special[:flat.numel()]
        got, want = cpu.gated_activation(gate_up, act), R.gated_activation(gate_up, act)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_dense_linear(isa, dtype, rows):
    """The decode-sized Linear: widths past whole vectors (70 inputs, 37 outputs), a bias."""
    w, b = (torch.randn(37, 70) * 0.2).to(dtype), torch.randn(37).to(dtype)
    x = torch.randn(2, rows, 70).to(dtype)
    got = cpu.linear_dense(x, w, b)
    assert got.shape == (2, rows, 37) and got.dtype == dtype
    assert rel(got, torch.nn.functional.linear(x.float(), w.float(), b.float())) <= (
        FP32_BOUND if dtype == torch.float32 else DENSE_BF16_BOUND)
