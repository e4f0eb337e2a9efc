"""The Triton grouped MoE GEMM (moekern.ops.moe_gemm) equals reference.moe_experts on fresh random inputs: dense and
4-bit weights, SiLU and GPT-OSS's clamped SwiGLU with biases on transposed views, the tensor-core and the decode
(GEMV, split-K) paths, odd sizes, one token, empty experts, all but k experts dropped, every slot skipped.
Every buffer the kernels allocate is poisoned with NaN first, so an element read before it is written fails."""

from dataclasses import replace


import pytest
import torch

from moekern.ops import moe_gemm, routing, tuning
from moekern.ops import reference as R
from moekern.formats import layout


pytestmark = pytest.mark.usefixtures("on_test_device", "poisoned_kernel_outputs")

FP32_BOUND = 1e-5  # fp32 math throughout (the interpreter); the order of the sums differs from the reference
BF16_BOUND = 2e-2



def rel(a, b):
    assert not a.isnan().any(), "NaN: an element was read or returned unwritten"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def random_routing(tokens, experts, k, usable=None, skip=0.0):
    """ids [T, k] over `usable` experts (all by default), distinct per token, a fraction `skip` of slots NO_EXPERT."""
    usable = torch.arange(experts) if usable is None else usable
    ids = torch.stack([usable[torch.randperm(usable.numel())[:k]] for _ in range(tokens)])
    ids = ids.masked_fill(torch.rand(tokens, k) < skip, R.NO_EXPERT)
    return ids, torch.rand(tokens, k)


def dense(experts, hidden, inter, bias=False, transposed=False, dtype=torch.float32):
    w1, w2 = torch.randn(experts, 2 * inter, hidden) * 0.2, torch.randn(experts, hidden, inter) * 0.2
    if transposed:  # GPT-OSS stores (in, out): the kernels get transposed views
        w1, w2 = w1.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)
    b1, b2 = (torch.randn(experts, 2 * inter), torch.randn(experts, hidden)) if bias else (None, None)
    return [t if t is None else t.to(dtype) for t in (w1, w2, b1, b2)]


def quant4(experts, n, k, group):
    q = torch.randint(0, 16, (experts, n, k), dtype=torch.uint8)
    scales = torch.rand(experts, k // group, n) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (experts, k // group, n), dtype=torch.uint8)
    qweight = layout.pack(q)
    return moe_gemm.Quant4(qweight, scales, zeros), layout.dequantize(qweight, scales, zeros)


# (tokens, experts, hidden, inter, k, block_m): odd sizes; one token; more experts than pairs (empty experts);
# block_m None = the tuning table's choice, 1/4 = decode GEMV, 16 = tensor-core tiles
SHAPES = [(1, 4, 32, 24, 2, None), (7, 5, 40, 24, 2, 4), (23, 6, 48, 40, 3, 16), (3, 16, 32, 16, 2, 1)]


@pytest.mark.parametrize("tokens,experts,hidden,inter,k,bm", SHAPES)
def test_dense_silu_equals_reference(tokens, experts, hidden, inter, k, bm):
    x = torch.randn(tokens, hidden)
    w1, w2, _, _ = dense(experts, hidden, inter)
    ids, weights = random_routing(tokens, experts, k, skip=0.25)
    expected = R.moe_experts(x, ids, weights, w1, w2)
    got = moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=bm)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert rel(got, expected) <= FP32_BOUND
    assert torch.equal(got, moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=bm)), "not deterministic"


@pytest.mark.parametrize("bm", [2, 16])
def test_gpt_oss_clamped_swiglu_biases_transposed(bm):
    tokens, experts, hidden, inter, k = 9, 4, 32, 24, 2
    x = torch.randn(tokens, hidden) * 3  # large enough that the clamps bite
    w1, w2, b1, b2 = dense(experts, hidden, inter, bias=True, transposed=True)
    act = R.Activation("clamped_swiglu", alpha=1.702, limit=1.5)
    ids, weights = random_routing(tokens, experts, k, skip=0.3)
    expected = R.moe_experts(x, ids, weights, w1, w2, b1, b2, act)
    assert rel(moe_gemm.moe_experts(x, ids, weights, w1, w2, b1, b2, act, block_m=bm), expected) <= FP32_BOUND


@pytest.mark.parametrize("bm,group", [(None, 16), (16, 32)])
def test_4bit_equals_dequantized_reference(bm, group):
    tokens, experts, hidden, inter, k = 6, 4, 64, 32, 2
    x = torch.randn(tokens, hidden)
    (q1, d1), (q2, d2) = quant4(experts, 2 * inter, hidden, group), quant4(experts, hidden, inter, group)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    expected = R.moe_experts(x, ids, weights, d1, d2)
    assert rel(moe_gemm.moe_experts(x, ids, weights, q1, q2, block_m=bm), expected) <= FP32_BOUND


