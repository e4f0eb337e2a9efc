"""The 4-bit modules against the reference on their dequantized weights, and their place in a model: the HF block
and moekern's MoEBlock both reach them through experts_forward.

On the CPU the modules run the C++ kernels; with fp32 activations (MOEKERN_CPU_INNER=fp32) those compute the
reference's products, so the bounds below are fp32's. The default int8 activations are tested in test_ops_cpu.py."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import rel_err, tiny_model

from moekern import surgery
from moekern.modules.experts import experts_forward
from moekern.modules.quant import QuantizedExperts, QuantizedLinear
from moekern.ops.reference import NO_EXPERT, Activation, moe_experts
from moekern.compression.slimming import QuantConfig, quantize_
from moekern.formats import layout


@pytest.fixture(autouse=True)
def fp32_activations(monkeypatch):
    monkeypatch.setenv("MOEKERN_CPU_INNER", "fp32")


def random_packed(*lead, n, k, group):
    q = torch.randint(0, 16, (*lead, n, k), dtype=torch.uint8)
    return {"qweight": layout.pack(q), "scales": torch.rand(*lead, k // group, n) * 0.1 + 0.01,
            "zeros": torch.randint(0, 16, (*lead, k // group, n), dtype=torch.uint8)}


def random_experts(experts, hidden, inter, group, bias, input_scale, act):
    tensors = {}
    for name, (n, k) in {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}.items():
        tensors.update({f"{name}_{key}": v for key, v in random_packed(experts, n=n, k=k, group=group).items()})
        if bias:
            tensors[f"{name}_bias"] = torch.randn(experts, n)
        if input_scale:
            tensors[f"{name}_input_scale"] = torch.rand(experts, k) + 0.5
    return QuantizedExperts(tensors, act)


def dequantized_stacks(module):
    w = {}
    for name in ("gate_up_proj", "down_proj"):
        deq = layout.dequantize(*(getattr(module, f"{name}_{p}") for p in ("qweight", "scales", "zeros")))
        scale = getattr(module, f"{name}_input_scale", None)
        w[name] = deq if scale is None else deq * scale[:, None, :]
    return w["gate_up_proj"], w["down_proj"]


CASES = [  # experts, hidden, inter, group, tokens, top_k, bias, input scale, activation
    (5, 64, 32, 32, 7, 2, False, False, "silu"),
    (3, 128, 64, 64, 1, 2, False, True, "silu"),  # one token
    (7, 64, 96, 32, 11, 3, True, True, "clamped_swiglu"),
    (1, 32, 32, 32, 4, 1, False, False, "silu"),
]


@pytest.mark.parametrize("case", CASES)
def test_quantized_experts_equal_the_reference_on_dequantized_weights(case):
    experts, hidden, inter, group, tokens, top_k, bias, input_scale, act = case
    module = random_experts(experts, hidden, inter, group, bias, input_scale, Activation(act))
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids[0, -1] = NO_EXPERT  # a skipped slot; with few tokens some experts get nothing
    weights = torch.rand(tokens, top_k)
    w_gate_up, w_down = dequantized_stacks(module)
    b_gate_up = getattr(module, "gate_up_proj_bias", None)
    b_down = getattr(module, "down_proj_bias", None)
    expected = moe_experts(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, Activation(act))
    assert rel_err(module(x, ids, weights), expected) <= 1e-6
    assert rel_err(experts_forward(module, x, ids, weights), expected) <= 1e-6


def test_no_token_at_all_gives_zeros():
    module = random_experts(3, 32, 32, 32, False, False, Activation())
    out = module(torch.randn(2, 32), torch.full((2, 2), NO_EXPERT), torch.rand(2, 2))
    assert torch.equal(out, torch.zeros(2, 32))


def test_quantized_linear_is_dequantize_then_linear():
    packed = random_packed(n=24, k=64, group=32)
    bias, scale = torch.randn(24), torch.rand(64) + 0.5
    linear = QuantizedLinear({**packed, "bias": bias, "input_scale": scale})
    x = torch.randn(3, 5, 64)
    w = layout.dequantize(packed["qweight"], packed["scales"], packed["zeros"])
    assert rel_err(linear(x), F.linear(x * scale, w, bias)) <= 1e-6
    assert rel_err(linear.dequantized(), w * scale) <= 1e-6


def test_hf_block_and_moeblock_both_run_quantized_experts():
    """The HF block calls the module; after an Expert Drop on the quantized model, MoEBlock calls experts_forward:
    both equal the reference on the dequantized weights, and the 4-bit buffers are sliced to the survivors."""
    model = tiny_model("mixtral", num_hidden_layers=2)
    quantize_(model, QuantConfig("rtn", group_size=8))
    block = model.model.layers[0].mlp
    assert isinstance(block.experts, QuantizedExperts)
    x = torch.randn(9, 32)
    _, weights, ids = block.gate(x)  # Mixtral's router: (logits, top-k weights, top-k ids)
    w_gate_up, w_down = dequantized_stacks(block.experts)
    expected = moe_experts(x, ids, weights, w_gate_up, w_down)
    assert rel_err(block(x[None])[0], expected) <= 1e-6

    surgery.drop_experts(model, {0: [0, 2, 3, 5]})
    moe = model.model.layers[0].mlp
    assert moe.experts.gate_up_proj_qweight.shape[0] == 4 and moe.hf_block.experts is moe.experts
    ids_tokens = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        model(ids_tokens)  # runs through MoEBlock -> experts_forward -> 4-bit reference
