"""Builds the optional compiled part of moekern ahead of time: `moekern._cpu`, the C++ CPU kernels (csrc/cpu/),
wherever torch is importable in the build environment and a C++ compiler exists. Elsewhere (pip's default isolated
build has no torch) moekern builds them on first use into a cache folder instead (moekern/ops/cpu.py), or runs its
PyTorch reference where no compiler exists. On a GPU the Triton kernels serve (no CUDA extension is built).

To build them against the torch you already have (torch is not a build requirement: asking for it in the isolated
build environment would download a multi-GB wheel), install with:

    pip install --no-build-isolation -e .

MOEKERN_BUILD_CPU: 0 skips the extension even where it could be built; 1 makes a failure to build it an error
instead of a warning.
"""

import hashlib
import os
import shutil
import sys

from setuptools import setup

# The same files and flags as the JIT build of moekern/ops/cpu.py (SOURCES, CFLAGS): each ISA variant gets its target
# from a pragma in its own file, so one set of flags serves them all.
CPU_SOURCES = [f"csrc/cpu/{name}" for name in ("ops.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_portable.cpp")]
CPU_CFLAGS = ["-O3", "-fopenmp", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
CPU_LDFLAGS = ["-fopenmp"]
CPU_HEADERS = [f"csrc/cpu/{name}" for name in ("kernels.h", "kernels_impl.h")]


def sources_sha256() -> str:
    """moekern.ops.cpu.sources_sha256 (the same files in the same order), built into the library: moekern loads it
    only while csrc/cpu/ still holds these sources (moekern.ops.cpu.library_matches_sources)."""
    digest = hashlib.sha256()
    for path in CPU_SOURCES + CPU_HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


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
    cflags = CPU_CFLAGS + [f"-DMOEKERN_SOURCES_SHA256={sources_sha256()}"]
    return CppExtension(name="moekern._cpu", sources=CPU_SOURCES, extra_compile_args=cflags,
                        extra_link_args=CPU_LDFLAGS), None


ext_modules, cmdclass = [], {}
cpu_ext, reason = cpu_extension_or_reason()
if cpu_ext is None:
    if os.environ.get("MOEKERN_BUILD_CPU") == "1":
        sys.exit(f"moekern: MOEKERN_BUILD_CPU=1 but the C++ CPU kernels cannot be built: {reason}")
    print(f"moekern: not building the C++ CPU kernels now ({reason}); they are built on first use instead.")
else:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [cpu_ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
