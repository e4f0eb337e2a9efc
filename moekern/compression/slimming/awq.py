"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Input channels that carry large activations matter more, so before rounding each input channel k of W is scaled up
by s_k and the input down by 1 / s_k (exact in full precision: (x / s) (W s)^T = x W^T); the salient channels then
lose less to rounding. s = mean|x|^alpha (normalised so that sqrt(max * min) = 1), with alpha chosen on a grid of 20
values in [0, 1) to minimise the output error on the calibration inputs: of the linear itself, or, as AutoAWQ's
module2inspect, of the module around it (an expert's gate_up is judged by the expert's output). alpha = 0 gives
s = 1, plain RTN, and is on the grid, so the search never does worse than RTN on its objective. Then, as AutoAWQ's
auto_clip, each (output row, group) may clip its weights to a smaller max |w| where that lowers the group's output
error; "no clipping" is a candidate too, so a group is clipped only where that is strictly better.

Token weights. A routed expert's output reaches the model multiplied by the token's routing weight r_t, so an
output error e_t of the expert moves the layer's output by r_t e_t. Every objective here takes optional per-token
weights and minimises sum_t r_t^2 ||e_t||^2 (AutoAWQ gets the same by judging the whole MoE block, whose output
carries the routing weights); without them every token counts once (a linear every token goes through).

Where 1 / s goes (the "fold", decided per architecture), see moekern.compression.slimming.ffn.
"""

import torch

from moekern.compression.slimming.rtn import fake_quantize

GRID = 20
CLIP_STEPS = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512
SEARCH_TOKENS = 8192  # the scale search runs on at most this many (evenly spaced) calibration rows


def _pick(n: int, limit: int, device) -> torch.Tensor | None:
    """Indices of at most `limit` evenly spaced rows of n (None: all of them)."""
    if n <= limit:
        return None
    return torch.linspace(0, n - 1, limit, device=device).long()


def sample_rows(x: torch.Tensor, limit: int, token_weights: torch.Tensor | None = None):
    """(x as [T, K] fp32, per-row squared token weights [T] or None), on at most `limit` evenly spaced rows."""
    x = x.reshape(-1, x.shape[-1])
    pick = _pick(x.shape[0], limit, x.device)
    if pick is not None:
        x = x[pick]
    w2 = None
    if token_weights is not None:
        w = token_weights.reshape(-1).float()
        w2 = (w if pick is None else w[pick]).pow(2)
    return x.float(), w2


def weighted_error(diff: torch.Tensor, w2: torch.Tensor | None) -> float:
    """Mean squared error of diff [T, N] with row t weighted by w2[t] (the squared token weight)."""
    per_token = diff.float().pow(2).mean(dim=-1)
    if w2 is None:
        return per_token.mean().item()
    return (per_token * w2).sum().item() / max(w2.sum().item(), 1e-30)


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, dtype: torch.dtype,
                 output=None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The per-input-channel scale s [K] minimising sum_t r_t^2 ||output(W) - output((x / s) Q(W s)^T)||_t^2 for
    the linears W_i [N_i, K] that read the same input x [T, K] (r_t: token_weights [T], default 1). output(x, w)
    maps the inputs and the stacked weights [sum N_i, K] to what is compared: by default the linears' own outputs
    x W^T; AutoAWQ compares the output of the module that contains them (for an expert's gate_up: the expert's
    output). alpha = 0 (s = 1: RTN) is the first candidate and is kept unless another is strictly better."""
    x, w2 = sample_rows(x, SEARCH_TOKENS, token_weights)
    output = output or (lambda inputs, w: inputs @ w.T)
    w = torch.cat([wi.float() for wi in weights])
    reference = output(x, w)
    x_mean = x.abs().mean(dim=0)
    best, best_scale = float("inf"), torch.ones_like(x_mean)
    for step in range(GRID):
        alpha = step / GRID
        if step == 0:
            s = torch.ones_like(x_mean)  # exactly RTN
        else:
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = 1 / (1 / s).to(dtype).float()  # the stored 1 / s is in the activation dtype: search on that
        w_q = fake_quantize(w * s, group_size, dtype) / s
        error = weighted_error(output(x, w_q) - reference, w2)
        if error < best:
            best, best_scale = error, s
    return best_scale


def clip(x: torch.Tensor, w: torch.Tensor, group_size: int, dtype: torch.dtype,
         token_weights: torch.Tensor | None = None, tokens: int | None = CLIP_TOKENS) -> torch.Tensor:
    """AutoAWQ's auto_clip: w [N, K] with each (row, group) clamped to [-m, m], m = max|w| * (1 - i / 20) for the
    i < 10 that minimises the group's (token-weighted) output error on at most `tokens` (512; None: all) evenly
    spaced inputs x [T, K]. i = 0 is no clipping and is kept unless a clip is strictly better."""
    x, w2 = sample_rows(x, tokens or x.reshape(-1, x.shape[-1]).shape[0], token_weights)
    n, k = w.shape
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size)
    if w2 is not None:  # weighting the inputs by r_t weights each token's squared output error by r_t^2
        xg = xg * w2.sqrt()[:, None, None]
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
