"""What a model is and what it costs: parameters, experts, weight bytes and peak memory."""

import resource
import sys

import torch


def describe(model: torch.nn.Module) -> dict:
    """Sizes of a causal LM: all parameters, the routed experts' share, and the bytes its weights take.

    Tied weights count once. A packed 4-bit weight (moekern.formats.layout: the `qweight` buffers) counts as the weights
    it holds, so quantization leaves the parameter count as it was; weight_bytes is every tensor of the state dict
    (packed weights, scales and zeros included), each storage once: the memory the weights take."""
    from moekern.formats.layout import PACK  # 4-bit values per stored int32

    cfg = model.config
    weights = dict(model.named_parameters())  # tied weights appear once
    packed = {name: b for name, b in model.named_buffers() if name.endswith("qweight")}
    weights.update(packed)
    count = {name: t.numel() * (PACK if name in packed else 1) for name, t in weights.items()}
    storages = {t.data_ptr(): t for t in model.state_dict().values()}
    first = next(iter(model.parameters()))
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "experts": getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        or getattr(cfg, "n_routed_experts", None),
        "top_k": getattr(cfg, "num_experts_per_tok", None),
        "hidden_size": cfg.hidden_size,
        "parameters": sum(count.values()),
        "expert_parameters": sum(c for name, c in count.items() if ".experts." in name),
        "weight_bytes": sum(t.numel() * t.element_size() for t in storages.values()),
        "dtype": str(first.dtype).removeprefix("torch."),
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
