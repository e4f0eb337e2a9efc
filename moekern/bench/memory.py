"""Out of memory, as PyTorch says it: what a measurement that may not fit (a batch size, a preset, a FLOP count)
catches and reports instead of failing the run."""


def is_out_of_memory(exc: BaseException) -> bool:
    """The ways PyTorch says memory ran out: its CUDA OOM error, MemoryError, or a RuntimeError saying so."""
    import torch

    return (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
            or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()))
