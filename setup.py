"""Builds the optional compiled parts of moekern ahead of time:

- `moekern._cpu`, the C++ CPU kernels (csrc/cpu/), wherever torch is importable in the build environment and a C++
  compiler exists. Elsewhere (pip's default isolated build has no torch) moekern builds them on first use into a
  cache folder instead (moekern/ops/cpu.py), or runs its PyTorch reference where no compiler exists.
- `moekern._C`, the CUDA extension (csrc/*.cu), where a CUDA build of torch is importable and nvcc is on the PATH
  (or CUDA_HOME is set). Everywhere else the Triton kernels (and the PyTorch reference) serve.

To build them against the torch you already have (torch is not a build requirement: asking for it in the isolated
build environment would download a multi-GB wheel), install with:

    pip install --no-build-isolation -e .

MOEKERN_BUILD_CUDA / MOEKERN_BUILD_CPU: 0 skips that extension even where it could be built; 1 makes a failure to
build it an error instead of a warning.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CUDA_SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c[up]*"))
# The same files and flags as the JIT build of moekern/ops/cpu.py (SOURCES, CFLAGS): each ISA variant gets its target
# from a pragma in its own file, so one set of flags serves them all.
CPU_SOURCES = [f"csrc/cpu/{name}" for name in ("ops.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_portable.cpp")]
CPU_CFLAGS = ["-O3", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]


def cpu_extension_or_reason():
    """(extension, None) for the C++ CPU kernels, or (None, reason) where they cannot be built here."""
    if os.environ.get("MOEKERN_BUILD_CPU", "auto") == "0":
        return None, "MOEKERN_BUILD_CPU=0"
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use pip install --no-build-isolation)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} is not on the PATH)"
    return CppExtension(name="moekern._cpu", sources=CPU_SOURCES, extra_compile_args=CPU_CFLAGS), None


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


ext_modules, cmdclass = [], {}
built, reason = cuda_extension_or_reason()
if built is None:
    if os.environ.get("MOEKERN_BUILD_CUDA") == "1":
        sys.exit(f"moekern: MOEKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"moekern: building without the CUDA extension ({reason}); the Triton kernels serve instead.")
else:
    ext_modules, cmdclass = built
cpu_ext, reason = cpu_extension_or_reason()
if cpu_ext is None:
    if os.environ.get("MOEKERN_BUILD_CPU") == "1":
        sys.exit(f"moekern: MOEKERN_BUILD_CPU=1 but the C++ CPU kernels cannot be built: {reason}")
    print(f"moekern: not building the C++ CPU kernels now ({reason}); they are built on first use instead.")
else:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [*ext_modules, cpu_ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