@pytest.mark.parametrize("bm", [1, 16])
def test_4bit_with_awq_input_scales(bm):
    """AWQ's unfolded per-expert input scales (gate_up over H, down over I) applied in the K loop equal the reference
    on the effective weights dequantize(W[e]) * input_scale[e]."""
    tokens, experts, hidden, inter, k, group = 9, 5, 64, 48, 2, 16
    x = torch.randn(tokens, hidden)
    (q1, d1), (q2, d2) = quant4(experts, 2 * inter, hidden, group), quant4(experts, hidden, inter, group)
    s1, s2 = torch.rand(experts, hidden) + 0.5, torch.rand(experts, inter) + 0.5
    q1, q2 = replace(q1, input_scale=s1), replace(q2, input_scale=s2)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    expected = R.moe_experts(x, ids, weights, d1 * s1[:, None, :], d2 * s2[:, None, :])
    assert rel(moe_gemm.moe_experts(x, ids, weights, q1, q2, block_m=bm), expected) <= FP32_BOUND


@pytest.mark.parametrize("quant", [False, True])
def test_split_k_decode_is_deterministic(monkeypatch, quant):
    """The down GEMM split in 4 along K: partial sums reduced in a fixed order, the same bits on every run."""
    orig = tuning.fallback
    monkeypatch.setattr(tuning, "fallback", lambda op, *a: replace(orig(op, *a), BLOCK_K=16,
                                                                  SPLIT_K=4 if op == "down" else 1))
    tokens, experts, hidden, inter, k = 2, 4, 32, 64, 2
    x = torch.randn(tokens, hidden)
    if quant:
        (w1, d1), (w2, d2) = quant4(experts, 2 * inter, hidden, 16), quant4(experts, hidden, inter, 16)
    else:
        w1, w2, _, _ = dense(experts, hidden, inter)
        d1, d2 = w1, w2
    ids, weights = random_routing(tokens, experts, k)
    expected = R.moe_experts(x, ids, weights, d1, d2)
    first = moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=1)
    assert rel(first, expected) <= FP32_BOUND
    assert torch.equal(first, moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=1))


def test_all_but_k_experts_dropped_and_every_slot_skipped():
    tokens, experts, hidden, inter, k = 11, 8, 32, 16, 2
    x = torch.randn(tokens, hidden)
    w1, w2, _, _ = dense(experts, hidden, inter)
    ids, weights = random_routing(tokens, experts, k, usable=torch.tensor([3, 6]))  # 6 experts dropped
    assert rel(moe_gemm.moe_experts(x, ids, weights, w1, w2), R.moe_experts(x, ids, weights, w1, w2)) <= FP32_BOUND

    ids[[0, 4, 10]] = R.NO_EXPERT  # three tokens with every slot skipped: exactly zero, never computed
    got = moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=4)
    assert (got[[0, 4, 10]] == 0).all()
    assert rel(got, R.moe_experts(x, ids, weights, w1, w2)) <= FP32_BOUND

    none = torch.full_like(ids, R.NO_EXPERT)
    assert (moe_gemm.moe_experts(x, none, weights, w1, w2) == 0).all()


def test_bf16_inputs():
    """bf16 activations and weights (fp32 math in the interpreter; the bound is bf16's rounding of in and out)."""
    tokens, experts, hidden, inter, k = 10, 4, 32, 24, 2
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    w1, w2, _, _ = dense(experts, hidden, inter, dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, experts, k)
    expected = R.moe_experts(x.float(), ids, weights, w1.float(), w2.float())
    got = moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=16)
    assert got.dtype == torch.bfloat16 and rel(got, expected) <= BF16_BOUND


def test_routing_to_gemm_end_to_end():
    """The Triton router's output fed straight to the GEMM (int32 ids, skipped slots) equals the reference chain."""
    tokens, experts, hidden, inter = 13, 8, 32, 16
    spec = R.RouterSpec("sigmoid", 3, renormalize=True, scaling=1.5, n_group=4, topk_group=2, group_score="top2_sum")
    logits, bias = torch.randn(tokens, experts), torch.randn(experts) * 0.2
    alive = torch.ones(experts, dtype=torch.bool)
    alive[[1, 4]] = False
    x = torch.randn(tokens, hidden)
    w1, w2, _, _ = dense(experts, hidden, inter)
    w_ref, ids_ref = R.route(logits, spec, alive, bias, 0.4)
    w, ids = routing.route(logits, spec, alive, bias, 0.4)
    expected = R.moe_experts(x, ids_ref, w_ref, w1, w2)
    assert rel(moe_gemm.moe_experts(x, ids, w, w1, w2), expected) <= FP32_BOUND


