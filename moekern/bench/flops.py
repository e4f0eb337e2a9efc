"""FLOPs of one forward, counted by torch.utils.flop_counter on the aten ops the forward runs."""

import contextlib

import torch


@torch.no_grad()
def forward_flops(model, tokens: int, batch: int = 1) -> int:
    """FLOPs of one forward of `batch` x `tokens` random tokens, without the KV cache (as the paper counts them).

    The counter sees only aten ops it has a formula for: Triton and CUDA extension kernels (moekern's path) and
    torch._grouped_mm (transformers' default experts path) and the C++ CPU kernels are invisible to it. So every model, baseline or patched,
    is counted with transformers' eager experts (a loop of matmuls over the experts hit) for this one forward: the
    same routing (masks, dropped experts and skips stay in moekern's block), the same math, ops the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, tokens), device=device)
    with _countable_experts(model), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return int(counter.get_total_flops())


def forward_flops_if_it_fits(model, tokens: int) -> int | None:
    """forward_flops, or None where that forward does not fit in memory (the caller records None and goes on)."""
    from moekern.bench.memory import is_out_of_memory

    try:
        return forward_flops(model, tokens)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        return None


@contextlib.contextmanager
def _countable_experts(model):
    """transformers' eager experts, and moekern's own modules (4-bit experts, the MoE block's experts call, Linears) on
    the PyTorch reference backend: the C++ CPU kernels are as invisible to the counter as the Triton ones."""
    from moekern.ops import backend

    current = model.config._experts_implementation
    model.set_experts_implementation("eager")
    try:
        with backend.reference():
            yield
    finally:
        model.set_experts_implementation(current)
