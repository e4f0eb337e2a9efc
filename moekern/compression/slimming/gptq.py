"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, spreading each column's rounding error over
the columns not yet quantized through the inverse Hessian of the layer's output error, so that X W^T moves as
little as possible on the calibration inputs X.

Follows the reference implementation (blocks of 128 columns, lazy batch updates, dampening 0.01 of the mean
diagonal). Choices moekern makes:
  - Without act_order, a group's (scale, zero) are computed when its first column is reached, from the weights as
    updated so far (as in the reference; blocks are a multiple of G, so a group never straddles two blocks).
  - With act_order, columns are processed by decreasing Hessian diagonal, but groups stay the contiguous blocks of G
    input channels with (scale, zero) fixed from the original weights ("static groups", GPTQModel's
    static_groups=True). So g_idx = k // G and the result is in moekern's layout with no permutation at inference.
    AutoGPTQ's desc_act with its default static_groups=False (what He et al. ran) instead forms each group from G
    consecutive columns of the processing order, with (scale, zero) from the weights as updated when the group's
    first column is reached; its g_idx permutes the groups, which moekern's kernel layout cannot hold.
  - sym=True is AutoGPTQ's symmetric grid (moekern.compression.slimming.rtn.group_params), its default.
"""

import torch

from moekern.compression.slimming.hessian import prepare
from moekern.compression.slimming.rtn import MAX_Q, check_group, group_params

BLOCK = 128


def gptq(w: torch.Tensor, h: torch.Tensor, group_size: int, act_order: bool = False, damp: float = 0.01,
         dtype: torch.dtype | None = None, sym: bool = False):
    """w [N, K], h [K, K] -> (q uint8 [N, K], scales [K // G, N], zeros uint8 [K // G, N], g_idx int32 [K])."""
    dtype = dtype or w.dtype
    n, k = w.shape
    check_group(k, group_size)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, hinv = prepare(w[:, perm], h[perm][:, perm], damp)  # in processing order
    scales = torch.empty(k // group_size, n, dtype=dtype, device=w.device)
    zeros = torch.empty(k // group_size, n, dtype=torch.uint8, device=w.device)
    if act_order:  # static groups, from the original (dead-zeroed) weights in input order
        original = torch.empty_like(w)
        original[:, perm] = w
        scales[:], zeros[:] = group_params(original, group_size, dtype, sym)
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)  # in processing order
    block = group_size * -(-BLOCK // group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            g = column // group_size
            if not act_order and column % group_size == 0:
                scales[g], zeros[g] = (t[0] for t in group_params(w1[:, i : i + group_size], group_size, dtype,
                                                                                sym))
            s, z = scales[g].float(), zeros[g].float()
            code = (w1[:, i] / s).round().add(z).clamp(0, MAX_Q)
            q[:, i1 + i] = code.to(torch.uint8)
            err = (w1[:, i] - (code - z) * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = torch.empty_like(q)
    codes[:, perm] = q
    g_idx = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    return codes, scales, zeros, g_idx
