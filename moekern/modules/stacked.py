"""StackedExperts: the routed experts of a model that keeps them as an nn.ModuleList of gated FFNs (DeepSeek-MoE's
remote code), restacked into the layout of transformers' own MoE experts (gate_up_proj [E, 2I, H], down_proj
[E, H, I]), so that every moekern path (routing, kernels, Expert Drop's slicing, 4-bit quantization) reads them as it
reads Mixtral's."""

import copy

import torch
from torch import nn


class StackedExperts(nn.Module):
    def __init__(self, experts: nn.ModuleList):
        """From a ModuleList of modules with gate_proj, up_proj, down_proj (nn.Linear without bias) and act_fn."""
        super().__init__()
        first = experts[0]
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]).detach()
        down = torch.stack([e.down_proj.weight for e in experts]).detach()
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=first.gate_proj.weight.requires_grad)
        self.down_proj = nn.Parameter(down, requires_grad=first.down_proj.weight.requires_grad)
        self.act_fn = first.act_fn
        self.num_experts = len(experts)
        # one expert without weights: how to build the ModuleList again (to_module_list)
        self._template = (copy.deepcopy(first).to("meta"),)  # a tuple hides it from nn.Module (no weights to save)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from moekern.modules.experts import experts_forward

        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def to_module_list(self) -> nn.ModuleList:
        """The experts as the ModuleList they came from (the current rows: after Expert Drop, only the kept ones)."""
        inter = self.down_proj.shape[-1]
        experts = []
        for e in range(self.gate_up_proj.shape[0]):
            expert = copy.deepcopy(self._template[0]).to_empty(device=self.gate_up_proj.device)
            expert.to(self.gate_up_proj.dtype)
            with torch.no_grad():
                expert.gate_proj.weight.copy_(self.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(self.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(self.down_proj[e])
            experts.append(expert)
        return nn.ModuleList(experts)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, gate_up_proj {tuple(self.gate_up_proj.shape)}"
