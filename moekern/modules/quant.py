"""4-bit modules in moekern's layout (moekern/formats/layout.py): the experts of one MoE layer, stacked, and a Linear.

Their reference forward dequantizes, then runs the same matmuls as the 16-bit path (reference.moe_experts for the
experts, F.linear for the Linear): the oracle of the 4-bit kernels. On the CPU the C++ kernels (moekern.ops.cpu) run
instead where moekern.ops.backend says so, reading the same buffers. Every tensor is a persistent buffer with a
stable name, so a quantized model round-trips through moekern.save / moekern.load (checkpoint.replay rebuilds these
modules from the names and shapes on disk before the weights are assigned).

An AWQ input scale (`*_input_scale`, the reciprocal of AWQ's per-channel scale) multiplies the input of its GEMM
where the scale could not be folded exactly into the op before it: y = (x * input_scale) @ dequantize(W)^T.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moekern.ops import reference
from moekern.ops.reference import Activation
from moekern.formats import layout

PACKED = ("qweight", "scales", "zeros")


class QuantizedExperts(nn.Module):
    """The routed experts of one layer in 4 bits, stacked over experts. Buffers (E experts, moekern's (out, in)
    orientation: gate_up N = 2I, K = H; down N = H, K = I; G the group size):

        gate_up_proj_qweight int32 [E, H // 8, 2I]   gate_up_proj_scales [E, H // G, 2I]   gate_up_proj_zeros uint8
        down_proj_qweight    int32 [E, I // 8, H]    down_proj_scales    [E, I // G, H]    down_proj_zeros    uint8
        optional: gate_up_proj_bias [E, 2I], down_proj_bias [E, H] (GPT-OSS),
                  gate_up_proj_input_scale [E, H], down_proj_input_scale [E, I] (AWQ)

    The HF block calls it like the experts module it replaces: forward(hidden [T, H], top_k_index, top_k_weights).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], act: Activation):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.contiguous())
        self.act = act
        self.num_experts = self.gate_up_proj_qweight.shape[0]  # as HF's experts modules (kept by Expert Drop)

    @property
    def group_size(self) -> int:
        return self.gate_up_proj_qweight.shape[-2] * layout.PACK // self.gate_up_proj_scales.shape[-2]

    def packed(self, name: str) -> tuple:
        """(qweight, scales, zeros, input_scale or None) of "gate_up_proj" or "down_proj": what the 4-bit kernels
        read (moekern.ops.moe_gemm.Quant4)."""
        return (*(getattr(self, f"{name}_{part}") for part in PACKED), getattr(self, f"{name}_input_scale", None))

    def dequantized(self, name: str, expert: int) -> torch.Tensor:
        """The effective (out, in) weight of one expert's `name` ("gate_up_proj" or "down_proj"): the dequantized
        weight with its input scale folded into the columns."""
        w = layout.dequantize(*(getattr(self, f"{name}_{part}")[expert] for part in PACKED))
        input_scale = getattr(self, f"{name}_input_scale", None)
        return w if input_scale is None else w * input_scale[expert][None, :].to(w.dtype)

    def reference_forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """reference.moe_experts on the dequantized weights, dequantizing only the experts that tokens reach."""
        return reference.moe_experts(
            hidden, ids, weights, _PerExpert(self, "gate_up_proj"), _PerExpert(self, "down_proj"),
            getattr(self, "gate_up_proj_bias", None), getattr(self, "down_proj_bias", None), self.act,
        )

    def cpu_forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The fused 4-bit MoE of the C++ CPU kernels."""
        from moekern.ops import cpu

        gate_up, down = self.packed("gate_up_proj"), self.packed("down_proj")
        return cpu.moe_experts_4bit(hidden, ids, weights, gate_up[:3], down[:3],
                                    getattr(self, "gate_up_proj_bias", None), getattr(self, "down_proj_bias", None),
                                    gate_up[3], down[3], self.act)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from moekern.modules.experts import experts_forward  # the one dispatch point (kernels hook in there)

        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, 4-bit, group {self.group_size}, {self.act.kind}"


class _PerExpert:
    """Stands in for a stacked weight [E, N, K] in reference.moe_experts: indexing dequantizes one expert."""

    def __init__(self, experts: QuantizedExperts, name: str):
        self.experts, self.name = experts, name
        qweight = getattr(experts, f"{name}_qweight")
        self.shape = (qweight.shape[0], qweight.shape[2], qweight.shape[1] * layout.PACK)

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.experts.dequantized(self.name, expert)


class QuantizedLinear(nn.Module):
    """nn.Linear(K, N) in 4 bits. Buffers: qweight int32 [K // 8, N], scales [K // G, N], zeros uint8 [K // G, N],
    optional bias [N] and input_scale [K] (AWQ)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.contiguous())
        self.in_features = self.qweight.shape[0] * layout.PACK
        self.out_features = self.qweight.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[0]

    def dequantized(self) -> torch.Tensor:
        """The effective (out, in) weight: dequantized, with the input scale folded into the columns."""
        w = layout.dequantize(self.qweight, self.scales, self.zeros)
        input_scale = getattr(self, "input_scale", None)
        return w if input_scale is None else w * input_scale[None, :].to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moekern.ops import backend

        input_scale = getattr(self, "input_scale", None)
        if backend.linear_path(x.device, x.dtype) == "cpu":
            from moekern.ops import cpu

            return cpu.linear_4bit(x, (self.qweight, self.scales, self.zeros), getattr(self, "bias", None),
                                   input_scale)
        if input_scale is not None:
            x = x * input_scale
        w = layout.dequantize(self.qweight, self.scales, self.zeros)
        return F.linear(x, w.to(x.dtype), getattr(self, "bias", None))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit, group {self.group_size}"

