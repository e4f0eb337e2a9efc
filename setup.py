"""Builds the optional CUDA extension `moekern._C` from csrc/.

The extension is built only where it can be: a CUDA build of torch is importable in the build environment and nvcc
is on the PATH (or CUDA_HOME is set). Everywhere else moekern installs as pure Python and its Triton kernels (and the
PyTorch reference) serve. pip builds in an isolated environment without torch by default, so to build the extension
against the torch you already have, install with:

    pip install --no-build-isolation -e .

MOEKERN_BUILD_CUDA=0 skips the extension even where it could be built; MOEKERN_BUILD_CUDA=1 makes a failure to build
it an error instead of a warning.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CUDA_SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c[up]*"))


def cuda_extension_or_reason():
    """Return (ext_modules, cmdclass) for the CUDA extension, or (None, reason) where it cannot be built."""
    wanted = os.environ.get("MOEKERN_BUILD_CUDA", "auto")
    if wanted == "0":
        return None, "MOEKERN_BUILD_CUDA=0"
    if not CUDA_SOURCES:
        return None, "csrc/ holds no CUDA sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "nvcc was not found (set CUDA_HOME)"
    arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
    ext = CUDAExtension(
        name="moekern._C",
        sources=CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *arch_flags]},
    )
    return ([ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}), None


built, reason = cuda_extension_or_reason()
if built is None:
    if os.environ.get("MOEKERN_BUILD_CUDA") == "1":
        sys.exit(f"moekern: MOEKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"moekern: building without the CUDA extension ({reason}); the Triton kernels serve instead.")
    setup()
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