# ----------------------------------------------------------------------------------------------------------------------
# The tensor-core paths: groups of 64 and more (K steps of whole groups, the scale after the MMA at decode, inside the
# dequantization at prefill), the real fp16 / bf16 tl.dot, both register layouts, gate_up split-K
# ----------------------------------------------------------------------------------------------------------------------
FP16_BOUND = 4e-3  # fp16 operands into an fp32-accumulating dot: x and the intermediate rounded to fp16


def quant4_typed(experts, n, k, group, dtype):
    q4, dq = quant4(experts, n, k, group)
    q4 = moe_gemm.Quant4(q4.qweight, q4.scales.to(dtype), q4.zeros)
    return q4, layout.dequantize(q4.qweight, q4.scales.float(), q4.zeros)


@pytest.mark.parametrize("group,bm", [(64, 16), (128, 16), (64, 32), (128, 64)])
def test_4bit_whole_group_steps(group, bm):
    """K steps of whole groups: at decode (block 16) each group's MMA result times its scales, above it the scales
    inside the dequantization; hidden K = 384 takes three groups of 64 a step at decode, inter K = 128 two."""
    tokens, experts, hidden, inter, k = 17, 3, 384, 128, 2
    x = torch.randn(tokens, hidden)
    (q1, d1), (q2, d2) = quant4(experts, 2 * inter, hidden, group), quant4(experts, hidden, inter, group)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    expected = R.moe_experts(x, ids, weights, d1, d2)
    assert rel(moe_gemm.moe_experts(x, ids, weights, q1, q2, block_m=bm), expected) <= FP32_BOUND


@pytest.mark.parametrize("groups_a_step,split", [(1, 1), (2, 2), (3, 1), (4, 2), (5, 1), (5, 2)])
def test_4bit_steps_of_several_groups(monkeypatch, groups_a_step, split):
    """Decode K steps of one to five groups of 64 (GPT-OSS takes five: 2880 = 9 x 320), split or not along K: every
    group's zeros and scales come from the tensor-core meta layout at a fixed offset, read a step ahead (the last
    read one step past K, into the layout's padding); gate_up's gate and up halves plain and interleaved."""
    orig = tuning.fallback
    step = 64 * groups_a_step
    monkeypatch.setattr(tuning, "fallback", lambda *a: replace(orig(*a), BLOCK_K=step, SPLIT_K=split))
    tokens, experts, k = 4, 3, 2
    hidden, inter = 960 if 960 % step == 0 else 1024, 2 * step  # whole steps: the down GEMM takes two
    x = torch.randn(tokens, hidden)
    (q1, d1), (q2, d2) = quant4(experts, 2 * inter, hidden, 64), quant4(experts, hidden, inter, 64)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    cfg = tuning.config("gate_up", inter, hidden, True, tokens, 16, 1, 64)
    assert cfg.BLOCK_K == step and cfg.FACTORED
    for act in (R.Activation(), R.Activation("clamped_swiglu", alpha=1.702, limit=7.0)):
        expected = R.moe_experts(x, ids, weights, d1, d2, act=act)
        assert rel(moe_gemm.moe_experts(x, ids, weights, q1, q2, act=act, block_m=16), expected) <= FP32_BOUND


def test_decode_k_step_is_whole_groups_with_least_padding():
    assert tuning.decode_k_step(2880, 64) == 320  # GPT-OSS: nine steps, none padded
    assert all(tuning.decode_k_step(k, 128) == 256 for k in (768, 1024, 2048, 4096, 7168, 14336))
    assert tuning.decode_k_step(384, 128) == 128 and tuning.decode_k_step(384, 64) == 192
    assert tuning.decode_k_step(4096, 256) == 256


@pytest.mark.parametrize("group,bm", [(128, 16), (128, 64), (32, 16)])
def test_4bit_fp16_tensor_core_dot(group, bm):
    """fp16 activations and scales: the kernels' own tl.dot on fp16 operands (the interpreter computes it exactly),
    fed by the dequantized tile in the MMA's operand layout."""
    tokens, experts, hidden, inter, k = 21, 4, 256, 128, 2
    x = torch.randn(tokens, hidden).half()
    (q1, d1), (q2, d2) = quant4_typed(experts, 2 * inter, hidden, group, torch.float16), \
        quant4_typed(experts, hidden, inter, group, torch.float16)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    expected = R.moe_experts(x.float(), ids, weights, d1, d2)
    got = moe_gemm.moe_experts(x, ids, weights, q1, q2, block_m=bm)
    assert got.dtype == torch.float16 and rel(got, expected) <= FP16_BOUND


