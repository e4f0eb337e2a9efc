"""Compile every Triton kernel of moekern.ops ahead of time for sm_80 and sm_90, without a GPU.

`python -m moekern.ops.compile_check [--arch 80 90]` builds each kernel variant (the constexpr choices the host
code makes: tensor-core and decode tiles, dense and 4-bit, SiLU and GPT-OSS's clamped SwiGLU, split-K, each router
family) through triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 64)). Triton's wheel ships ptxas, so
this goes all the way to a cubin on a CPU-only machine and catches what the interpreter cannot: type errors of the
compiled path, shapes tl.dot refuses, and register/shared-memory overflow (reported per variant).

It must run with TRITON_INTERPRET unset (under the interpreter @triton.jit makes interpreted functions, which the
compiler cannot take); the test runs it in a subprocess for that reason.
"""

import argparse
import os
import sys
import time

FLOAT_ARGS = {"alpha", "limit", "scaling", "beta"}
UNALIGNED = {"num_pairs", "num_tokens", "num_experts", "max_padded"}


def _signature(kernel, ptr_types: dict, constexprs: dict, default_ptr: str):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, default_ptr)
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _gemm(op, quant, bm, act=0, bias=False, n=2048, k=1408, tokens=64, in_scale=False):
    """A GEMM variant with the launch parameters tuning.config gives the host for this shape."""
    from moekern.ops import moe_gemm, tuning

    group = 128 if quant else None
    cfg = tuning.config(op, n, k, quant, tokens, bm, 64, group)
    consts = dict(BLOCK_M=bm, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, QUANT=quant, GROUP=group or 1,
                  HAS_BIAS=bias, HAS_IN_SCALE=in_scale, USE_DOT=bm >= 16, DOT_FP32=False)
    # unit strides as the host passes them: dense W [E, N, K] has K contiguous; 4-bit words and scales N contiguous
    consts.update(dict(stride_wn=1, stride_sn=1) if quant else dict(stride_wk=1))
    ptrs = {"sorted_ptr": "*i32", "block_expert_ptr": "*i32"}
    if quant:
        ptrs.update({"w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8"})
    if op == "gate_up":
        kernel = moe_gemm.gate_up_kernel
        consts.update(TOP_K=8, ACT=act)
    else:
        kernel = moe_gemm.down_kernel
        ptrs.update({"weight_ptr": "*fp32", "part_ptr": "*fp32"})
    label = f"{op} {'4-bit' if quant else 'bf16'} BLOCK_M={bm}{' clamped+bias' if act else ''}"
    label += " AWQ input scale" if in_scale else ""
    return label, kernel, ptrs, consts, "*bf16", cfg.num_warps, cfg.num_stages


def variants():
    """(label, kernel, pointer dtypes, constexprs, default pointer dtype, num_warps, num_stages): the GEMMs at the
    decode (GEMV) and tensor-core BLOCK_M the tuning table picks, dense and 4-bit; the other kernels once each."""
    from moekern.ops import moe_gemm, routing

    route = dict(TOP_K=8, K_PAD=8, E_PAD=64, BLOCK_T=16, RENORMALIZE=True, HAS_ALIVE=True, HAS_SKIP=True)
    return [
        _gemm("gate_up", False, 1, act=1, bias=True),
        _gemm("gate_up", False, 64),
        _gemm("gate_up", True, 4),
        _gemm("gate_up", True, 16, in_scale=True),
        _gemm("down", False, 8),
        _gemm("down", False, 64),
        _gemm("down", True, 1, in_scale=True),
        _gemm("down", True, 32),
        ("slot_sum", moe_gemm.slot_sum_kernel, {"part_ptr": "*fp32", "ids_ptr": "*i32"},
         dict(TOP_K=8, SPLIT_K=4, BLOCK_N=1024), "*bf16", 4, 1),
        ("route softmax", routing.route_kernel, {"alive_ptr": "*i8", "ids_ptr": "*i32"},
         dict(route, SCORING=0, HAS_BIAS=False, N_GROUP=1, TOPK_GROUP=1, GROUP_TOP2=False, G_PAD=1), "*fp32", 4, 1),
        ("route sigmoid groups (DeepSeek-V3)", routing.route_kernel, {"alive_ptr": "*i8", "ids_ptr": "*i32"},
         dict(route, SCORING=1, HAS_BIAS=True, N_GROUP=8, TOPK_GROUP=4, GROUP_TOP2=True, G_PAD=8), "*fp32", 4, 1),
        ("align E=64", routing.align_kernel, {}, dict(BLOCK_M=16, E_PAD=64, CHUNK=64), "*i32", 8, 1),
        ("align E=256", routing.align_kernel, {}, dict(BLOCK_M=64, E_PAD=256, CHUNK=16), "*i32", 8, 1),
    ]


def ptxas_resources(compiled, arch: int):
    """(registers, spill bytes) of a compiled kernel, from `ptxas -v` on its PTX (Triton's own ptxas; no GPU)."""
    import re
    import subprocess
    import tempfile

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


def compile_one(kernel, ptrs, consts, default_ptr, warps, stages, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _signature(kernel, ptrs, consts, default_ptr)
    # What the JIT sees at run time on model shapes: pointers, strides and sizes divisible by 16 (so loads can be
    # 16 bytes wide), the unit strides the variant names in consts specialised to 1; only counts that follow the
    # batch (pairs, tokens, experts) are left without the hint.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name not in consts and name not in UNALIGNED and sig[name] != "fp32"}
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 64), options={"num_warps": warps, "num_stages": stages})


def compile_all(archs=(80, 90), verbose=True, resources=False):
    """Compile every variant for every arch; returns [(arch, label, seconds, registers, spill bytes, shared bytes)]
    (registers and spills from ptxas -v with resources=True, else None)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the compiler cannot take interpreted kernels")
    results = []
    for arch in archs:
        for label, kernel, ptrs, consts, default_ptr, warps, stages in variants():
            t0 = time.perf_counter()
            compiled = compile_one(kernel, ptrs, consts, default_ptr, warps, stages, arch)
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"sm_{arch} {label}: no cubin")
            seconds = time.perf_counter() - t0
            regs, spills = ptxas_resources(compiled, arch) if resources else (None, None)
            row = (arch, label, seconds, regs, spills, compiled.metadata.shared)
            results.append(row)
            if verbose:
                res = f"  regs={regs} spill={spills} B" if resources else ""
                print(f"sm_{arch}  {label:45s} {seconds:5.1f}s  shared={row[5]} B{res}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--resources", action="store_true", help="registers and spills of each variant (ptxas -v)")
    args = parser.parse_args(argv)
    compile_all(tuple(args.arch), resources=args.resources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
