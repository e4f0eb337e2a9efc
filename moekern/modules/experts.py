"""The experts computation moekern gives transformers: registered as the experts implementation "moekern", and
called by moekern's own MoE block. It reads the HF experts module's stacked weights as they are."""

import os
import sys

import torch

from moekern.models.base import expert_activation, expert_weights
from moekern.modules.quant import QuantizedExperts
from moekern.ops import reference


def experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts interface: hidden [T, H], top_k_index and top_k_weights [T, k] -> [T, H].

    An index of -1 (reference.NO_EXPERT) is a slot that is not computed: a skipped slot or a dropped expert.
    4-bit experts (moekern.modules.quant.QuantizedExperts) go to the same kernels with their packed weights (the
    dequantization happens in the K loop), or to their dequantizing reference on the reference backend.
    """
    tap = getattr(experts, "calibration_tap", None)
    if tap is not None:  # moekern.quant.calibrate records which tokens reach which expert
        tap(hidden_states, top_k_index, top_k_weights)
    adapter = getattr(experts, "lora_experts", None)
    if adapter is not None:  # LoRA over the frozen experts (moekern.finetune.lora): its own differentiable path
        return adapter(experts, hidden_states, top_k_index, top_k_weights)
    if isinstance(experts, QuantizedExperts):
        if not _use_4bit_kernels(experts, hidden_states.device):
            return experts.reference_forward(hidden_states, top_k_index, top_k_weights)
        moe_gemm = _triton_kernels(hidden_states.device)
        gate_up, down = (moe_gemm.Quant4(*experts.packed(name)) for name in ("gate_up_proj", "down_proj"))
        return moe_gemm.moe_experts(
            hidden_states, top_k_index, top_k_weights, gate_up, down,
            getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None), experts.act,
        )
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
    # --- issue 5: Triton kernels for stacked bf16/fp16/fp32 weights (MOEKERN_BACKEND, see _backend) ---
    if isinstance(w_gate_up, torch.Tensor) and w_gate_up.dtype in _DENSE and _backend(hidden_states.device) == "triton":
        moe_gemm = _triton_kernels(hidden_states.device)
        return moe_gemm.moe_experts(
            hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down, expert_activation(experts)
        )
    return reference.moe_experts(
        hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down, expert_activation(experts)
    )


# ----------------------------------------------------------------------------------------------------------------------
# Backend choice (issue 5). MOEKERN_BACKEND=triton|reference|auto (default auto: Triton on CUDA, reference elsewhere).
# "triton" on a CPU tensor runs the kernels in Triton's interpreter, so a patched model can be checked end to end
# against the reference on a CPU. Only an env lookup and a device check on the host: nothing data-dependent, no sync.
# ----------------------------------------------------------------------------------------------------------------------
_DENSE = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "triton", "reference")


def _backend(device: torch.device) -> str:
    choice = os.environ.get("MOEKERN_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"MOEKERN_BACKEND={choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice


def route(logits, spec, alive, correction_bias, skip_beta, expert_row=None):
    """Router logits -> (weights, ids) for MoEBlock: the Triton routing kernel on the Triton backend (ids int32),
    reference.route elsewhere. Both mark a skipped slot or an empty one NO_EXPERT. expert_row: ids come back as the
    rows the experts are stored at (the Triton router maps them in its own launch)."""
    if _backend(logits.device) == "triton":
        _triton_kernels(logits.device)  # sets up the interpreter on a CPU before the kernels' first import
        from moekern.ops import routing

        return routing.route(logits, spec, alive, correction_bias, skip_beta, expert_row=expert_row)
    weights, ids = reference.route(logits, spec, alive, correction_bias, skip_beta)
    if expert_row is not None:
        ids = expert_row[ids.clamp(min=0)].masked_fill(ids == reference.NO_EXPERT, reference.NO_EXPERT)
    return weights, ids


def _use_4bit_kernels(experts: QuantizedExperts, device: torch.device) -> bool:
    """The 4-bit kernels read one scale row per K step: group sizes 16, 32, 64, 128... Other group sizes (a multiple
    of 8 that is not a power of two) run the dequantizing reference; forcing the kernels on them is an error."""
    if _backend(device) != "triton":
        return False
    from moekern.ops.tuning import group_size_supported  # launch rules only: no kernel is decorated by this import

    group = experts.group_size
    if group_size_supported(group):
        return True
    if os.environ.get("MOEKERN_BACKEND", "auto").lower() == "triton":
        raise ValueError(f"MOEKERN_BACKEND=triton: the 4-bit kernels need a power-of-two group size of at least 16, "
                         f"this model has {group}; requantize with group_size 32, 64 or 128, or use "
                         f"MOEKERN_BACKEND=reference")
    return False


def _triton_kernels(device: torch.device):
    """moekern.ops.moe_gemm, imported on first use. For CPU tensors the kernels must be interpreted, and Triton
    decides that when a kernel is decorated: so TRITON_INTERPRET is set before the first import."""
    if device.type != "cuda" and not {"moekern.ops.moe_gemm", "moekern.ops.routing"} & set(sys.modules):
        os.environ["TRITON_INTERPRET"] = "1"
    from moekern.ops import moe_gemm

    return moe_gemm
