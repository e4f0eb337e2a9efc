"""End to end: a tiny patched model with MOEKERN_BACKEND=triton (the kernels, interpreted on the CPU) gives the
reference backend's logits, with dropped experts and per-token skip; and the backend switch itself."""


import pytest
import torch
from tiny_models import rel_err, tiny_model

from moekern import surgery
from moekern.modules import experts as experts_module
from moekern.modules.quant import QuantizedExperts
from moekern.ops import backend, cpu
from moekern.patching import patch
from moekern.compression.slimming import QuantConfig, quantize_


pytestmark = pytest.mark.usefixtures("on_test_device")

FP32_BOUND = 1e-5


def logits_under(monkeypatch, model, ids, backend):
    monkeypatch.setenv("MOEKERN_BACKEND", backend)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


def assert_triton_equals_reference(monkeypatch, model, ids):
    """Prefill and one cached decode step: the Triton backend (which must really be taken) gives the reference's
    logits."""
    calls = []
    real = experts_module._triton_kernels
    monkeypatch.setattr(experts_module, "_triton_kernels", lambda d: calls.append(d) or real(d))
    expected = logits_under(monkeypatch, model, ids, "reference")
    assert not calls
    got = logits_under(monkeypatch, model, ids, "triton")
    assert calls, "the Triton path was not taken"
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) <= FP32_BOUND


@pytest.mark.parametrize("family,compress", [("mixtral", True), ("gpt_oss", False), ("deepseek_v3", True)])
def test_patched_model_triton_equals_reference(monkeypatch, family, compress):
    model = tiny_model(family)
    patch(model)
    if compress:  # Expert Drop (weights sliced) in one MoE layer, per-token skip in all of them
        layers = surgery.moe_layer_ids(model)
        first = surgery.moe_block(model, layers[0])
        surgery.drop_experts(model, {layers[0]: list(range(first.num_original_experts - 3))})
        surgery.set_skip_beta(model, {layer: 0.5 for layer in layers})
    ids = torch.randint(3, 97, (2, 7))
    assert_triton_equals_reference(monkeypatch, model, ids)


@pytest.mark.parametrize("family,method,overrides", [
    ("mixtral", "awq", dict(intermediate_size=32)),  # AWQ: per-expert input scales on gate_up, in the K loop
    ("gpt_oss", "awq", dict(intermediate_size=32)),  # + the down input scale (clamped SwiGLU), biases, transposed
    ("qwen3_moe", "gptq", dict(moe_intermediate_size=32, intermediate_size=32)),
])
def test_4bit_model_triton_equals_reference(monkeypatch, family, method, overrides):
    """A quantized tiny model (after Expert Drop and with skip) on the 4-bit kernels and the Triton router gives the
    dequantizing reference's logits, prefill and one cached decode step."""
    model = tiny_model(family, **overrides)
    layers = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {layers[0]: [0, 2, 3, 5]})
    surgery.set_skip_beta(model, {layer: 0.3 for layer in layers})
    calibration = torch.randint(3, 97, (4, 16))
    quantize_(model, QuantConfig(method, group_size=16), calibration)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert len(quantized) == len(layers)
    if method == "awq":
        assert all(hasattr(m, "gate_up_proj_input_scale") for m in quantized)
    ids = torch.randint(3, 97, (2, 6))
    assert_triton_equals_reference(monkeypatch, model, ids)


def test_4bit_group_the_kernels_cannot_read(monkeypatch):
    """Group 8 (valid for the reference) runs the reference under auto, and is a clear error when Triton is forced."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    quantize_(model, QuantConfig("rtn", group_size=8), torch.randint(3, 97, (2, 8)))
    experts = next(m for m in model.modules() if isinstance(m, QuantizedExperts))
    monkeypatch.setenv("MOEKERN_BACKEND", "auto")
    assert backend.experts_path(torch.device("cuda"), torch.float32, experts.group_size) == "reference"
    monkeypatch.setenv("MOEKERN_BACKEND", "triton")
    with pytest.raises(ValueError, match="power-of-two group size"):
        backend.experts_path(torch.device("cpu"), torch.float32, experts.group_size)


def test_backend_choice(monkeypatch):
    """auto: Triton on CUDA tensors, the C++ kernels on CPU tensors (the reference where they could not be built)."""
    on_cpu, on_cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MOEKERN_BACKEND", raising=False)
    assert backend.backend_for(on_cpu) == ("cpu" if cpu.available() else "reference")
    assert backend.backend_for(on_cuda) == "triton"
    monkeypatch.setenv("MOEKERN_BACKEND", "triton")
    assert backend.backend_for(on_cpu) == "triton"
    monkeypatch.setenv("MOEKERN_BACKEND", "reference")
    assert backend.backend_for(on_cpu) == "reference"
    monkeypatch.setenv("MOEKERN_BACKEND", "cpu")
    with pytest.raises(ValueError, match="CPU tensors"):
        backend.backend_for(on_cuda)
    monkeypatch.setenv("MOEKERN_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="MOEKERN_BACKEND"):
        backend.backend_for(on_cpu)
