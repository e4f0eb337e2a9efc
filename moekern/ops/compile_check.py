"""Compile every Triton kernel of moekern.ops ahead of time for sm_80 and sm_90, without a GPU, and read its SASS.

    python -m moekern.ops.compile_check [--arch 80 90] [--resources]      # a representative set, compiled
    python -m moekern.ops.compile_check --sass --out benchmarks/results/static/   # the static performance report

The launches are the host code's own: a MoE forward (route, then moe_gemm.moe_experts) runs on meta tensors of a
real model's shapes with every Triton kernel replaced by a recorder, so each recorded launch carries exactly the
arguments, constexprs, warps and stages a GPU run would pass; each is then built through
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 64)) with the JIT's own specialisation of its
arguments (an int equal to 1 becomes a constant, a multiple of 16 gets the divisibility hint). Triton's wheel ships
ptxas and cuobjdump, so this reaches a cubin and its SASS on a CPU-only machine, and catches what the interpreter
cannot: type errors of the compiled path, shapes tl.dot refuses, register and shared-memory overflow.

--sass reads each GEMM's K loop (the loop that holds the MMAs) from the SASS and reports, per variant: registers,
spill bytes, shared memory, CTAs per SM, SASS instructions per K step, instructions per weight byte, block barriers
per K step, wgmma waits, cp.async / TMA, and the issue-rate ceiling on bytes per second:

    ceiling = SMs x 4 schedulers x 1 warp-instruction per clock x clock / (warp-instructions per weight byte)

with warp-instructions per weight byte = (K-loop SASS instructions x warps) / (weight bytes a K step reads: the
tile's weights, and for 4 bits its scales and zeros), counted over the bytes that must be read: where a GEMM's last
tile runs past N or a K step past K (a split's end), the instructions spent on padding count and its bytes do not.
It is an upper bound from instruction counts (every scheduler issuing every cycle), not a measured speed: a kernel
whose ceiling is under the memory bandwidth cannot be memory-bound, one above it may be. Machines: H100 SXM for
sm_90 (132 SMs, 1.98 GHz, 3.35 TB/s), A100 SXM 80 GB for sm_80 (108 SMs, 1.41 GHz, 2.04 TB/s).

It must run with TRITON_INTERPRET unset (under the interpreter @triton.jit makes interpreted functions, which the
compiler cannot take); the tests run it in a subprocess for that reason.
"""

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock_ghz: float
    hbm_tbs: float
    smem_per_sm: int  # bytes a CTA's shared memory comes out of
    mac_per_clk: int  # dense bf16 multiply-adds an SM's tensor cores finish a clock
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32

    def issue_rate(self) -> float:
        """Warp-instructions per second, all four schedulers of every SM issuing each cycle."""
        return self.sms * 4 * self.clock_ghz * 1e9


MACHINES = {
    90: Machine("H100 SXM", 132, 1.98, 3.35, 228 * 1024, 2048),  # 989 TFLOP/s dense bf16 at 1.83 GHz
    80: Machine("A100 SXM 80GB", 108, 1.41, 2.04, 164 * 1024, 1024),  # 312 TFLOP/s at 1.41 GHz
}
H100_TBS = MACHINES[90].hbm_tbs


@dataclass(frozen=True)
class ModelShape:
    """The routed experts of one MoE layer of a real model, and its router."""

    experts: int
    hidden: int
    inter: int
    top_k: int
    group: int  # 4-bit group size moekern would use (128, or the largest power of two dividing K)
    act: str = "silu"
    bias: bool = False
    scoring: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    correction_bias: bool = False


MODELS = {
    "mixtral-8x7b": ModelShape(8, 4096, 14336, 2, 128, renormalize=True),
    "qwen3-30b-a3b": ModelShape(128, 2048, 768, 8, 128, renormalize=True),
    "olmoe-1b-7b": ModelShape(64, 2048, 1024, 8, 128),
    "deepseek-v3": ModelShape(256, 7168, 2048, 8, 128, scoring="sigmoid", renormalize=True, n_group=8, topk_group=4,
                              group_score="top2_sum", correction_bias=True),
    "gpt-oss-120b": ModelShape(128, 2880, 2880, 4, 64, act="clamped_swiglu", bias=True, scoring="topk_softmax"),
    "gpt-oss-20b": ModelShape(32, 2880, 2880, 4, 64, act="clamped_swiglu", bias=True, scoring="topk_softmax"),
}
DECODE_TOKENS = 16  # the 4-bit decode target covers 1 to 16 tokens

# The representative set of the plain run (and its test): every kernel, 4-bit decode and prefill, bf16 prefill with
# GPT-OSS's activation and biases, AWQ's input scale, without the whole sweep: (model, tokens, 4-bit, AWQ input scale)
QUICK = [("deepseek-v3", 1, True, False), ("gpt-oss-120b", 2048, False, False), ("qwen3-30b-a3b", 2048, True, True)]


