"""moekern's LoRA adapter on an MoE layer's routed experts, stacked 16-bit or 4-bit (ExpertsLora): a child of the
experts module (`experts.lora_experts`) that moekern.modules.experts.experts_forward finds. Why an adapter of
moekern's own, and how adapters are attached, trained and merged: moekern.finetuning.lora."""

import math

import torch
from torch import nn

from moekern.modules.quant import QuantizedExperts
from moekern.ops import reference

ATTR = "lora_experts"  # the adapter's name under the experts module (checkpoint keys: ...mlp.experts.lora_experts.*)
PROJECTIONS = ("gate_up_proj", "down_proj")


class ExpertsLora(nn.Module):
    """Rank-r updates of every stored expert's gate_up and down weights (moekern's (out, in) orientation):
    gate_up_proj_A [E, r, H], gate_up_proj_B [E, 2I, r], down_proj_A [E, r, I], down_proj_B [E, H, r]."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], r: int, alpha: float, device=None, dtype=None):
        super().__init__()
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        for name, (experts, out_features, in_features) in shapes.items():
            a = nn.Parameter(torch.empty(experts, r, in_features, device=device, dtype=dtype))
            b = nn.Parameter(torch.zeros(experts, out_features, r, device=device, dtype=dtype))
            if a.device.type != "meta":
                for e in range(experts):  # peft's init of lora_A (nn.Linear's), per expert
                    nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
            setattr(self, f"{name}_A", a)
            setattr(self, f"{name}_B", b)

    @classmethod
    def for_experts(cls, experts: nn.Module, r: int, alpha: float) -> "ExpertsLora":
        weights = frozen_weights(experts)
        shapes = {name: tuple(weights.shape(name)) for name in PROJECTIONS}
        device = weights.device
        return cls(shapes, r, alpha, device=device, dtype=torch.float32)

    def delta(self, name: str, expert: int) -> torch.Tensor:
        """The (out, in) update of one expert's weight."""
        return self.scaling * getattr(self, f"{name}_B")[expert] @ getattr(self, f"{name}_A")[expert]

    def forward(self, experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """reference.moe_experts with each expert's weight W[e] + s * B[e] @ A[e], applied as the frozen matmul plus
        the low-rank path (the same contract: ids NO_EXPERT for a slot that is not computed)."""
        frozen = frozen_weights(experts)
        out = torch.zeros(x.shape[0], frozen.shape("down_proj")[1], dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            if e == reference.NO_EXPERT:
                continue
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            h = self._linear(frozen, "gate_up_proj", e, x[token])
            y = self._linear(frozen, "down_proj", e, reference.gated_activation(h, frozen.act))
            out.index_add_(0, token, y.float() * weights[token, slot, None].float())
        return out.to(x.dtype)

    def _linear(self, frozen, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, f"{name}_A")[e], getattr(self, f"{name}_B")[e]
        y = frozen.matmul(name, e, x) + self.scaling * ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T)
        bias = frozen.bias(name)
        return y if bias is None else y + bias[e]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class _Stacked:
    """The frozen weights of an HF stacked-experts module (16-bit): views of its parameters."""

    def __init__(self, experts):
        from moekern.models.base import expert_activation, expert_weights

        w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
        self.w = {"gate_up_proj": w_gate_up, "down_proj": w_down}
        self.b = {"gate_up_proj": b_gate_up, "down_proj": b_down}
        self.act = expert_activation(experts)
        self.device = w_gate_up.device

    def shape(self, name):
        return self.w[name].shape

    def matmul(self, name, e, x):
        return x @ self.w[name][e].to(x.dtype).T

    def bias(self, name):
        return self.b[name]


class _Packed:
    """The frozen weights of moekern's 4-bit experts, read through _DequantizedMatmul."""

    def __init__(self, experts: QuantizedExperts):
        self.experts, self.act = experts, experts.act
        self.device = experts.gate_up_proj_qweight.device

    def shape(self, name):
        qweight = getattr(self.experts, f"{name}_qweight")  # [E, K // 8, N]
        return (qweight.shape[0], qweight.shape[2], qweight.shape[1] * 8)

    def matmul(self, name, e, x):
        return _DequantizedMatmul.apply(x, self.experts, name, e)

    def bias(self, name):
        return getattr(self.experts, f"{name}_bias", None)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ dequantize(W[e])^T with the gradient to x only; the backward dequantizes again instead of keeping the
    16-bit weight alive between the passes (QLoRA)."""

    @staticmethod
    def forward(ctx, x, experts, name, e):
        ctx.experts, ctx.name, ctx.e = experts, name, e
        return x @ experts.dequantized(name, e).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.experts.dequantized(ctx.name, ctx.e).to(grad.dtype), None, None, None


def frozen_weights(experts: nn.Module):
    return _Packed(experts) if isinstance(experts, QuantizedExperts) else _Stacked(experts)


# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------