@pytest.mark.usefixtures("interpreter_bf16_dot")
@pytest.mark.parametrize("quant,bm", [(False, 16), (False, 64), (True, 16), (True, 64)])
def test_bf16_tensor_core_dot(quant, bm):
    """bf16 activations and weights through the kernels' bf16 tl.dot itself (the interpreter's dot mended to read
    bf16 values: exact products, fp32 sums, as the MMA does)."""
    tokens, experts, hidden, inter, k = 19, 4, 256, 128, 2
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    if quant:
        (w1, d1), (w2, d2) = quant4_typed(experts, 2 * inter, hidden, 128, torch.bfloat16), \
            quant4_typed(experts, hidden, inter, 128, torch.bfloat16)
    else:
        w1, w2, _, _ = dense(experts, hidden, inter, dtype=torch.bfloat16)
        d1, d2 = w1.float(), w2.float()
    ids, weights = random_routing(tokens, experts, k)
    assert not moe_gemm._dot_fp32(x, w1), "the bf16 tl.dot path must be the one under test"
    expected = R.moe_experts(x.float(), ids, weights, d1, d2)
    got = moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=bm)
    assert got.dtype == torch.bfloat16 and rel(got, expected) <= BF16_BOUND


@pytest.mark.parametrize("arch", [80, 90])
def test_4bit_both_register_layouts(arch):
    """The tensor-core words follow the target's A-operand layout (kwidth 2 for sm_90's wgmma, 8 for sm_80's
    mma.sync): either gives the reference's result."""
    tokens, experts, hidden, inter, k = 9, 4, 256, 64, 2
    x = torch.randn(tokens, hidden)
    (q1, d1), (q2, d2) = quant4(experts, 2 * inter, hidden, 64), quant4(experts, hidden, inter, 64)
    ids, weights = random_routing(tokens, experts, k, skip=0.2)
    with tuning.planning_for(arch):
        assert moe_gemm.mma_kwidth(x.device) == (2 if arch == 90 else 8)
        got = moe_gemm.moe_experts(x, ids, weights, q1, q2)
    assert rel(got, R.moe_experts(x, ids, weights, d1, d2)) <= FP32_BOUND


@pytest.mark.parametrize("quant", [False, True])
def test_gate_up_split_k_last_arriver(monkeypatch, quant):
    """gate_up split in 4 along K: each split's partial goes to the workspace and the tile's last program sums them in
    split order before the activation. Deterministic, right, and every counter back at zero for the next call."""
    orig = tuning.fallback
    monkeypatch.setattr(tuning, "fallback", lambda op, *a: replace(orig(op, *a), SPLIT_K=4 if op == "gate_up" else 2))
    monkeypatch.setattr(moe_gemm, "_COUNTERS", {})
    tokens, experts, hidden, inter, k = 3, 3, 512, 64, 2
    x = torch.randn(tokens, hidden)
    if quant:
        (w1, d1), (w2, d2) = quant4(experts, 2 * inter, hidden, 64), quant4(experts, hidden, inter, 64)
    else:
        w1, w2, _, _ = dense(experts, hidden, inter)
        d1, d2 = w1, w2
    ids, weights = random_routing(tokens, experts, k)
    first = moe_gemm.moe_experts(x, ids, weights, w1, w2)
    assert rel(first, R.moe_experts(x, ids, weights, d1, d2)) <= FP32_BOUND
    assert torch.equal(first, moe_gemm.moe_experts(x, ids, weights, w1, w2)), "not deterministic"
    (counters,) = moe_gemm._COUNTERS.values()
    assert (counters == 0).all(), "a tile's counter was left raised"


def test_ids_that_name_no_expert_are_never_read():
    """An id outside 0..E-1 (NO_EXPERT, or a stale id past the experts) is skipped by align and read as zero by the
    slot sum alike: the poisoned partial rows of those slots never reach the output."""
    tokens, experts, hidden, inter, k = 12, 5, 32, 16, 3
    x = torch.randn(tokens, hidden)
    w1, w2, _, _ = dense(experts, hidden, inter)
    ids, weights = random_routing(tokens, experts, k)
    ids[::3, 1] = experts  # one past the last expert
    ids[1::4, 2] = experts + 7
    expected = R.moe_experts(x, ids.masked_fill(ids >= experts, R.NO_EXPERT), weights, w1, w2)
    for bm in (1, 16):
        assert rel(moe_gemm.moe_experts(x, ids, weights, w1, w2, block_m=bm), expected) <= FP32_BOUND
