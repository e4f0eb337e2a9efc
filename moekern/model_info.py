"""What a model is and what it costs: parameters, experts, weight bytes and peak memory."""

import resource
import sys

import torch


def describe(model: torch.nn.Module) -> dict:
    """Sizes of a causal LM: all parameters, the routed experts' share, and the bytes its weights take."""
    cfg = model.config
    params = list(model.parameters())  # tied weights appear once
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "experts": getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        or getattr(cfg, "n_routed_experts", None),
        "top_k": getattr(cfg, "num_experts_per_tok", None),
        "hidden_size": cfg.hidden_size,
        "parameters": sum(p.numel() for p in params),
        "expert_parameters": expert_params,
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch."),
    }


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process on `device`: allocated CUDA memory, or the resident set size on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
