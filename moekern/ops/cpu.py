"""moekern's C++ CPU kernels (csrc/cpu/): the fused 4-bit and dense MoE experts, and a 4-bit Linear.

Where they come from, in order: the library `pip install --no-build-isolation -e .` built next to this package
(`moekern/_cpu*.so`) while it matches the sources in csrc/cpu/ (each build carries their digest), else a build on
first use with torch's cpp_extension and ninja into a cache folder
(MOEKERN_CACHE, default ~/.cache/moekern; about a minute on 2 cores, once per torch version and source change).
Where neither works (no C++ compiler, no ninja) `available()` is False, `unavailable_reason()` says why, and the
PyTorch reference serves (moekern.ops.backend decides).

One source builds three ISA variants (AVX-512 with VNNI, AVX2 + FMA, portable); the best one this CPU runs is chosen
at run time. MOEKERN_CPU_ISA=avx512|avx2|portable forces one (an error where the CPU lacks it), and
MOEKERN_CPU_INNER=int8|bf16|fp32 the inner product of the 4-bit kernels (see INNER_DEFAULT).

MOEKERN_CPU_KERNELS: "auto" (default: the prebuilt library, else the JIT build), "jit" (skip the prebuilt one),
"off" (never load them: the reference serves).
"""

import hashlib
import importlib.machinery
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from moekern.ops.reference import Activation

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
SOURCES = ("ops.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_portable.cpp")
HEADERS = ("kernels.h", "kernels_impl.h")
# -O3 for every file; the ISA of each variant comes from its own target pragma, never from -march. -fopenmp: torch's
# at::parallel_for is a header template that spreads work over threads only where the including file is compiled
# with OpenMP (torch's own parallel backend); without it every op of the extension runs on the calling thread alone.
CFLAGS = ["-O3", "-fopenmp", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
LDFLAGS = ["-fopenmp"]  # links libgomp, the OpenMP runtime torch itself loads (the same soname: one thread pool)

ISAS = ("portable", "avx2", "avx512")  # the index is the ISA code the C++ ops take
INNERS = ("int8", "bf16", "fp32")  # likewise
ACTS = {"silu": 0, "clamped_swiglu": 1}
# The inner product of the 4-bit kernels, chosen by measurement (benchmarks/bench_cpu_moe.py --inner, README):
INNER_DEFAULT = "int8"

_lock = threading.Lock()
_state: dict = {}  # "ops" (torch.ops.moekern_cpu) or "reason" (why not), once per process


def _say(message: str) -> None:
    print(f"moekern: {message}", file=sys.stderr, flush=True)


def ops():
    """torch.ops.moekern_cpu, loaded (or built) on first use; None where the kernels cannot be had."""
    if "ops" in _state or "reason" in _state:
        return _state.get("ops")
    with _lock:
        if "ops" not in _state and "reason" not in _state:
            try:
                _state["ops"] = _load()
            except _Unavailable as exc:
                _state["reason"] = str(exc)
                _say(f"the C++ CPU kernels are not available ({exc}); the PyTorch reference runs instead "
                     f"(slower, especially 4-bit).")
    return _state.get("ops")


def available() -> bool:
    return ops() is not None


def unavailable_reason() -> str | None:
    ops()
    return _state.get("reason")


class _Unavailable(Exception):
    pass


def _prebuilt() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_cpu{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load():
    mode = os.environ.get("MOEKERN_CPU_KERNELS", "auto").lower()
    if mode not in ("auto", "jit", "off"):
        raise _Unavailable(f"MOEKERN_CPU_KERNELS={mode!r}; choose auto, jit or off")
    if mode == "off":
        raise _Unavailable("MOEKERN_CPU_KERNELS=off")
    prebuilt = _prebuilt() if mode == "auto" else None
    if prebuilt is not None and not library_matches_sources(prebuilt):
        _say(f"{prebuilt} was built from other sources than {SOURCE_DIR} holds now, so they are built from there "
             f"instead (rebuild it with: pip install --no-build-isolation -e .)")
        prebuilt = None
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        _state["path"] = prebuilt
        return torch.ops.moekern_cpu
    return _jit_build()


def sources_sha256() -> str:
    """The digest of csrc/cpu/'s sources (setup.py computes the same)."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()


def sources_digest_flag() -> str:
    """The define that builds the sources' digest into the library (ops.cpp: moekern_sources_sha256)."""
    return f"-DMOEKERN_SOURCES_SHA256={sources_sha256()}"


def library_path() -> Path | None:
    """The file of the library this process loaded; None where the kernels are not available."""
    ops()
    return _state.get("path")


def library_matches_sources(library: Path) -> bool:
    """Whether a built library came from the sources csrc/cpu/ holds now: the digest that both builds compile into it
    (SOURCES_DIGEST_FLAG), read from the file before loading it (a loaded library cannot give way). True where the
    sources are not installed (nothing to compare)."""
    if not all((SOURCE_DIR / name).exists() for name in (*SOURCES, *HEADERS)):
        return True
    marker = b"moekern-sources-sha256:"
    data = library.read_bytes()
    at = data.find(marker)
    return at >= 0 and data[at + len(marker):at + len(marker) + 64] == sources_sha256().encode()


def build_directory() -> Path:
    """The JIT cache folder of this torch, Python and source version."""
    digest = hashlib.sha256(sources_sha256().encode())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("MOEKERN_CACHE") or Path.home() / ".cache" / "moekern")
    return root / "cpu-kernels" / tag


def _staged_sources(folder: Path) -> Path:
    """The sources copied into the build folder, which its name already keys by their content: ninja's build file
    names the source paths, so two checkouts of the same sources building from their own paths would rebuild (and
    lock) each other's cache; from one staged copy they share it. Each file is written whole, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*SOURCES, *HEADERS):
        text = (SOURCE_DIR / name).read_bytes()
        target = folder / name
        if not target.exists() or target.read_bytes() != text:
            partial = folder / f".{name}.{os.getpid()}"
            partial.write_bytes(text)
            os.replace(partial, target)
    return folder


def _jit_build():
    from torch.utils import cpp_extension

    if not all((SOURCE_DIR / name).exists() for name in SOURCES):
        raise _Unavailable(f"the C++ sources are not installed with this copy of moekern ({SOURCE_DIR})")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler: {compiler!r} is not on the PATH (set CXX, or install g++)")
    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed (pip install ninja)")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "moekern_cpu.so").exists():
        _say(f"building the C++ CPU kernels once into {directory} (about a minute) ...")
    sources = _staged_sources(directory / "src")
    try:
        cpp_extension.load(name="moekern_cpu", sources=[str(sources / s) for s in SOURCES],
                           extra_cflags=[*CFLAGS, sources_digest_flag()], extra_ldflags=LDFLAGS,
                           build_directory=str(directory), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # a compiler error, a missing tool
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise _Unavailable(f"building them in {directory} failed: {last}") from exc
    _state["path"] = directory / "moekern_cpu.so"
    return torch.ops.moekern_cpu


# ----------------------------------------------------------------------------------------------------------------------
# Choices: ISA variant and inner product (host-side lookups, cached per environment value)
# ----------------------------------------------------------------------------------------------------------------------
_isa_cache: dict = {}


def isa() -> int:
    """The ISA variant to run: MOEKERN_CPU_ISA if set, else the best this CPU has."""
    wanted = os.environ.get("MOEKERN_CPU_ISA", "auto").lower()
    if wanted not in _isa_cache:
        library = ops()
        if wanted == "auto":
            _isa_cache[wanted] = library.best_isa()
        elif wanted in ISAS:
            code = ISAS.index(wanted)
            library.isa_name(code)  # raises a clear error where this CPU lacks it
            _isa_cache[wanted] = code
        else:
            raise ValueError(f"MOEKERN_CPU_ISA={wanted!r}; choose auto, {', '.join(reversed(ISAS))}")
    return _isa_cache[wanted]


def isa_name() -> str:
    return ISAS[isa()]


def inner() -> int:
    wanted = os.environ.get("MOEKERN_CPU_INNER", "auto").lower()
    if wanted == "auto":
        wanted = INNER_DEFAULT
    if wanted not in INNERS:
        raise ValueError(f"MOEKERN_CPU_INNER={wanted!r}; choose auto, {', '.join(INNERS)}")
    return INNERS.index(wanted)


def cpu_flags() -> str:
    return ops().cpu_flags()


# ----------------------------------------------------------------------------------------------------------------------
# The ops. 4-bit weights are read where they lie, in moekern's layout (moekern.formats.layout): no second copy.
# ----------------------------------------------------------------------------------------------------------------------
def moe_experts_4bit(x, ids, weights, gate_up: tuple, down: tuple, b_gate_up=None, b_down=None,
                     in_scale_gate_up=None, in_scale_down=None, act: Activation = Activation()):
    """reference.moe_experts on 4-bit weights: x [T, H], ids / weights [T, k] (NO_EXPERT slots skipped) -> [T, H].
    gate_up, down: (qweight, scales, zeros) of W [E, 2I, H] and [E, H, I] in moekern's layout; GPT-OSS's clamped
    SwiGLU reads its gate/up rows interleaved, as stored."""
    return ops().moe_q4(x, ids, weights, list(gate_up), list(down), b_gate_up, b_down, in_scale_gate_up,
                        in_scale_down, ACTS[act.kind], act.alpha, act.limit, act.kind == "clamped_swiglu", inner(),
                        isa())


def moe_experts_dense(x, ids, weights, w_gate_up, w_down, b_gate_up=None, b_down=None, act: Activation = Activation()):
    """reference.moe_experts on bf16/fp32 stacked weights (any strides)."""
    return ops().moe_dense(x, ids, weights, w_gate_up, w_down, b_gate_up, b_down, ACTS[act.kind], act.alpha,
                           act.limit, act.kind == "clamped_swiglu", isa())


def gated_activation(gate_up: torch.Tensor, act: Activation = Activation()) -> torch.Tensor:
    """reference.gated_activation (fp32) with the kernels' vector exp: the epilogue of their decode path."""
    if act.kind == "silu":
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    return ops().gated_activation(gate, up, ACTS[act.kind], act.alpha, act.limit, isa())


def linear_4bit(x: torch.Tensor, weight: tuple, bias=None, input_scale=None) -> torch.Tensor:
    """F.linear(x * input_scale, dequantize(W), bias) for x [..., K]; weight: (qweight [K/8, N], scales, zeros)."""
    out = ops().linear_q4(x.reshape(-1, x.shape[-1]), list(weight), bias, input_scale, inner(), isa())
    return out.reshape(*x.shape[:-1], out.shape[-1])


def linear_dense(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear for a few rows (decode) with fp32 or bf16 weights: each weight row read once for all rows."""
    out = ops().linear_dense(x.reshape(-1, x.shape[-1]), weight, bias, isa())
    return out.reshape(*x.shape[:-1], weight.shape[0])


SCORING = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}


def route(logits, spec, alive=None, correction_bias=None, skip_beta=None, expert_row=None):
    """reference.route (RouterSpec semantics, dropped experts, correction bias, per-token skip) on the host ->
    (weights [T, k] fp32, ids [T, k] int64), or (weights, rows) with each id mapped through expert_row (the storage
    row of each original expert, NO_EXPERT for a dropped one)."""
    weights, ids, rows = ops().route(logits, SCORING[spec.scoring], spec.top_k, spec.renormalize, spec.scaling,
                                     spec.n_group, spec.topk_group, spec.group_score == "top2_sum", alive,
                                     correction_bias, skip_beta or 0.0, expert_row)
    return (weights, ids) if expert_row is None else (weights, rows)


DECODE_ITEMS = ("auto", "k-blocks", "whole-experts")


def set_decode_items(items: str) -> str:
    """How the 4-bit MoE's decode path (up to 16 rows an expert) splits its work among the threads: "k-blocks" (each
    GEMM's experts cut along K, the threads meeting between gate_up and down), "whole-experts" (a thread runs one
    expert's gate_up, activation and down), or "auto" (whole experts where they are small and share evenly). Returns
    the previous choice; for the tests and benchmarks, which take each way."""
    return DECODE_ITEMS[ops().set_decode_items(DECODE_ITEMS.index(items))]


def parallel_threads() -> int:
    """How many threads the kernels' work is spread over (torch's intra-op threads; 1 if built without OpenMP)."""
    return ops().parallel_threads()


def read_bytes(buffer: torch.Tensor) -> int:
    """Read every byte of `buffer` with vector loads on all threads (the bandwidth probe of the benchmarks)."""
    return ops().read_bytes(buffer, isa())
