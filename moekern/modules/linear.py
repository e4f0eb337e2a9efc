"""Decode-sized Linears on the C++ CPU kernels.

torch's CPU GEMM packs the weight on every call of 2 to 16 rows, so at a decode batch of 4 the attention
projections and the lm_head read their weights at about a quarter of the speed of a single row (measured here:
3.6 against 14.7 GB/s for a 32000 x 4096 fp32 weight). moekern.patch gives a model's large nn.Linear modules this
forward, which sends a few rows to the fused dense kernel (each weight row read once for all rows) and everything
else to F.linear as before. unpatch takes it away.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn

from moekern.ops import backend

# rows up to which the kernel beats torch's GEMM (which packs the weight; measured on a 32000 x 4096 weight: fp32 up
# to 16 rows, bf16 up to 8, where torch's bf16 GEMM catches up)
SMALL_ROWS = {torch.float32: 16, torch.bfloat16: 8}
LARGE_WEIGHT_BYTES = 1 << 20  # smaller weights stay on F.linear: a few microseconds of call overhead is all to win
_PATCHED = "_moekern_linear"


def decode_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.dtype == weight.dtype and rows <= SMALL_ROWS.get(weight.dtype, 0)
            and backend.linear_path(x.device, x.dtype) == "cpu"):
        from moekern.ops import cpu

        return cpu.linear_dense(x, weight, self.bias)
    return F.linear(x, weight, self.bias)


def install(model: nn.Module) -> int:
    """Give every large nn.Linear of `model` on the CPU the decode forward; returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is nn.Linear and weight.device.type == "cpu" and weight.stride(-1) == 1
                and weight.numel() * weight.element_size() >= LARGE_WEIGHT_BYTES):
            module.forward = types.MethodType(decode_linear_forward, module)
            setattr(module, _PATCHED, True)
            count += 1
    return count


def uninstall(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop(_PATCHED, False):
            module.__dict__.pop("forward", None)
