"""moekern's own 4-bit layout, the one its kernels read. Converters from and to the AutoAWQ and GPTQ layouts build
on these functions.

A weight W [..., N, K] in moekern's (out, in) orientation (per expert: gate_up has N = 2I, K = H; down has N = H,
K = I), quantized group-wise along K with group size G (asymmetric, 4 bits):

    q      uint4 values 0..15, W[..., n, k] ~ (q[..., n, k] - zeros[..., k // G, n]) * scales[..., k // G, n]
    qweight  int32 [..., K // 8, N]   bits 4j..4j+3 of qweight[..., r, n] hold q[..., n, 8r + j], j = 0..7
    scales   [..., K // G, N]         in the activation dtype (fp16, bf16 or fp32)
    zeros    uint8 [..., K // G, N]   0..15

Packing along K with N contiguous gives a kernel tile [BLOCK_K / 8, BLOCK_N] of int32 that is read with wide,
coalesced loads along N, one group's scales and zeros per K block, and a nibble unpack of a shift and a mask.
"""

import torch

PACK = 8  # nibbles per int32
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j sits at bits 4j..4j+3
# The group sizes G: the layout takes any positive multiple of PACK (a published checkpoint may bring another); the
# ones moekern offers (recipes' :g32, :g64, :g128) are these, and every kernel runs them.
GROUP_SIZES = (32, 64, 128)
GROUP_SIZES_TEXT = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"


def valid_group_size(group_size) -> bool:
    """Whether the layout can hold groups of `group_size` input channels."""
    return isinstance(group_size, int) and group_size > 0 and group_size % PACK == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8/int [..., N, K] with values 0..15 -> qweight int32 [..., K // 8, N]."""
    *lead, n, k = q.shape
    if k % PACK:
        raise ValueError(f"the input width {k} must be a multiple of {PACK} to pack 4-bit values")
    nibbles = q.to(torch.int32).transpose(-1, -2).reshape(*lead, k // PACK, PACK, n)  # [..., K/8, 8, N]
    return (nibbles << SHIFTS.to(q.device).view(PACK, 1)).sum(dim=-2, dtype=torch.int32)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [..., K // 8, N] -> q uint8 [..., N, K]."""
    *lead, rows, n = qweight.shape
    nibbles = (qweight.unsqueeze(-2) >> SHIFTS.to(qweight.device).view(PACK, 1)) & 0xF  # [..., K/8, 8, N]
    return nibbles.reshape(*lead, rows * PACK, n).transpose(-1, -2).to(torch.uint8).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The reference dequantization: W [..., N, K] in the dtype of `scales`."""
    q = unpack(qweight)
    group = q.shape[-1] // scales.shape[-2]
    s = scales.transpose(-1, -2).repeat_interleave(group, dim=-1)  # [..., N, K]
    z = zeros.transpose(-1, -2).repeat_interleave(group, dim=-1).to(s.dtype)
    return (q.to(s.dtype) - z) * s
