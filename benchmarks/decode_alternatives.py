"""The decode formulation moekern did not take, measured the same way as the one it took (static, no GPU).

    python benchmarks/decode_alternatives.py [--out benchmarks/results/static/decode_alternatives.json]

Two ways to run a 4-bit GEMM over 1 to 16 rows an expert: (a) pad the rows to the MMA's smallest N (16) and use the
tensor cores, the weights as the MMA's register operand (moekern.ops.moe_gemm, swap AB); (b) no MMA: accumulate
x[m, k] * w[k, n] in registers across the whole K loop, [BLOCK_M, BLOCK_K, BLOCK_N] fp32, and reduce over K once at
the end (no cross-warp reduction in the loop). (b) is built here, on moekern's saved 4-bit layout, with the
cheapest dequantization it admits ((q - zero) * scale in fp32, one multiply-add a row), and its K loop counted from
the SASS for DeepSeek-V3's gate_up (H 7168, I 2048, group 128) at each BLOCK_M, next to (a)'s figures from the
static report. The issue-rate ceiling is compile_check's: SMs x 4 x clock / (warp-instructions a weight byte).
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiler cannot take interpreted kernels

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekern.ops import compile_check as cc  # noqa: E402


@triton.jit
def gate_up_register_accumulation(
    x_ptr, w_ptr, s_ptr, z_ptr, inter_ptr, sorted_ptr, block_expert_ptr, num_pairs, K, I,
    stride_xt, stride_we, stride_wk, stride_se, stride_sg, stride_it,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """gate_up on moekern's layout (qweight [E, K/8, N], N contiguous): every product stays in its own register
    lane across K, [BLOCK_M, BLOCK_K, BLOCK_N] for gate and for up, summed over K once after the loop."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        m = tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + m)
        row_ok = pairs < num_pairs
        token = tl.where(row_ok, pairs // TOP_K, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_g = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), tl.float32)
        shifts = tl.arange(0, 8) * 4
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_ptr + token[:, None] * stride_xt + k0 + tl.arange(0, BLOCK_K)[None, :]).to(tl.float32)
            r = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            g = k0 // GROUP
            for half in tl.static_range(2):
                cols = offs_n + half * I
                words = tl.load(w_ptr + e * stride_we + r[:, None] * stride_wk + cols[None, :])
                q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
                s = tl.load(s_ptr + e * stride_se + g * stride_sg + cols).to(tl.float32)
                z = tl.load(z_ptr + e * stride_se + g * stride_sg + cols).to(tl.float32)
                w = q.to(tl.float32) * s[None, :] - (z * s)[None, :]
                if half == 0:
                    acc_g += a[:, :, None] * w[None, :, :]
                else:
                    acc_u += a[:, :, None] * w[None, :, :]
        gate = tl.sum(acc_g, axis=1)
        up = tl.sum(acc_u, axis=1)
        h = gate * tl.sigmoid(gate) * up
        tl.store(inter_ptr + pairs[:, None].to(tl.int64) * stride_it + offs_n[None, :], h.to(tl.bfloat16),
                 mask=row_ok[:, None])


def measure(bm: int, arch: int = 90) -> dict:
    """The K loop of (b) at BLOCK_M = bm, with a [bm, BLOCK_K, 64] accumulator of about 8K products a half."""
    hidden, inter, group, experts, bn = 7168, 2048, 128, 256, 64
    bk = max(16, 8192 // (bn * bm))
    consts = dict(TOP_K=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=group, stride_wk=2 * inter)
    args = dict(num_pairs=8, K=hidden, I=inter, stride_xt=hidden, stride_we=hidden // 8 * 2 * inter,
                stride_se=hidden // group * 2 * inter, stride_sg=2 * inter, stride_it=inter)
    ptrs = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", inter_ptr="*bf16", sorted_ptr="*i32",
                block_expert_ptr="*i32")
    kernel = gate_up_register_accumulation
    launch = cc.Launch(kernel, (8, inter // bn, 1), tuple({**ptrs, **args, **consts}.get(n) for n in kernel.arg_names),
                       dict(num_warps=4, num_stages=2))
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "i32")
        if name in args or name in ptrs:
            attrs[(i,)] = [["tt.divisibility", 16]]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={k: v for k, v in attrs.items() if kernel.arg_names[k[0]] != "num_pairs"})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 64), options=dict(num_warps=4, num_stages=2))
    body = cc.k_loop(cc.sass_of(compiled))
    regs, spills = cc.ptxas_resources(compiled, arch)
    weights = 2 * bn * bk
    nbytes = weights / 2 + 2 * bn * 3 * bk / group
    per_byte = len(body) * 4 / nbytes
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, registers=regs, spill_bytes=spills,
                loop_instructions=len(body), thread_inst_per_weight=len(body) * 4 * 32 / weights,
                ceiling_tbs=cc.MACHINES[arch].issue_rate() / per_byte / 1e12, cp_async="cp.async" in compiled.asm["ptx"],
                barriers_per_step=sum(1 for t in body if cc.opcode(t).startswith("BAR.")), label=launch.name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/static/decode_alternatives.json")
    args = parser.parse_args(argv)
    rows = []
    for bm in (1, 2, 4, 8, 16):
        row = measure(bm)
        rows.append(row)
        print(f"register accumulation BM={bm:2d} BK={row['BLOCK_K']:3d}: {row['loop_instructions']} instructions a K "
              f"step, {row['thread_inst_per_weight']:.2f} a weight, ceiling {row['ceiling_tbs']:.2f} TB/s, "
              f"regs {row['registers']}, spill {row['spill_bytes']} B, barriers {row['barriers_per_step']}, "
              f"cp.async {row['cp_async']}", flush=True)
    report = ROOT / "benchmarks/results/static/report.json"
    tensor_core = None
    if report.exists():
        rep = json.loads(report.read_text())
        case = next(c for c in rep["cases"] if (c["model"], c["tokens"], c["quant"]) == ("deepseek-v3", 1, True))
        tensor_core = next(r for r in case["launches"] if r["kernel"] == "gate_up_kernel" and r["arch"] == 90)
        print(f"tensor cores (moekern): {tensor_core['loop_instructions']} instructions a K step, "
              f"{tensor_core['thread_inst_per_weight']:.2f} a weight, ceiling {tensor_core['ceiling_tbs']:.2f} TB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        command="python benchmarks/decode_alternatives.py", model="deepseek-v3 gate_up, 4-bit group 128, sm_90",
        register_accumulation=rows, tensor_cores=tensor_core and {k: tensor_core[k] for k in (
            "label", "loop_instructions", "thread_inst_per_weight", "ceiling_tbs", "registers", "spill_bytes")},
        versions=dict(triton=triton.__version__)), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
