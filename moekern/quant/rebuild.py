"""Rebuild the 4-bit modules of a saved quantized model on a freshly built (meta) model, from the names and shapes
of its state dict, so that load_state_dict(assign=True) can fill them (called by moekern.checkpoint.replay)."""

import torch
from torch import nn

from moekern.models.base import expert_activation
from moekern.modules.quant import QuantizedExperts, QuantizedLinear
from moekern.quant import targets


def _buffers_under(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {
        name[len(prefix) :]: torch.empty_like(tensor, device="meta")
        for name, tensor in state.items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    }


def rebuild_quantized(model: nn.Module, state: dict) -> int:
    """Swap in QuantizedExperts / QuantizedLinear wherever the state holds 4-bit tensors; returns how many."""
    count = 0
    for path, module in list(model.named_modules()):
        if not path:
            continue
        if f"{path}.gate_up_proj_qweight" in state and hasattr(module, "gate_up_proj"):
            buffers = _buffers_under(state, f"{path}.")
            targets.set_module(model, path, QuantizedExperts(buffers, expert_activation(module)))
            count += 1
        elif f"{path}.qweight" in state and isinstance(module, nn.Linear):
            targets.set_module(model, path, QuantizedLinear(_buffers_under(state, f"{path}.")))
            count += 1
    return count
