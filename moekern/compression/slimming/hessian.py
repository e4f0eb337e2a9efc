"""The Hessian of a linear layer's squared output error, H = 2/T X^T X, and its dampened inverse's Cholesky factor:
the shared start of GPTQ and SparseGPT."""

import torch


def hessian(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] inputs -> H [K, K] fp32 (2/T sum of x x^T, the curvature of the layer-wise output error)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x) * (2.0 / max(x.shape[0], 1))


def prepare(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01):
    """Dead inputs (never active: H_kk = 0) get weight 0 and a unit diagonal; then H + damp * mean(diag) * I, inverted,
    as its upper Cholesky factor (GPTQ's Hinv). Returns (w fp32 copy, Hinv upper [K, K]). Retries with 10x the
    dampening if H is numerically not positive definite (few calibration tokens)."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    k = h.shape[0]
    mean_diag = torch.diag(h).mean()
    for attempt in range(5):
        damped = h + (damp * 10**attempt) * mean_diag * torch.eye(k, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return w, upper
    raise RuntimeError("the calibration Hessian is not positive definite even with 10^4 x dampening")
