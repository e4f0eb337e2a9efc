"""Pruning a linear layer's weight W [N, K] (out, in) to a sparsity pattern, per output row:

    unstructured: round(sparsity * K) zeros in every row
    N:M:          at most n non-zeros in every m consecutive input weights of a row (NVIDIA's 2:4, 4:8)

Wanda (Sun et al., 2023) ranks weights by |W_nk| * ||X_k||_2 (the input channel's norm over the calibration tokens)
and zeros the lowest, without changing the others. SparseGPT (Frantar & Alistarh, 2023) goes column by column like
GPTQ: it chooses the mask by w^2 / [H^-1]_kk^2 within blocks of 128 columns and spreads each pruned weight's error
over the columns not yet visited. Unlike the reference SparseGPT (one threshold over a whole block), moekern chooses
the unstructured mask per row, so every row has exactly the requested sparsity.
"""

import torch

from moekern.compression.slimming.hessian import prepare

BLOCK = 128


def _lowest_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` lowest scores of each row of score [N, C]."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, score.topk(count, dim=1, largest=False).indices, True)
    return mask


def pattern_mask(score: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None):
    """The pruned positions (True) of score [N, K]: the lowest per row (unstructured), or the m - n lowest of every
    m consecutive columns (N:M)."""
    rows, k = score.shape
    if n is None:
        return _lowest_mask(score, round(sparsity * k))
    if k % m:
        raise ValueError(f"N:M sparsity needs the input width {k} to be a multiple of m={m}")
    grouped = score.reshape(rows * (k // m), m)
    return _lowest_mask(grouped, m - n).reshape(rows, k)


def wanda(w: torch.Tensor, input_sq_norm: torch.Tensor | None, sparsity=None, n=None, m=None) -> torch.Tensor:
    """w [N, K], input_sq_norm [K] = sum_t x_tk^2 (None: no calibration tokens, rank by |W| alone) -> pruned copy."""
    score = w.float().abs()
    if input_sq_norm is not None:
        score = score * input_sq_norm.float().sqrt()[None, :]
    return w.masked_fill(pattern_mask(score, sparsity, n, m), 0)


def sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity=None, n=None, m=None, damp: float = 0.01) -> torch.Tensor:
    """w [N, K], h [K, K] (H = 2/T X^T X) -> pruned and error-compensated copy of w, in w's dtype."""
    rows, k = w.shape
    if n is not None and k % m:
        raise ValueError(f"N:M sparsity needs the input width {k} to be a multiple of m={m}")
    block = BLOCK if n is None else m * -(-BLOCK // m)
    out, hinv = prepare(w, h, damp)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = out[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if n is None:  # exactly round(sparsity * K) per row over all blocks, split by cumulative rounding
            count = round(sparsity * i2) - round(sparsity * i1)
            mask = _lowest_mask(w1.pow(2) / d.pow(2)[None, :], count)
        else:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                score = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                mask[:, i : i + m] = _lowest_mask(score, m - n)
            kept = w1[:, i].masked_fill(mask[:, i], 0.0)
            err = (w1[:, i] - kept) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = kept
            err1[:, i] = err
        out[:, i1:i2] = w1
        out[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out.to(w.dtype)
