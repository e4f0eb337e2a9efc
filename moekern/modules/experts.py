"""The experts computation moekern gives transformers: registered as the experts implementation "moekern", and
called by moekern's own MoE block. It reads the HF experts module's stacked weights as they are."""

import torch

from moekern.models.base import expert_activation, expert_weights
from moekern.ops import reference


def experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts interface: hidden [T, H], top_k_index and top_k_weights [T, k] -> [T, H].

    An index of -1 (reference.NO_EXPERT) is a slot that is not computed: a skipped slot or a dropped expert.
    """
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
    return reference.moe_experts(
        hidden_states, top_k_index, top_k_weights, w_gate_up, w_down, b_gate_up, b_down, expert_activation(experts)
    )
