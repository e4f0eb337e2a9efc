"""The experts computation moekern gives transformers: registered as the experts implementation "moekern", and
called by moekern's own MoE block. It reads the HF experts module's stacked weights as they are. Which kernels run
is decided in one place, moekern.ops.backend."""

import os
import sys

import torch

from moekern.models.base import expert_activation, expert_weights
from moekern.ops import backend, reference


def experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts interface: hidden [T, H], top_k_index and top_k_weights [T, k] -> [T, H].

    An index of -1 (reference.NO_EXPERT) is a slot that is not computed: a skipped slot or a dropped expert.
    4-bit experts (moekern.modules.quant.QuantizedExperts) go to the same kernels with their packed weights (the
    dequantization happens in the K loop), or to their dequantizing reference on the reference backend.
    """
    tap = getattr(experts, "calibration_tap", None)
    if tap is not None:  # moekern.compression.slimming.calibrate records which tokens reach which expert
        tap(hidden_states, top_k_index, top_k_weights)
    adapter = getattr(experts, "lora_experts", None)
    if adapter is not None:  # LoRA over the frozen experts (moekern.modules.lora): its own differentiable path
        return adapter(experts, hidden_states, top_k_index, top_k_weights)
    device, dtype = hidden_states.device, hidden_states.dtype
    if is_4bit(experts):
        path = backend.experts_path(device, dtype, experts.group_size)
        if path == "cpu":
            return experts.cpu_forward(hidden_states, top_k_index, top_k_weights)
        if path == "reference":
            return experts.reference_forward(hidden_states, top_k_index, top_k_weights)
        moe_gemm = _triton_kernels(device)
        gate_up, down = (moe_gemm.Quant4(*experts.packed(name)) for name in ("gate_up_proj", "down_proj"))
        return moe_gemm.moe_experts(
            hidden_states, top_k_index, top_k_weights, gate_up, down,
            getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None), experts.act,
        )
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
    act = expert_activation(experts)
    path = backend.experts_path(device, dtype) if isinstance(w_gate_up, torch.Tensor) else "reference"
    if path == "cpu" and w_gate_up.dtype in _DENSE:
        from moekern.ops import cpu

        return cpu.moe_experts_dense(hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down,
                                     act)
    if path == "triton" and w_gate_up.dtype in _DENSE:  # Triton kernels for stacked bf16/fp16/fp32 weights
        moe_gemm = _triton_kernels(device)
        return moe_gemm.moe_experts(hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down,
                                    act)
    return reference.moe_experts(hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down, act)


_DENSE = (torch.bfloat16, torch.float16, torch.float32)


def is_4bit(experts: torch.nn.Module) -> bool:
    """Whether `experts` holds packed 4-bit weights (moekern.modules.quant.QuantizedExperts, whose forward calls
    experts_forward: this module knows it by its packed tensors, so that it need not import it)."""
    return callable(getattr(experts, "packed", None)) and hasattr(experts, "gate_up_proj_qweight")


def select_experts(logits, spec, alive, correction_bias, skip_beta, expert_row=None):
    """Router logits -> (weights, ids) for MoEBlock (vLLM's name for this step), with reference.route's semantics:
    the Triton routing kernel (routing.route) on the Triton backend, the C++ router (cpu.route) on the CPU kernels'
    (one loop per token instead of some twenty small tensor ops, which at decode cost more than the 4-bit experts),
    reference.route elsewhere. A skipped slot or an empty one
    is NO_EXPERT. expert_row: ids come back as the rows the experts are stored at (both kernels map them in the same
    launch)."""
    path = backend.backend_for(logits.device)
    if path == "cpu":
        from moekern.ops import cpu

        return cpu.route(logits, spec, alive, correction_bias, skip_beta, expert_row)
    if path == "triton":
        _triton_kernels(logits.device)  # sets up the interpreter on a CPU before the kernels' first import
        from moekern.ops import routing

        return routing.route(logits, spec, alive, correction_bias, skip_beta, expert_row=expert_row)
    weights, ids = reference.route(logits, spec, alive, correction_bias, skip_beta)
    if expert_row is not None:
        ids = expert_row[ids.clamp(min=0)].masked_fill(ids == reference.NO_EXPERT, reference.NO_EXPERT)
    return weights, ids


route = select_experts  # its earlier name


def _triton_kernels(device: torch.device):
    """moekern.ops.moe_gemm, imported on first use. For CPU tensors the kernels must be interpreted, and Triton
    decides that when a kernel is decorated: so TRITON_INTERPRET is set before the first import."""
    if device.type != "cuda" and not {"moekern.ops.moe_gemm", "moekern.ops.routing"} & set(sys.modules):
        os.environ["TRITON_INTERPRET"] = "1"
    from moekern.ops import moe_gemm

    return moe_gemm
