"""Packing: moekern's layout, AutoAWQ GEMM and GPTQ round-trip exactly, and checkpoints written by the published
rules (built here bit by bit, independently of moekern's packers) dequantize to the same weights."""

import pytest
import torch

from moekern.errors import MoekernError
from moekern.formats import layout, published as formats

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble i of a word holds output column 8c + order[i]


def random_quantized(*lead, n=48, k=64, group=32, dtype=torch.float16):
    q = torch.randint(0, 16, (*lead, n, k), dtype=torch.uint8)
    scales = (torch.rand(*lead, k // group, n) + 0.1).to(dtype)
    zeros = torch.randint(1, 16, (*lead, k // group, n), dtype=torch.uint8)
    return q, scales, zeros


def explicit_dequant(q, scales, zeros, group):
    """W [N, K] from codes [N, K] and the grid [K / G, N], one element at a time in spirit."""
    n, k = q.shape
    out = torch.empty(n, k, dtype=torch.float32)
    for kk in range(k):
        out[:, kk] = (q[:, kk].float() - zeros[kk // group].float()) * scales[kk // group].float()
    return out


@pytest.mark.parametrize("lead", [(), (3,)])
def test_every_format_round_trips_exactly(lead):
    q, scales, zeros = random_quantized(*lead)
    qweight = layout.pack(q)
    assert torch.equal(layout.unpack(qweight), q)
    awq = formats.from_awq(**formats.to_awq(qweight, scales, zeros))
    assert torch.equal(awq["qweight"], qweight) and torch.equal(awq["zeros"], zeros)
    assert torch.equal(awq["scales"], scales)
    for version in (1, 2):
        gptq = formats.from_gptq(**formats.to_gptq(qweight, scales, zeros, version), version=version)
        assert torch.equal(gptq["qweight"], qweight) and torch.equal(gptq["zeros"], zeros)
    zeros_with_zero = zeros.clone()
    zeros_with_zero[..., 0, :3] = 0
    gptq = formats.from_gptq(**formats.to_gptq(qweight, scales, zeros_with_zero, 2), version=2)
    assert torch.equal(gptq["zeros"], zeros_with_zero)


def test_an_awq_checkpoint_written_by_the_published_rules_loads():
    n, k, group = 16, 64, 32
    q, scales, zeros = random_quantized(n=n, k=k, group=group)
    intweight = q.T.to(torch.int64)  # AutoAWQ packs W^T [in, out]
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    qzeros = torch.zeros(k // group, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (4 * i)
    to_int32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731  (uint32 bits)
    loaded = formats.from_awq(to_int32(qweight), to_int32(qzeros), scales)
    got = layout.dequantize(loaded["qweight"], loaded["scales"].float(), loaded["zeros"])
    assert torch.equal(got, explicit_dequant(q, scales, zeros, group))
    exported = formats.to_awq(loaded["qweight"], loaded["scales"], loaded["zeros"])
    assert torch.equal(exported["qweight"], to_int32(qweight)) and torch.equal(exported["qzeros"], to_int32(qzeros))


def test_a_gptq_v1_checkpoint_written_by_the_published_rules_loads():
    n, k, group = 16, 64, 32
    q, scales, zeros = random_quantized(n=n, k=k, group=group)
    zeros[0, 0] = 0  # a zero of 0: v1 stores nibble 15, read back as the intended 0
    intweight = q.T.to(torch.int64)  # [in, out], packed along in: 8 input rows per int32
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= intweight[row * 8 + j] << (4 * j)
    stored = (zeros.to(torch.int64) - 1) & 0xF  # v1: zeros - 1
    qzeros = torch.zeros(k // group, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= stored[:, col * 8 + j] << (4 * j)
    g_idx = torch.tensor([i // group for i in range(k)], dtype=torch.int32)
    to_int32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    loaded = formats.from_gptq(to_int32(qweight), to_int32(qzeros), scales, g_idx, version=1)
    got = layout.dequantize(loaded["qweight"], loaded["scales"].float(), loaded["zeros"])
    assert torch.equal(got, explicit_dequant(q, scales, zeros, group))


def test_gptq_refusals():
    q, scales, zeros = random_quantized()
    qweight = layout.pack(q)
    zeros[0, 0] = 0
    with pytest.raises(MoekernError, match="zero point of 0"):
        formats.to_gptq(qweight, scales, zeros, version=1)
    exported = formats.to_gptq(qweight, scales, zeros, version=2)
    permuted = exported["g_idx"].flip(0)
    with pytest.raises(MoekernError, match="permutes its groups"):
        formats.from_gptq(exported["qweight"], exported["qzeros"], exported["scales"], permuted, version=2)
    with pytest.raises(MoekernError, match="inconsistent"):
        formats.from_awq(torch.zeros(64, 6, dtype=torch.int32), torch.zeros(2, 6, dtype=torch.int32),
                         torch.ones(2, 40, dtype=torch.float16))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_per_expert_checkpoint_tensors_stack_into_quantized_experts(fmt):
    from moekern.modules.quant import QuantizedExperts
    from moekern.ops.reference import Activation

    experts, hidden, inter = 3, 64, 32
    state = {}
    expected = {}
    for e in range(experts):
        for name, (n, k) in {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}.items():
            q, scales, zeros = random_quantized(n=n, k=k, group=32)
            expected[e, name] = layout.dequantize(layout.pack(q), scales, zeros)  # fp16, as the module computes
            packed = formats.to_awq(layout.pack(q), scales, zeros) if fmt == "awq" else \
                formats.to_gptq(layout.pack(q), scales, zeros)
            state.update({f"layers.0.experts.{e}.{name}.{key}": v for key, v in packed.items()})
    tensors = formats.import_experts(state, "layers.0.experts", experts, ("w1", "w3", "w2"), fmt)
    module = QuantizedExperts(tensors, Activation("silu"))
    for e in range(experts):
        gate_up = module.dequantized("gate_up_proj", e).float()
        assert torch.equal(gate_up, torch.cat([expected[e, "w1"], expected[e, "w3"]]))
        assert torch.equal(module.dequantized("down_proj", e).float(), expected[e, "w2"])
    back = formats.export_experts(module, "layers.0.experts", ("w1", "w3", "w2"), fmt)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