# ----------------------------------------------------------------------------------------------------------------------
# The host code's launches, recorded on meta tensors
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def recorded_launches():
    """Every Triton kernel of moe_gemm and routing records its launches instead of running."""
    from triton.runtime.jit import JITFunction

    from moekern.ops import moe_gemm, routing

    launches, saved = [], []
    for module in (moe_gemm, routing):
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, launches))
    try:
        yield launches
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


class _TorchOps:
    """Counts the aten ops that would launch a device kernel (not views, not allocations)."""

    FREE = {"empty", "empty_strided", "view", "reshape", "_reshape_alias", "as_strided", "expand", "t", "transpose",
            "permute", "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "_unsafe_view", "unbind",
            "lift_fresh", "split", "chunk", "contiguous"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in outer.FREE:
                    outer.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = [], Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def dry_run(model: str, tokens: int, quant: bool, in_scale: bool = False, arch: int = 90):
    """Route and run the experts of one MoE layer of `model` on `tokens` tokens, bf16, on meta tensors, planned for
    an sm_`arch` GPU: returns the recorded launches and the torch ops that would launch kernels, of the steady state
    (the 4-bit tensor-core layout is made by a first call, as a model's first forward makes it)."""
    import torch

    from moekern.ops import moe_gemm, routing, tuning
    from moekern.ops.reference import Activation, RouterSpec

    m = MODELS[model]
    meta = dict(device="meta")
    spec = RouterSpec(m.scoring, m.top_k, renormalize=m.renormalize, n_group=m.n_group, topk_group=m.topk_group,
                      group_score=m.group_score)
    logits = torch.empty(tokens, m.experts, dtype=torch.float32, **meta)
    bias = torch.empty(m.experts, dtype=torch.float32, **meta) if m.correction_bias else None
    x = torch.empty(tokens, m.hidden, dtype=torch.bfloat16, **meta)
    h, i, e = m.hidden, m.inter, m.experts
    if quant:
        def q4(n, k):
            return moe_gemm.Quant4(torch.empty(e, k // 8, n, dtype=torch.int32, **meta),
                                   torch.empty(e, k // m.group, n, dtype=torch.bfloat16, **meta),
                                   torch.empty(e, k // m.group, n, dtype=torch.uint8, **meta),
                                   torch.empty(e, k, dtype=torch.bfloat16, **meta) if in_scale else None)
        w1, w2 = q4(2 * i, h), q4(h, i)
    else:
        w1 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, **meta)
        w2 = torch.empty(e, h, i, dtype=torch.bfloat16, **meta)
    b1 = torch.empty(e, 2 * i, dtype=torch.bfloat16, **meta) if m.bias else None
    b2 = torch.empty(e, h, dtype=torch.bfloat16, **meta) if m.bias else None
    act = Activation(m.act)
    alive = torch.empty(e, dtype=torch.bool, **meta)

    def forward():
        weights, ids = routing.route(logits, spec, alive, bias)
        return moe_gemm.moe_experts(x, ids, weights, w1, w2, b1, b2, act)

    with tuning.planning_for(arch):
        with recorded_launches():
            forward()  # the first call makes the 4-bit layout (once per weight)
        with recorded_launches() as launches, _TorchOps() as ops:
            forward()
    return launches, ops.ops


# ----------------------------------------------------------------------------------------------------------------------
# Compiling a recorded launch
# ----------------------------------------------------------------------------------------------------------------------
PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int32": "*i32", "uint8": "*u8", "int8": "*i8",
       "bool": "*i1", "int64": "*i64"}
OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


def signature_of(launch: Launch):
    """(signature, constexprs, attrs, num_warps, num_stages) as Triton's JIT specialises this launch."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = launch.kernel.arg_names
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in OPTIONS})
    sig, consts, attrs = {}, {}, {}
    for idx, name in enumerate(names):
        value = values[name]
        if launch.kernel.params[idx].is_constexpr:
            sig[name] = "constexpr"
            consts[(idx,)] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = PTR[str(value.dtype).removeprefix("torch.")]
            attrs[(idx,)] = [["tt.divisibility", 16]]  # fresh allocations: 256-byte aligned
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
            if kind == "constexpr":
                sig[name] = "constexpr"
                consts[(idx,)] = value
            else:
                sig[name] = kind
                if key == "D":
                    attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3)


def compile_launch(launch: Launch, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, warps, stages = signature_of(launch)
    src = ASTSource(launch.kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 64), options={"num_warps": warps, "num_stages": stages})


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_resources(compiled, arch: int):
    """(registers, spill bytes) of a compiled kernel, from `ptxas -v` on its PTX (Triton's own ptxas; no GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    return int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else 0


def sass_of(compiled) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def sass_loops(sass: str):
    """[(first address, last address, [instruction text])] of every loop (a branch back to an earlier address)."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in _LINE.finditer(sass)]
    loops = []
    for addr, text in ins:
        found = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if found and int(found.group(1), 16) < addr:
            start = int(found.group(1), 16)
            loops.append((start, addr, [t for a, t in ins if start <= a <= addr]))
    return loops


def opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]


MMA_OPS = ("HGMMA", "HMMA")


def k_loop(sass: str):
    """The GEMM's K loop: the loop with the most MMA instructions (the largest loop where none has any)."""
    loops = sass_loops(sass)
    if not loops:
        return None
    return max(loops, key=lambda lp: (sum(opcode(t).startswith(MMA_OPS) for t in lp[2]), len(lp[2])))[2]


def ctas_per_sm(machine: Machine, regs: int, shared: int, warps: int) -> int:
    threads = 32 * warps
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = machine.regs_per_sm // max(per_warp * warps, 1)
    by_smem = machine.smem_per_sm // (shared + 1024) if shared else machine.ctas_per_sm
    return max(0, min(by_regs, by_smem, machine.threads_per_sm // threads, machine.ctas_per_sm))


# ----------------------------------------------------------------------------------------------------------------------
# Per-variant figures
# ----------------------------------------------------------------------------------------------------------------------
def gemm_geometry(launch: Launch):
    """What one K step of a GEMM launch reads and computes: (halves, BLOCK_N, MMA width, BLOCK_K, weight bytes)."""
    c = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
    halves = 2 if launch.name == "gate_up_kernel" else 1
    bn, bk, bm = c["BLOCK_N"], c["BLOCK_K"], c["BLOCK_M"]
    mp = max(bm, 16)
    if c["QUANT"]:
        scale_bytes = c["s_ptr"].element_size() + 1  # a scale and a uint8 zero per row and group
        nbytes = halves * bn * (bk / 2 + scale_bytes * bk / c["GROUP"])
    else:
        nbytes = halves * bn * bk * c["w_ptr"].element_size()
    return halves, bn, mp, bk, nbytes


def analyse(launch: Launch, compiled, arch: int, sass: str) -> dict:
    machine = MACHINES[arch]
    regs, spills = ptxas_resources(compiled, arch)
    shared = compiled.metadata.shared
    warps = launch.kwargs.get("num_warps", 4)
    ptx = compiled.asm["ptx"]
    row = dict(kernel=launch.name, arch=arch, num_warps=warps, num_stages=launch.kwargs.get("num_stages"),
               registers=regs, spill_bytes=spills, shared_bytes=shared,
               ctas_per_sm=ctas_per_sm(machine, regs or 255, shared, warps),
               cp_async="cp.async" in ptx, tma="cp.async.bulk.tensor" in ptx)
    body = k_loop(sass)
    if body is None:
        return row
    ops = collections.Counter(opcode(t) for t in body)
    row.update(loop_instructions=len(body),
               barriers_per_step=sum(n for op, n in ops.items() if op.startswith("BAR.")),
               mma_per_step=sum(n for op, n in ops.items() if op.startswith(MMA_OPS)),
               ldgsts_per_step=ops.get("LDGSTS.E.BYPASS.128", 0) + ops.get("LDGSTS.E.BYPASS.LTC128B.128", 0)
               + sum(n for op, n in ops.items() if op.startswith("LDGSTS") and "128" not in op),
               sts_per_step=sum(n for op, n in ops.items() if op.startswith("STS")),
               wgmma_waits_all=sum(1 for t in body if t.startswith("WARPGROUP.DEPBAR.LE") and t.endswith("0x0")),
               top_ops=dict(ops.most_common(12)))
    if launch.name in ("gate_up_kernel", "down_kernel"):
        c = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
        halves, bn, mp, bk, nbytes = gemm_geometry(launch)
        warp_inst = len(body) * warps
        per_byte = warp_inst / nbytes
        row.update(BLOCK_M=c["BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=c.get("SPLIT_K", launch.grid[1]),
                   quant=bool(c["QUANT"]), factored=bool(c["FACTORED"]), asm=bool(c["ASM"]),
                   weight_bytes_per_step=nbytes, warp_inst_per_byte=per_byte,
                   thread_inst_per_weight=warp_inst * 32 / (halves * bn * bk),
                   inst_per_mma_unit=warp_inst / (halves * bn * mp * bk / (64 * 16 * 16)),
                   # clocks the SM's 4 schedulers need to issue a K step, over the clocks its tensor cores need for
                   # the step's MMAs: under 1, the tensor cores, not the issue, can bound a compute tile
                   issue_over_mma=(warp_inst / 4) / (halves * bn * mp * bk / machine.mac_per_clk),
                   step_ceiling_tbs=machine.issue_rate() / per_byte / 1e12)
    return row


def _expected_blocks(pairs: int, experts: int, bm: int) -> int:
    """Blocks of a balanced routing (pairs spread evenly over the experts): the grid's working programs."""
    base, extra = divmod(pairs, experts)
    return sum(-(-(base + (i < extra)) // bm) for i in range(experts))


def useful_fraction(n: int, k: int, block_n: int, block_k: int, k_per_split: int) -> float:
    """The share of a GEMM's tile work that lands on real weights: N x K over the rows and k its tiles and K steps
    run through (a tile past N or a step past K, or past the end of a split, costs its full instructions but reads
    only padding)."""
    steps = sum(-(-min(k_per_split, k - start) // block_k) for start in range(0, k, k_per_split))
    return n * k / (-(-n // block_n) * block_n * steps * block_k)


def grid_row(launch: Launch, model: ModelShape, tokens: int, row: dict) -> dict:
    """The launch's own figures beside its variant's `row`: its grid, the programs that have work, and the issue
    ceiling over the bytes that must be read (the K step's ceiling times useful_fraction)."""
    c = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
    if launch.name not in ("gate_up_kernel", "down_kernel"):
        return dict(grid=list(launch.grid))
    n = model.inter if launch.name == "gate_up_kernel" else model.hidden
    working = _expected_blocks(tokens * model.top_k, model.experts, c["BLOCK_M"]) * -(-n // c["BLOCK_N"])
    out = dict(grid=list(launch.grid), working_ctas=working * launch.grid[1], N=n, K=c["K"],
               k_per_split=c["k_per_split"])
    if "step_ceiling_tbs" in row:
        useful = useful_fraction(n, c["K"], c["BLOCK_N"], c["BLOCK_K"], c["k_per_split"])
        out.update(useful_fraction=useful, ceiling_tbs=row["step_ceiling_tbs"] * useful)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Driving it
# ----------------------------------------------------------------------------------------------------------------------
def _key(launch: Launch, arch: int):
    sig, consts, attrs, warps, stages = signature_of(launch)
    return (launch.name, tuple(sig.items()), tuple(sorted((k[0], v) for k, v in consts.items())),
            tuple(sorted(attrs)), warps, stages, arch)


def _label(launch: Launch) -> str:
    c = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
    name = launch.name.removesuffix("_kernel")
    if name in ("gate_up", "down"):
        kind = "4-bit" if c["QUANT"] else str(c["w_ptr"].dtype).removeprefix("torch.")
        extra = " clamped" if c.get("ACT") else ""
        extra += " bias" if c["HAS_BIAS"] else ""
        extra += " AWQ-scale" if c["HAS_IN_SCALE"] else ""
        return (f"{name} {kind} BM={c['BLOCK_M']} BN={c['BLOCK_N']} BK={c['BLOCK_K']} split={launch.grid[1]} "
                f"w{c['num_warps']}s{c['num_stages']}{extra}")
    if name == "route":
        return f"route scoring={c['SCORING']} E_PAD={c['E_PAD']} BLOCK_T={c['BLOCK_T']} groups={c['N_GROUP']}"
    if name == "align":
        return f"align E_PAD={c['E_PAD']} BM={c['BLOCK_M']} CHUNK={c['CHUNK']}"
    return f"{name} TOP_K={c.get('TOP_K')} SPLIT_K={c.get('SPLIT_K')}"


def compile_all(archs=(80, 90), verbose=True, resources=False, cases=None, sass=False):
    """Compile the launches of each case (model, tokens, 4-bit, AWQ input scale) for each arch, each distinct
    variant once. Returns (rows, cases_seen): a row per variant and arch (label, seconds, registers, spills, shared;
    with sass=True the K-loop figures too), and per case its launches and torch ops."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the compiler cannot take interpreted kernels")
    cases = QUICK if cases is None else cases
    variants, seen = {}, []
    for model, tokens, quant, in_scale in cases:
        per_arch = {}
        for arch in archs:
            launches, ops = dry_run(model, tokens, quant, in_scale, arch)
            keys = [_key(launch, arch) for launch in launches]
            for launch, key in zip(launches, keys):
                variants.setdefault(key, (launch, arch))
            per_arch[arch] = dict(launches=launches, keys=keys)
        seen.append(dict(model=model, tokens=tokens, quant=quant, in_scale=in_scale, per_arch=per_arch, torch_ops=ops,
                         triton_launches=len(launches)))
    rows = {}
    for key, (launch, arch) in variants.items():
        t0 = time.perf_counter()
        compiled = compile_launch(launch, arch)
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"sm_{arch} {_label(launch)}: no cubin")
        seconds = time.perf_counter() - t0
        if sass:
            row = analyse(launch, compiled, arch, sass_of(compiled))
        else:
            regs, spills = ptxas_resources(compiled, arch) if resources else (None, None)
            row = dict(kernel=launch.name, arch=arch, registers=regs, spill_bytes=spills,
                       shared_bytes=compiled.metadata.shared)
        row.update(label=_label(launch), seconds=round(seconds, 2))
        rows[key] = row
        if verbose:
            extra = f"  regs={row['registers']} spill={row['spill_bytes']} B" if resources or sass else ""
            if "step_ceiling_tbs" in row:
                extra += f"  loop={row['loop_instructions']} step ceiling={row['step_ceiling_tbs']:.2f} TB/s"
            print(f"sm_{arch}  {row['label']:70s} {seconds:5.1f}s  shared={row['shared_bytes']} B{extra}", flush=True)
    return rows, seen


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------
def _commit() -> str | None:
    """HEAD's short hash, with "+changes" where moekern/ differs from it (the kernels compiled are not the commit's)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+changes" if git("status", "--porcelain", "--", "moekern") else "")) or None


def report(rows: dict, seen: list, archs, commit: str | None = None) -> dict:
    """JSON-able report: per (model, tokens, 4-bit) case and arch, each launch's variant figures; `commit`: the one
    the kernels were compiled at (taken when the run started)."""
    import torch
    import triton

    from moekern.ops import tuning

    commit = commit or _commit()
    out_cases = []
    for case in seen:
        model = MODELS[case["model"]]
        launches = []
        for arch, planned in case["per_arch"].items():
            for launch, key in zip(planned["launches"], planned["keys"]):
                launches.append({**rows[key], **grid_row(launch, model, case["tokens"], rows[key])})
        out_cases.append(dict(model=case["model"], tokens=case["tokens"], bucket=tuning.bucket(case["tokens"]),
                              quant=case["quant"], in_scale=case["in_scale"],
                              triton_launches=case["triton_launches"], torch_kernel_ops=case["torch_ops"],
                              commit=commit, launches=launches))
    return dict(
        command="python -m moekern.ops.compile_check --sass --out benchmarks/results/static/",
        model_of_ceiling="SMs x 4 schedulers x 1 warp-instruction/clock x clock / (K-loop warp-instructions per "
                         "weight byte that must be read: a K step's bytes, times the share of the tiles' rows and "
                         "steps' k that are real, not padding); an upper bound from instruction counts, not a "
                         "measured speed",
        machines={arch: vars(MACHINES[arch]) for arch in archs},
        models={name: vars(m) for name, m in MODELS.items()},
        versions=dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version()),
        commit=commit, commits=[commit], when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        cases=out_cases,
    )


def merge(old: dict, new: dict) -> dict:
    """`old` with the cases of `new` (a run over some models or token buckets) in place of its own: the report of
    a partial rerun. Every case keeps the commit it was compiled at; `commits` lists them all."""
    def case_key(c):
        return c["model"], c["tokens"], c["quant"], c["in_scale"]

    def current(c):  # the format of today's report: each GEMM row has its K step's ceiling and its useful share
        return all("useful_fraction" in r for r in c["launches"] if "step_ceiling_tbs" in r) and \
            any("step_ceiling_tbs" in r for r in c["launches"])

    fresh = {case_key(c) for c in new["cases"]}
    stale = {case_key(c) for c in old["cases"] if not current(c)} - fresh
    if stale:
        raise ValueError(f"cases from an older format of the report, rerun them: {sorted(stale)}")
    if {str(a) for a in old["machines"]} != {str(a) for a in new["machines"]}:
        raise ValueError("the runs cover different archs: merge runs of the same --arch")
    cases = [c for c in old["cases"] if case_key(c) not in fresh] + new["cases"]
    order = {name: i for i, name in enumerate(MODELS)}
    cases.sort(key=lambda c: (order.get(c["model"], len(order)), c["tokens"], c["quant"], c["in_scale"]))
    commits = list(dict.fromkeys(c["commit"] for c in cases))
    return {**new, "cases": cases, "commits": commits, "when": f"{old['when']} and {new['when']}"
            if set(commits) != {new["commit"]} else new["when"]}


def _commits_line(rep: dict) -> str:
    commits = rep.get("commits") or [rep["commit"]]
    if len(commits) == 1:
        return f"commit {commits[0]}"
    parts = []
    every_model = {c["model"] for c in rep["cases"]}
    for commit in commits:
        mine = [c for c in rep["cases"] if c["commit"] == commit]
        models = {c["model"] for c in mine}
        tokens = ", ".join(str(t) for t in sorted({c["tokens"] for c in mine}))
        which = "" if models == every_model else f" of {', '.join(sorted(models))}"
        parts.append(f"{commit}: {tokens} tokens{which}")
    return "rows from several commits, merged with --merge: " + "; ".join(parts)


def _fmt(value, digits=2):
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(rep: dict) -> str:
    archs = sorted({int(a) for a in rep["machines"]}, reverse=True)
    machines = {int(a): m for a, m in rep["machines"].items()}
    lines = ["# Static performance report of the Triton MoE kernels", "",
             f"`{rep['command']}` ({_commits_line(rep)}, Triton {rep['versions']['triton']}, {rep['when']}).", "",
             "Every figure comes from compiling the kernels for sm_90 and sm_80 on a CPU-only machine and reading "
             "their SASS: **an issue-rate ceiling from instruction counts, not a measured speed.** The ceiling is "
             f"{rep['model_of_ceiling'].split(';')[0]}. A kernel whose ceiling is under the memory bandwidth cannot be "
             "memory-bound; one above it may be (occupancy, latency and the memory system decide the rest).", ""]
    for arch in archs:
        m = machines[arch]
        lines.append(f"- sm_{arch}: {m['name']}, {m['sms']} SMs x 4 x {m['clock_ghz']} GHz = "
                     f"{m['sms'] * 4 * m['clock_ghz']:.0f} G warp-instructions/s; memory {m['hbm_tbs']} TB/s; tensor "
                     f"cores {m['mac_per_clk']} bf16 MAC a clock an SM.")
    lines += ["", "Columns: tile = BLOCK_M (routed rows, the MMA's N) x BLOCK_N (weight rows) x BLOCK_K, split-K, "
              "warps; loop inst = SASS instructions in the K loop (one K step) of each warp; inst/weight = "
              "thread-instructions a weight; inst/byte = warp-instructions a weight byte (4-bit: with its scales and "
              "zeros) of one K step; barriers = BAR.* a K step; waits = wgmma waits for zero pending a K step; "
              "useful = the share of the tiles' rows and the K steps' k that are real weights, not padding (GPT-OSS's "
              "2880 rows are 22.5 tiles of 128); ceiling = the K step's issue ceiling times useful; CTAs/SM from "
              "registers, shared memory and threads; working CTAs = the programs of the grid that have work under a "
              "balanced routing; inst/MMA = warp-instructions per m64n16k16 of MMA work (16,384 MACs); issue/MMA = "
              "clocks to issue a K step over the tensor cores' clocks for its MMAs.", ""]
    head = ("| model | tokens | op | kind | tile | regs | spill | smem KB | CTAs/SM | working CTAs | loop inst | "
            "inst/weight | inst/byte | barriers | waits | cp.async | useful | ceiling TB/s |")
    for arch in archs:
        lines += [f"## sm_{arch}: memory-bound tiles (BLOCK_M 16: decode and small batches)", "", head,
                  "|" + "---|" * 18]
        for case, row in _gemm_rows(rep, arch, lambda r: r["BLOCK_M"] <= 16):
            tile = f"{row['BLOCK_M']} x {row['BLOCK_N']} x {row['BLOCK_K']}, {row['SPLIT_K']}, {row['num_warps']}"
            lines.append(
                f"| {case['model']} | {case['tokens']} | {row['kernel'].removesuffix('_kernel')} | "
                f"{'4-bit' if row['quant'] else 'bf16'} | {tile} | {row['registers']} | {row['spill_bytes']} | "
                f"{row['shared_bytes'] / 1024:.0f} | {row['ctas_per_sm']} | {row.get('working_ctas', '-')} | "
                f"{row['loop_instructions']} | {row['thread_inst_per_weight']:.2f} | {row['warp_inst_per_byte']:.3f} | "
                f"{row['barriers_per_step']} | {row['wgmma_waits_all']} | {'yes' if row['cp_async'] else 'no'} | "
                f"{row['useful_fraction']:.3f} | {row['ceiling_tbs']:.2f} |")
        lines.append("")
    for arch in archs:
        lines += [f"## sm_{arch}: compute tiles (BLOCK_M 32 to 128: prefill and large batches)", "",
                  "| model | tokens | op | tile | regs | spill | smem KB | CTAs/SM | bf16 inst/MMA | 4-bit inst/MMA | "
                  "4-bit / bf16 | issue/MMA bf16 | issue/MMA 4-bit | 4-bit waits |", "|" + "---|" * 14]
        for (model, tokens, op), dense, quant in compute_pairs(rep, arch):
            tile = f"{quant['BLOCK_M']} x {quant['BLOCK_N']} x {quant['BLOCK_K']}, {quant['num_warps']}"
            lines.append(
                f"| {model} | {tokens} | {op} | {tile} | {quant['registers']} | {quant['spill_bytes']} | "
                f"{quant['shared_bytes'] / 1024:.0f} | {quant['ctas_per_sm']} | {dense['inst_per_mma_unit']:.1f} | "
                f"{quant['inst_per_mma_unit']:.1f} | {quant['inst_per_mma_unit'] / dense['inst_per_mma_unit']:.2f} | "
                f"{dense['issue_over_mma']:.2f} | {quant['issue_over_mma']:.2f} | {quant['wgmma_waits_all']} |")
        lines.append("")
    lines += ["## Routing, align and slot sum", "", "| arch | model | tokens | kernel | variant | regs | spill | "
              "smem KB | CTAs/SM | grid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for case in rep["cases"]:
            if case["quant"]:
                continue
            for row in case["launches"]:
                if row["arch"] == arch and row["kernel"] not in ("gate_up_kernel", "down_kernel"):
                    lines.append(f"| sm_{arch} | {case['model']} | {case['tokens']} | {row['kernel']} | "
                                 f"{row['label']} | {row['registers']} | {row['spill_bytes']} | "
                                 f"{row['shared_bytes'] / 1024:.1f} | {row['ctas_per_sm']} | {row['grid']} |")
    lines += ["", "## Launches per MoE layer (route to output)", "", "| model | tokens | 4-bit | Triton | torch ops |",
              "|---|---|---|---|---|"]
    for case in rep["cases"]:
        lines.append(f"| {case['model']} | {case['tokens']} | {case['quant']} | {case['triton_launches']} | "
                     f"{len(case['torch_kernel_ops'])} {' '.join(case['torch_kernel_ops'])} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(rep)]
    return "\n".join(lines) + "\n"


def _gemm_rows(rep: dict, arch: int, keep):
    return [(case, row) for case in rep["cases"] for row in case["launches"]
            if row["arch"] == arch and "ceiling_tbs" in row and keep(row)]


def compute_pairs(rep: dict, arch: int):
    """[((model, tokens, op), bf16 row, 4-bit row)] of the compute tiles (BLOCK_M over 16) on `arch`."""
    per = {}
    for case, row in _gemm_rows(rep, arch, lambda r: r["BLOCK_M"] > 16):
        per[(case["model"], case["tokens"], row["kernel"].removesuffix("_kernel"), row["quant"])] = row
    return [(key[:3], per[(*key[:3], False)], row) for key, row in sorted(per.items())
            if key[3] and (*key[:3], False) in per]


def targets(rep: dict) -> list[str]:
    """The targets of the kernels, each with its figure and met / not met (sm_90 where the target names the H100)."""
    rows = [(c, r) for c in rep["cases"] for r in c["launches"]]
    spills = [r for _, r in rows if r.get("spill_bytes")]
    decode = [r for c, r in rows if c["tokens"] <= DECODE_TOKENS and r.get("quant") and r["arch"] == 90]
    low = min(decode, key=lambda r: r["ceiling_tbs"], default=None)
    prefill = [(key, dense, quant) for key, dense, quant in compute_pairs(rep, 90) if quant["BLOCK_M"] >= 64]
    worst = max(prefill, key=lambda p: p[2]["inst_per_mma_unit"] / p[1]["inst_per_mma_unit"], default=None)
    launches = max((c["triton_launches"] + len(c["torch_kernel_ops"]) for c in rep["cases"]), default=None)
    out = [f"zero spills: {'met' if not spills else 'NOT met'} ({len(spills)} variants spill)"]
    if low is not None:
        under = sorted({c["model"] for c, r in rows if r in decode and r["ceiling_tbs"] < 2 * H100_TBS})
        out.append(f"4-bit decode (1-16 tokens) issue ceiling >= 2 x {H100_TBS} TB/s on sm_90: "
                   f"{'met' if not under else 'NOT met for ' + ', '.join(under)} (lowest {low['ceiling_tbs']:.2f} "
                   f"TB/s, {low['label']}); >= {H100_TBS} TB/s: "
                   f"{'met' if low['ceiling_tbs'] >= H100_TBS else 'NOT met'}")
    if worst is not None:
        ratio = worst[2]["inst_per_mma_unit"] / worst[1]["inst_per_mma_unit"]
        out.append(f"prefill (BLOCK_M 64 and 128) 4-bit <= 1.5 x bf16 instructions per MMA on sm_90: "
                   f"{'met' if ratio <= 1.5 else 'NOT met'} (worst {ratio:.2f}x, {worst[0][0]} {worst[0][1]} tokens "
                   f"{worst[0][2]}); largest issue/MMA of a 4-bit prefill tile "
                   f"{max(q['issue_over_mma'] for _, _, q in prefill):.2f}")
    if launches is not None:
        out.append(f"launches per MoE layer <= 6: {'met' if launches <= 6 else 'NOT met'} (most {launches})")
    return out


# Row strides: each multiplies an index that grows with the batch (pairs, tokens), so its products pass 2^31 in long
# prefills and must be computed in 64 bits. Weight offsets stay inside one expert's tensor and are safe in 32 bits.
ROW_STRIDES = {"stride_xt", "stride_it", "stride_pp", "stride_ps", "stride_ot"}
NARROW_PRODUCTS = ("mul.lo.s32", "mul.lo.u32", "mad.lo.s32", "mad.lo.u32", "mul.hi", "shl.b32")


def row_offset_products(model: str, tokens: int, quant: bool = True, arch: int = 90) -> dict:
    """For the GEMM and slot-sum launches of `model` at `tokens` tokens: each row stride's value, the largest
    product it takes (its largest row index times it), and the 32-bit PTX instructions that use it (there must be
    none: such a product wraps past 2^31). The stride's register is followed through the PTX from its ld.param."""
    launches, _ = dry_run(model, tokens, quant, arch=arch)
    m = MODELS[model]
    rows = {"stride_xt": tokens, "stride_it": tokens * m.top_k, "stride_pp": tokens * m.top_k, "stride_ot": tokens}
    out = {}
    for launch in launches:
        if launch.name not in ("gate_up_kernel", "down_kernel", "slot_sum_kernel"):
            continue
        compiled = compile_launch(launch, arch)
        ptx = compiled.asm["ptx"]
        sig = signature_of(launch)[0]
        params = [n for n in launch.kernel.arg_names if sig[n] != "constexpr"]
        values = dict(zip(launch.kernel.arg_names, launch.args))
        for name in params:
            if name not in ROW_STRIDES:
                continue
            found = re.search(rf"ld\.param\.\w+\s+(%\w+), \[{launch.name}_param_{params.index(name)}\]", ptx)
            narrow = []
            if found:
                reg = re.escape(found.group(1))
                narrow = [line.strip() for line in ptx.splitlines()
                          if re.search(rf"{reg}\b", line) and line.strip().startswith(NARROW_PRODUCTS)]
            largest = (rows.get(name, 1) - 1) * values[name] if name != "stride_ps" else values[name]
            out[f"{launch.name}.{name}"] = dict(stride=values[name], largest_product=largest, narrow=narrow,
                                                loaded=bool(found))
    return out


def launches_per_layer(model: str, tokens: int, quant: bool) -> tuple[list, list]:
    """(Triton kernels, torch ops that launch kernels) of one MoE layer, route to output, in the steady state."""
    launches, ops = dry_run(model, tokens, quant)
    return [launch.name for launch in launches], ops


def recheck(report_path: Path, model: str, tokens: int, quant: bool, kernel: str, arch: int = 90) -> tuple:
    """(the report's K-loop instruction count, today's) of one variant: a report older than the kernels fails."""
    rep = json.loads(Path(report_path).read_text())
    case = next(c for c in rep["cases"] if (c["model"], c["tokens"], c["quant"]) == (model, tokens, quant))
    row = next(r for r in case["launches"] if r["kernel"] == kernel and r["arch"] == arch)
    launch = next(lc for lc in dry_run(model, tokens, quant, arch=arch)[0] if lc.name == kernel)
    compiled = compile_launch(launch, arch)
    return row["loop_instructions"], len(k_loop(sass_of(compiled)))


def full_cases(models=None, buckets=None):
    from moekern.ops import tuning

    models = models or list(MODELS)
    buckets = buckets or list(tuning.TOKEN_BUCKETS)
    return [(m, t, q, False) for m in models for t in buckets for q in (False, True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--resources", action="store_true", help="registers and spills of each variant (ptxas -v)")
    parser.add_argument("--sass", action="store_true", help="the static report: every variant at the real shapes")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="with --sass: a subset of the models")
    parser.add_argument("--tokens", nargs="+", type=int, help="with --sass: a subset of the token buckets")
    parser.add_argument("--out", type=Path, help="with --sass: folder for report.json and report.md")
    parser.add_argument("--merge", action="store_true",
                        help="with --sass --out: replace only this run's cases in the report.json there")
    args = parser.parse_args(argv)
    if not args.sass:
        compile_all(tuple(args.arch), resources=args.resources)
        return 0
    commit = _commit()  # before the hour of compiling: the code the kernels are compiled from
    rows, seen = compile_all(tuple(args.arch), cases=full_cases(args.models, args.tokens), sass=True)
    rep = report(rows, seen, tuple(args.arch), commit)
    if args.merge:
        if not args.out or not (args.out / "report.json").exists():
            parser.error("--merge needs --out with a report.json in it")
        rep = merge(json.loads((args.out / "report.json").read_text()), rep)
    text = markdown(rep)
    print("\n".join(targets(rep)))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        (args.out / "report.md").write_text(text)
        print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
