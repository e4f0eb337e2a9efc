"""What AWQ's two schemes (moekern's, apply.py, and AutoAWQ's, autoawq.py) share on the Linear layers:
the input scale folded into the norm before them, and a Linear replaced by its 4-bit QuantizedLinear."""

import torch
from torch import nn

from moekern.modules.quant import QuantizedLinear
from moekern import targets


class NormFold:
    """AWQ's q/k/v scale s folded into the norm before them: weight g becomes f = round_dtype(g / s). The weights are
    quantized against s' = g / f, the scale the rounded norm weight really applies (fix), so the fold is exact up to
    fp32 rounding in any dtype."""

    def __init__(self, norm: nn.Module):
        self.norm, self.g = norm, norm.weight.detach().clone()
        self.folded = None

    @staticmethod
    def foldable(norm) -> bool:
        """Whether dividing the norm's weight by a per-channel s divides its output by s (y = weight * n(x); not a
        (1 + weight) norm, no bias), checked on random inputs with the weight restored after."""
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
            return False
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4, weight.shape[0], generator=generator).to(weight.device, torch.float32)
        s = (torch.rand(weight.shape[0], generator=generator) + 0.5).to(weight.device)
        saved = weight.data  # the very tensor is put back, so nothing that shares it notices
        with torch.no_grad():
            try:
                weight.data = saved.float().clone()
                before = norm(probe).float()
                weight.data = saved.float() / s
                after = norm(probe).float() * s
            finally:
                weight.data = saved
        return bool((after - before).abs().max() <= 1e-5 * before.abs().max().clamp_min(1e-12))

    def fix(self, s: torch.Tensor) -> torch.Tensor:
        g = self.g.float().to(s.device)
        self.folded = (g / s).to(self.g.dtype)
        f = self.folded.float()
        return torch.where(f != 0, g / torch.where(f != 0, f, 1.0), s)  # a zero channel: any scale is exact

    def apply(self) -> None:
        with torch.no_grad():
            self.norm.weight.copy_(self.folded.to(self.norm.weight.device))


def replace_linear(layer, name: str, tensors: dict, linear: nn.Linear) -> None:
    """Put a QuantizedLinear built from `tensors` (moekern's 4-bit layout) where `linear` was, with its bias."""
    tensors = dict(tensors)
    if linear.bias is not None:
        tensors["bias"] = linear.bias.detach().clone()
    targets.set_module(layer, name, QuantizedLinear(tensors).to(linear.weight.device))
