"""The compiled CUDA extension (csrc/), where it was built; None elsewhere, and the Triton path serves.

Build it with `pip install --no-build-isolation -e .` on a machine with a CUDA build of torch and nvcc.
"""

try:
    from moekern import _C as extension  # type: ignore[attr-defined]
except ImportError:
    extension = None


def available() -> bool:
    return extension is not None
