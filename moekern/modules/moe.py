"""MoEBlock: the drop-in for an HF MoE block whose routing changed (dropped experts, per-token skip), and RemovedMoE,
what is left of a layer whose MoE was removed (Layer Drop).

MoEBlock adopts the HF block's children under their own names (gate/router, experts, shared experts), so its
state_dict keys are the HF ones and a checkpoint of it is a plain HF checkpoint with fewer experts.
"""

import torch
from torch import nn

from moekern.models.base import Family
from moekern.modules.experts import experts_forward, select_experts
from moekern.ops.reference import NO_EXPERT


class MoEBlock(nn.Module):
    def __init__(self, hf_block: nn.Module, family: Family, config, num_original_experts: int):
        super().__init__()
        for name, child in hf_block.named_children():
            self.add_module(name, child)
        self.family = family
        self.spec = family.router_spec(config)
        self.num_original_experts = num_original_experts
        # kept_experts: the original id of each stored expert; expert_row: the storage row of each original expert
        # (NO_EXPERT for a dropped one); alive: False for a dropped expert, also in "mask only" mode where the weights
        # stay. All three follow from the decisions in config.moekern, so they are not saved.
        # On the block's device, so a model patched after .to("cuda") routes without a host round trip; a skeleton on
        # the meta device (moekern.load) keeps them on the CPU, where its replay of the decisions reads them.
        device = next(iter(hf_block.state_dict().values())).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("alive", torch.ones(num_original_experts, dtype=torch.bool, device=device),
                             persistent=False)
        self.set_kept_experts(torch.arange(self.experts.num_experts, device=device))
        self.skip_beta: float | None = None
        self._hf_block = (hf_block,)  # a tuple hides it from nn.Module: unpatch puts it back

    @property
    def hf_block(self) -> nn.Module:
        return self._hf_block[0]

    def set_kept_experts(self, kept: torch.Tensor) -> None:
        """Declare which original experts the stored rows are (after the weights were sliced to them)."""
        kept = kept.to(torch.long)
        row = torch.full((self.num_original_experts,), NO_EXPERT, dtype=torch.long, device=kept.device)
        row[kept] = torch.arange(kept.numel(), device=kept.device)
        self.register_buffer("kept_experts", kept, persistent=False)
        self.register_buffer("expert_row", row, persistent=False)

    def compact(self) -> bool:
        return self.kept_experts.numel() < self.num_original_experts

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router = getattr(self, self.family.router_attr)
        logits = self.family.router_logits(router, x)
        bias = self.family.correction_bias(router)
        if self.compact():  # route in the original expert space: dropped experts have no logit
            full = logits.new_full((x.shape[0], self.num_original_experts), float("-inf"))
            logits = full.index_copy_(1, self.kept_experts, logits)
            if bias is not None:
                bias = bias.new_zeros(self.num_original_experts).index_copy_(0, self.kept_experts, bias)
        _record_router_logits(logits)
        weights, rows = select_experts(logits, self.spec, self.alive, bias, self.skip_beta, expert_row=self.expert_row)
        out = experts_forward(self.experts, x, rows, weights)
        shared = self.family.shared_output(self, x)
        if shared is not None:
            out = out + shared
        out = out.reshape(shape)
        return (out, weights) if self.family.returns_router_scores else out

    def extra_repr(self) -> str:
        kept = f"{self.kept_experts.numel()}/{self.num_original_experts} experts stored"
        masked = int((~self.alive).sum())
        return f"{self.family.name}, {kept}, {masked} masked, skip_beta={self.skip_beta}"


def _record_router_logits(logits: torch.Tensor) -> None:
    """Give transformers' output recorder this layer's router logits (output_router_logits=True, and the auxiliary
    load-balancing loss of fine-tuning), as the HF router's hook would: in the original expert space, a dropped
    expert at -inf (softmax 0), so every layer's logits have the config's expert count. The recorder hooks the HF
    router module, which MoEBlock does not call, so the logits are handed to its collector (transformers 5)."""
    collected = _active_collector.get() if _active_collector is not None else None
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another transformers layout: router logits are then not recorded for moekern's blocks
    _active_collector = None


class RemovedMoE(nn.Module):
    """The MoE of a Layer-Dropped layer: adds nothing, so the residual passes through. (Its post-attention norm is
    replaced by nn.Identity: the layer computes residual + 0.)"""

    def __init__(self, returns_router_scores: bool = False):
        super().__init__()
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: torch.Tensor):
        zero = hidden_states.new_zeros(())  # broadcasts in the decoder's residual add; nothing is materialised
        return (zero, None) if self.returns_router_scores else zero
