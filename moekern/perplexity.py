"""Held-out perplexity of a causal language model.

The text is tokenized once as a whole (no special tokens added), cut into
non-overlapping windows of ``seq_len`` tokens (the incomplete tail is dropped),
and each window is scored independently.  The perplexity is ``exp`` of the mean
next-token negative log-likelihood over every predicted token, i.e. over
``seq_len - 1`` tokens per window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["perplexity", "token_windows", "mean_nll"]


def token_windows(tokenizer, text: str, seq_len: int = 256, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows.

    Returns a ``LongTensor`` of shape ``[n_windows, seq_len]``.  If ``max_tokens``
    is given, only the first ``max_tokens`` tokens of the text are used.
    Raises ``ValueError`` if the text is shorter than one window.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # whole texts exceed max length
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of ``model`` over all predicted tokens of ``windows``.

    ``windows`` is a ``[n_windows, seq_len]`` LongTensor (see :func:`token_windows`).
    The model is put in eval mode (and restored to its previous mode afterwards).
    Log-probabilities are computed in float32 whatever the model dtype.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            logits = logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return total_nll / total_tokens


def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` on ``text``.

    Tokenizes ``text`` once, cuts it into non-overlapping windows of ``seq_len``
    tokens, averages the token NLL over all predicted tokens and returns its
    exponential.  Runs without gradients with the model in eval mode.
    ``max_tokens`` limits the evaluation to the first ``max_tokens`` tokens.
    """
    windows = token_windows(tokenizer, text, seq_len, max_tokens=max_tokens)
    return math.exp(mean_nll(model, windows, batch_size=batch_size))
