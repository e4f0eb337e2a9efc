"""Which kernels run moekern's experts and routing: the one place that decides it.

MOEKERN_BACKEND=auto|triton|cpu|reference (default auto):
  auto       Triton on CUDA tensors; the C++ CPU kernels (moekern.ops.cpu) on CPU tensors, or the PyTorch
             reference where they could not be built (no compiler) or cannot take the module (its dtype);
  triton     the Triton kernels on any tensor (on a CPU tensor, in Triton's interpreter: the way CI checks them);
  cpu        the C++ CPU kernels, an error where they cannot run;
  reference  moekern.ops.reference, the oracle.

The decision is a host-side lookup (an environment read and a device check per MoE call), never data-dependent.
"""

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations the CPU kernels take


def requested() -> str:
    choice = os.environ.get("MOEKERN_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"MOEKERN_BACKEND={choice!r}; choose one of {', '.join(BACKENDS)}")
    return choice


@contextlib.contextmanager
def reference():
    """MOEKERN_BACKEND=reference for the duration: autograd (the kernels have no backward) and torch's FLOP counter
    (which sees neither the Triton nor the C++ kernels) need the PyTorch path."""
    previous = os.environ.get("MOEKERN_BACKEND")
    os.environ["MOEKERN_BACKEND"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MOEKERN_BACKEND", None)
        else:
            os.environ["MOEKERN_BACKEND"] = previous


def backend_for(device: torch.device) -> str:
    """"triton", "cpu" or "reference" for tensors on `device` (before any per-module constraint)."""
    choice = requested()
    if choice == "auto":
        if device.type == "cuda":
            return "triton"
        from moekern.ops import cpu

        return "cpu" if device.type == "cpu" and cpu.available() else "reference"
    if choice == "cpu":
        if device.type != "cpu":
            raise ValueError(f"MOEKERN_BACKEND=cpu: the C++ CPU kernels take CPU tensors, these are on {device}; "
                             f"use MOEKERN_BACKEND=auto or triton")
        from moekern.ops import cpu

        if not cpu.available():
            raise ValueError(f"MOEKERN_BACKEND=cpu: the C++ CPU kernels are not available "
                             f"({cpu.unavailable_reason()}); use MOEKERN_BACKEND=reference")
    return choice


def cpu_constraint(dtype: torch.dtype) -> str | None:
    """Why the CPU kernels cannot take activations of `dtype`, or None."""
    if dtype not in CPU_DTYPES:
        return f"the CPU kernels take float32, bfloat16 or float16 activations, not {str(dtype).replace('torch.', '')}"
    return None


def triton_4bit_constraint(group_size: int) -> str | None:
    """Why the Triton 4-bit kernels cannot take a group size, or None (they read one scale row per K step)."""
    from moekern.ops.tuning import group_size_supported  # launch rules only: no kernel is decorated by this import

    if group_size_supported(group_size):
        return None
    return (f"the 4-bit Triton kernels need a power-of-two group size of at least 16, this model has {group_size}; "
            f"requantize with group_size 32, 64 or 128")


def experts_path(device: torch.device, dtype: torch.dtype, group_size: int | None = None) -> str:
    """The path one experts call takes: "triton", "cpu" or "reference". group_size: of 4-bit experts (None: dense).
    Under auto a constraint sends the call to the reference; a forced backend that cannot take it is an error that
    names the constraint."""
    return _path_and_reason(device, dtype, group_size)[0]


def _path_and_reason(device, dtype, group_size):
    path = backend_for(device)
    if path == "reference":
        return path, None
    reason = cpu_constraint(dtype) if path == "cpu" else (
        triton_4bit_constraint(group_size) if group_size is not None else None)
    if reason is None:
        return path, None
    if requested() != "auto":
        raise ValueError(f"MOEKERN_BACKEND={requested()}: {reason}; or use MOEKERN_BACKEND=reference")
    return "reference", reason


def describe(model) -> dict:
    """Which path each kind of experts module of `model` takes on its device, for `moekern info`:
    {"backend": requested, "paths": {"4-bit experts": "cpu (avx512, int8 inner product)", ...}}.

    ops knows tensors, not moekern's modules: it recognises them by what they hold. 4-bit experts and linears
    (moekern.modules.quant) carry a `group_size` and packed `qweight` tensors; stacked 16-bit experts a
    `gate_up_proj` parameter."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    paths = {}
    for layer in model.get_decoder().layers:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None:
            continue
        if _is_4bit(experts):
            kind, group = "4-bit experts", experts.group_size
        elif isinstance(getattr(experts, "gate_up_proj", None), torch.nn.Parameter):
            kind, group = f"{str(dtype).replace('torch.', '')} experts", None
        else:
            continue
        try:
            path, reason = _path_and_reason(device, dtype, group)
            path = _detail(path, reason, quantized=group is not None)
        except ValueError as exc:
            path = f"error: {exc}"
        paths.setdefault(kind, set()).add(path)
    if any(_is_4bit(m) and hasattr(m, "qweight") for m in model.modules()):
        paths.setdefault("4-bit linears", set()).add(_detail(linear_path(device, dtype), None, quantized=True))
    return {"backend": requested(), "paths": {k: "; ".join(sorted(v)) for k, v in paths.items()}}


def _is_4bit(module) -> bool:
    return isinstance(getattr(module, "group_size", None), int) and any(
        name.endswith("qweight") for name, _ in module.named_buffers(recurse=False))


def linear_path(device: torch.device, dtype: torch.dtype) -> str:
    """A 4-bit Linear (attention, shared experts) runs the CPU kernel or dequantizes (reference; Triton has none)."""
    path = backend_for(device)
    if path == "cpu" and cpu_constraint(dtype) is None:
        return "cpu"
    return "reference"


def _detail(path: str, reason: str | None, quantized: bool) -> str:
    from moekern.ops import cpu

    if path == "cpu":
        inner = f", {cpu.INNERS[cpu.inner()]} activations" if quantized else ""
        return f"C++ CPU kernels ({cpu.isa_name()}{inner}, {cpu.parallel_threads()} threads)"
    if path == "reference":
        reason = reason or (cpu.unavailable_reason() if requested() == "auto" else "MOEKERN_BACKEND=reference")
        return "PyTorch reference" + (f" ({reason})" if reason else "")
    return "Triton kernels"
