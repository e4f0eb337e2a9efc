"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Input channels that carry large activations matter more, so before rounding each input channel k of W is scaled up
by s_k and the input down by 1 / s_k (exact in full precision: (x / s) (W s)^T = x W^T); the salient channels then
lose less to rounding. s = mean|x|^alpha (normalised so that sqrt(max * min) = 1), with alpha chosen on a grid of 20
values in [0, 1) to minimise the output error on the calibration inputs: of the linear itself, or, as AutoAWQ's
module2inspect, of the module around it (an expert's gate_up is judged by the expert's output). alpha = 0 is plain
RTN, so the search never does worse than RTN on its objective. Then, as AutoAWQ's auto_clip, each (output row,
group) may clip its weights to a smaller max |w| where that lowers the group's output error.

Where 1 / s goes (the "fold", decided per architecture), see moekern.quant.ffn.
"""

import torch

from moekern.quant.rtn import fake_quantize

GRID = 20
CLIP_STEPS = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512
SEARCH_TOKENS = 8192  # the scale search runs on at most this many (evenly spaced) calibration rows


def _rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= limit:
        return x.float()
    return x[torch.linspace(0, x.shape[0] - 1, limit, device=x.device).long()].float()


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, dtype: torch.dtype,
                 output=None) -> torch.Tensor:
    """The per-input-channel scale s [K] minimising ||output(W) - output((x / s) Q(W s)^T)||^2 for the linears W_i
    [N_i, K] that read the same input x [T, K]. output(x, w) maps the inputs and the stacked weights [sum N_i, K] to
    what is compared: by default the linears' own outputs x W^T; AutoAWQ compares the output of the module that
    contains them (for an expert's gate_up: the expert's output)."""
    x = _rows(x, SEARCH_TOKENS)
    output = output or (lambda inputs, w: inputs @ w.T)
    w = torch.cat([wi.float() for wi in weights])
    reference = output(x, w)
    x_mean = x.abs().mean(dim=0)
    best, best_scale = float("inf"), torch.ones_like(x_mean)
    for step in range(GRID):
        alpha = step / GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quantize(w * s, group_size, dtype) / s
        error = (output(x, w_q) - reference).pow(2).mean().item()
        if error < best:
            best, best_scale = error, s
    # the stored input scale is 1 / s in the activation dtype: quantize against exactly what will be stored
    return 1 / (1 / best_scale).to(dtype).float()


def clip(x: torch.Tensor, w: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """AutoAWQ's auto_clip: w [N, K] with each (row, group) clamped to [-m, m], m = max|w| * (1 - i / 20) for the
    i < 10 that minimises the group's output error on (at most 512 of) the inputs x [T, K]."""
    x = _rows(x, CLIP_TOKENS)
    n, k = w.shape
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size)
    out = w.float().clone()
    for start in range(0, n, 64):  # a batch of output rows at a time bounds the memory
        wb = out[start : start + 64].reshape(-1, groups, group_size)
        reference = torch.einsum("tgc,ngc->ntg", xg, wb)
        max_abs = wb.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(max_abs.shape[:2], float("inf"), device=w.device)
        best_max = max_abs.clone()
        for i in range(int(CLIP_MAX_SHRINK * CLIP_STEPS)):
            m = max_abs * (1 - i / CLIP_STEPS)
            clipped = torch.maximum(torch.minimum(wb, m), -m)
            q = fake_quantize(clipped.reshape(wb.shape[0], k), group_size, dtype).reshape(wb.shape)
            err = (torch.einsum("tgc,ngc->ntg", xg, q) - reference).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], m, best_max)
        out[start : start + 64] = torch.maximum(torch.minimum(wb, best_max), -best_max).reshape(-1, k)
    return out
