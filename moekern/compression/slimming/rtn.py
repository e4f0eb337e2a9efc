"""Group-wise asymmetric 4-bit quantization by round to nearest: the quantizer every method ends with.

For a weight W [N, K] (out, in) and group size G, each (output row n, group g of G input channels) gets

    scale = (max - min) / 15          (max, min of the group; at least 1e-5 / 15, so a constant group is exact)
    zero  = clamp(round(-min / scale), 0, 15)
    q     = clamp(round(W / scale) + zero, 0, 15),   W ~ (q - zero) * scale

as AutoAWQ computes it (the range is the group's own, not forced to include 0). The scale is rounded to the storage
dtype first and q is computed with the rounded scale, so dequantization in that dtype is the grid q was chosen on.

sym=True is AutoGPTQ's symmetric grid (auto_gptq/quantization/quantizer.py, Quantizer.find_params with sym=True, its
default): the range is first widened to include 0, then m = max(|min|, max), scale = 2m / 15 (or m / 15 when the group
has no negative weight, as there), and zero = 8 for every group; an all-zero group gets the range [-1, 1].
"""

import torch

from moekern.errors import MoekernError
from moekern.formats import layout

MAX_Q = 15  # 4 bits


def check_group(width: int, group_size: int, what: str = "weight") -> None:
    if width % group_size:
        raise MoekernError(
            f"group_size {group_size} does not divide the input width {width} of the {what}; "
            f"choose a group size that divides it ({layout.GROUP_SIZES_TEXT})"
        )


def group_params(w: torch.Tensor, group_size: int, dtype: torch.dtype, sym: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (scales [K // G, N] in `dtype`, zeros uint8 [K // G, N]), the layout's orientation."""
    n, k = w.shape
    check_group(k, group_size)
    groups = w.float().reshape(n, k // group_size, group_size)
    wmax, wmin = groups.amax(dim=-1), groups.amin(dim=-1)
    if sym:  # AutoGPTQ's find_params, sym=True
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = torch.where(wmin < 0, -wmax, wmin)
        zero = (wmin == 0) & (wmax == 0)
        wmin, wmax = wmin.masked_fill(zero, -1.0), wmax.masked_fill(zero, 1.0)
        scales = ((wmax - wmin) / MAX_Q).to(dtype)
        zeros = torch.full_like(scales, (MAX_Q + 1) // 2, dtype=torch.uint8)
        return scales.T.contiguous(), zeros.T.contiguous()
    scales = ((wmax - wmin).clamp(min=1e-5) / MAX_Q).to(dtype)
    zeros = (-wmin / scales.float()).round().clamp(0, MAX_Q).to(torch.uint8)
    return scales.T.contiguous(), zeros.T.contiguous()


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w [N, K] on the grid (scales, zeros) [K // G, N] -> q uint8 [N, K], values 0..15."""
    group = w.shape[1] // scales.shape[0]
    s = scales.float().T.repeat_interleave(group, dim=1)
    z = zeros.float().T.repeat_interleave(group, dim=1)
    return (w.float() / s).round().add(z).clamp(0, MAX_Q).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The inverse grid map, unpacked: q [N, K] -> W [N, K] in the dtype of `scales` (layout.dequantize's math)."""
    group = q.shape[1] // scales.shape[0]
    s = scales.T.repeat_interleave(group, dim=1)
    z = zeros.T.repeat_interleave(group, dim=1).to(s.dtype)
    return (q.to(s.dtype) - z) * s


def rtn(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None):
    """Round-to-nearest: w [N, K] -> (q uint8 [N, K], scales [K // G, N], zeros uint8 [K // G, N])."""
    scales, zeros = group_params(w, group_size, dtype or w.dtype)
    return quantize_codes(w, scales, zeros), scales, zeros


def fake_quantize(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the quantized weight computes: dequantize(rtn(w)), in fp32 (used by AWQ's searches)."""
    q, scales, zeros = rtn(w, group_size, dtype)
    return dequantize_codes(q, scales.float(), zeros)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
    """Codes and grid -> moekern's layout: {"qweight", "scales", "zeros"} (see layout.py)."""
    return {"qweight": layout.pack(q), "scales": scales, "zeros": zeros}
