"""Microbenchmarks of the grouped MoE GEMM: moekern's Triton kernels (bf16 and 4-bit), reference.moe_experts, and
transformers' grouped_mm experts path, on the expert shapes of real models.

    python benchmarks/bench_moe_gemm.py                 # on a GPU: every case, JSON in benchmarks/results/
    python benchmarks/bench_moe_gemm.py --models olmoe_1b_7b --tokens 1 16 --backends triton triton4 --check --graphs
    python benchmarks/bench_moe_gemm.py --smoke         # CPU: tiny shapes through the interpreter, checks only
    python benchmarks/bench_moe_gemm.py --measure-peaks --out peaks.json   # GPU: copy bandwidth, bf16 matmul rate
    pytest benchmarks/bench_moe_gemm.py --benchmark-enable   # the same cases under pytest-benchmark

Models: mixtral_8x7b, qwen3_30b_a3b, olmoe_1b_7b, deepseek_v3, gpt_oss_120b, deepseek_moe_16b, qwen1.5_moe_a2.7b
(expert shapes only: E, H, I, top_k; GPT-OSS's clamped SwiGLU and biases are not modelled here).
Backends: triton (bf16), triton4 (moekern's 4-bit layout, RTN, group 128, or 64 where K is no multiple of 128),
reference, grouped_mm (transformers).

Per case (model x tokens x experts dropped x slots skipped x backend): median time (triton.testing.do_bench, CUDA
events), the bytes that must move (the weights of the experts the routing reaches, read once, with 4-bit scales
and zeros; the activations in and out), achieved bandwidth, and TFLOP/s counted on the computed pairs only
(2 * pairs * 3 * H * I), and the floor max(bytes / bandwidth, flops / rate) with its fraction reached. The two rates
are measured on the device itself (--measure-peaks: the copy bandwidth of moekern's bytes floor, a 8192^3 bf16
matmul) and passed in with --peak-gbps / --peak-tflops; without them the datasheet's H200 figures stand in and the
JSON says so (peaks_measured). --graphs also times CUDA-graph replays, which proves
the path captures (a host sync fails the capture; the reference backend has one by design). Dropped experts are
removed from the routing (the survivors keep their weights stacked, as the module does after Expert Drop); a
skipped slot gets NO_EXPERT.

On a CPU the kernels run in Triton's interpreter: times there mean nothing, so --smoke checks each backend against
the reference and records no time (time_ms null, "timed": false).
"""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekern.ops import moe_gemm  # noqa: E402
from moekern.ops import reference as R  # noqa: E402
import triton  # noqa: E402  (after TRITON_INTERPRET is decided)

RESULTS = ROOT / "benchmarks" / "results"


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
# The two ceilings of the floor: datasheet leads for an H200 until measured on the device (--measure-peaks: a large
# device-to-device copy, a large bf16 matmul); --peak-gbps / --peak-tflops override them.
DATASHEET_GBPS, DATASHEET_TFLOPS = 4800.0, 989.0
PEAK_GBPS, PEAK_TFLOPS = DATASHEET_GBPS, DATASHEET_TFLOPS


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    hidden: int
    inter: int  # per-expert intermediate size
    top_k: int


MODELS = {
    "mixtral_8x7b": Shape("mixtral_8x7b", 8, 4096, 14336, 2),
    "qwen3_30b_a3b": Shape("qwen3_30b_a3b", 128, 2048, 768, 8),
    "olmoe_1b_7b": Shape("olmoe_1b_7b", 64, 2048, 1024, 8),
    "deepseek_v3": Shape("deepseek_v3", 256, 7168, 2048, 8),  # 22.5 GB of bf16 experts: needs a large GPU
    "gpt_oss_120b": Shape("gpt_oss_120b", 128, 2880, 2880, 4),
    "deepseek_moe_16b": Shape("deepseek_moe_16b", 64, 2048, 1408, 6),
    "qwen1.5_moe_a2.7b": Shape("qwen1.5_moe_a2.7b", 60, 2048, 1408, 4),
}
DEFAULT_MODELS = [m for m in MODELS if m != "deepseek_v3"]  # DeepSeek-V3 only when named: its experts are large
SMOKE = {"smoke": Shape("smoke", 8, 64, 32, 2)}
TOKENS = (1, 4, 16, 64, 256, 2048)
DROPPED = (0.0, 0.25, 0.5)
SKIPPED = (0.0, 0.5)
BACKENDS = ("triton", "triton4", "reference", "grouped_mm")
GROUP = 128


@dataclass
class Case:
    model: str
    tokens: int
    dropped: float
    skipped: float
    backend: str


_WEIGHTS: dict = {}  # (model, survivors, dtype, device) -> (w1, w2), and "+q4" -> the 4-bit pair: made once


def expert_weights(shape: Shape, alive: int, device, dtype):
    key = (shape.name, alive, dtype, str(device))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one model's weights at a time (Mixtral's are 2.8 GB in bf16)
        g = torch.Generator(device=device).manual_seed(1)
        h, i = shape.hidden, shape.inter
        w1 = (torch.randn(alive, 2 * i, h, generator=g, device=device) * h**-0.5).to(dtype)
        w2 = (torch.randn(alive, h, i, generator=g, device=device) * i**-0.5).to(dtype)
        _WEIGHTS[key] = (w1, w2)
    return _WEIGHTS[key]


def make_inputs(shape: Shape, case: Case, device, dtype, seed=0):
    """Stacked survivor weights and a routing over them with a fraction of slots skipped (fresh random data)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    alive = shape.experts - int(round(case.dropped * shape.experts))
    alive = max(alive, shape.top_k)
    x = torch.randn(case.tokens, shape.hidden, generator=g).to(device, dtype)
    logits = torch.randn(case.tokens, alive, generator=g)
    weights, ids = logits.softmax(-1).topk(shape.top_k, dim=-1)
    ids = ids.masked_fill(torch.rand(case.tokens, shape.top_k, generator=g) < case.skipped, R.NO_EXPERT)
    ids[:, 0] = logits.argmax(-1)  # the top slot is never skipped
    w1, w2 = expert_weights(shape, alive, device, dtype)
    return x, ids.to(device), weights.to(device, dtype), w1, w2


def group_for(k: int) -> int:
    """GROUP, or the largest power of two under it that divides K (GPT-OSS's 2880: 64)."""
    group = GROUP
    while k % group:
        group //= 2
    return group


def quantized(w1, w2):
    key = ("q4", w1.data_ptr(), w2.data_ptr())
    if key not in _WEIGHTS:
        _WEIGHTS[key] = tuple(quantize_rtn(w, group_for(w.shape[2])) for w in (w1, w2))
    return _WEIGHTS[key]


def quantize_rtn(w: torch.Tensor, group: int) -> moe_gemm.Quant4:
    """Round-to-nearest 4-bit in moekern's layout (only to have realistic 4-bit tensors to time)."""
    from moekern.formats import layout

    e, n, k = w.shape
    wg = w.float().reshape(e, n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = (-lo / scale).round().clamp(0, 15)
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(e, n, k)
    return moe_gemm.Quant4(layout.pack(q), scale.transpose(1, 2).contiguous().to(w.dtype),
                           zero.transpose(1, 2).contiguous().to(torch.uint8))


def grouped_mm_module(w1, w2):
    """What transformers' grouped_mm experts function reads off an experts module."""
    def apply_gate(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    return SimpleNamespace(num_experts=w1.shape[0], gate_up_proj=w1, down_proj=w2, has_gate=True, has_bias=False,
                           is_transposed=False, act_fn=torch.nn.functional.silu, _apply_gate=apply_gate)


def runner(backend: str, x, ids, weights, w1, w2):
    if backend == "triton":
        return lambda: moe_gemm.moe_experts(x, ids, weights, w1, w2)
    if backend == "triton4":
        q1, q2 = quantized(w1, w2)
        return lambda: moe_gemm.moe_experts(x, ids, weights, q1, q2)
    if backend == "reference":
        return lambda: R.moe_experts(x, ids, weights, w1, w2)
    if backend == "grouped_mm":
        from transformers.integrations.moe import grouped_mm_experts_forward

        module = grouped_mm_module(w1, w2)
        sentinel = ids.masked_fill(ids < 0, w1.shape[0])  # transformers' marker of a pair it does not compute
        return lambda: grouped_mm_experts_forward(module, x, sentinel, weights)
    raise ValueError(backend)


def must_move(shape: Shape, ids, w1, backend: str, act_bytes: int):
    """(bytes, flops): each reached expert's weights once (4-bit: half a byte each, plus scales and zeros per group),
    x in and out once. Intermediates are not counted: a fused kernel need not move them."""
    reached = int(torch.unique(ids[ids >= 0]).numel())
    pairs = int((ids >= 0).sum())
    params = 3 * shape.hidden * shape.inter
    if backend == "triton4":
        weight_bytes = params // 2 + (params // group_for(shape.inter)) * (act_bytes + 1)
    else:
        weight_bytes = params * act_bytes
    return reached * weight_bytes + 2 * ids.shape[0] * shape.hidden * act_bytes, 2 * pairs * params


def time_ms(fn, device) -> float | None:
    if device.type != "cuda":
        return None  # the interpreter's time means nothing
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_time_ms(fn, device) -> tuple[float | None, str | None]:
    """Median time of CUDA-graph replays (no launch gaps), and the proof that the path captures: a host sync or
    data-dependent Python breaks the capture (the reference backend does, by design). (None, error) then."""
    if device.type != "cuda":
        return None, None
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")), None
    except Exception as exc:  # noqa: BLE001 - any capture failure is a result to record
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def measure_peaks(device) -> dict:
    """The device's own ceilings: the copy bandwidth moekern's bytes floor uses (moekern.bench.bandwidth: a 1 GiB
    device-to-device copy, read + written, best of 5) and the rate of a 8192 x 8192 x 8192 bf16 matmul (cuBLAS)."""
    import triton.testing

    from moekern.bench.bandwidth import copy_bandwidth

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=200, return_mode="median")
    return dict(copy_gbps=copy_bandwidth(device) / 1e9, bf16_tflops=2 * 8192**3 / ms / 1e9,
                device=torch.cuda.get_device_name(), torch=torch.__version__, commit=_commit(),
                when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def run_case(shape: Shape, case: Case, device, dtype, check: bool, graphs: bool = False):
    x, ids, weights, w1, w2 = make_inputs(shape, case, device, dtype)
    fn = runner(case.backend, x, ids, weights, w1, w2)
    row = {**asdict(case), "experts_alive": w1.shape[0], "hidden": shape.hidden, "inter": shape.inter,
           "top_k": shape.top_k, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    if check:
        got = fn().float()
        d1, d2 = w1, w2
        if case.backend == "triton4":
            from moekern.formats import layout

            q1, q2 = quantized(w1, w2)
            d1, d2 = (layout.dequantize(q.qweight, q.scales, q.zeros) for q in (q1, q2))
        ref = R.moe_experts(x.float(), ids, weights.float(), d1.float(), d2.float())
        row["rel_err"] = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    moved, flops = must_move(shape, ids, w1, case.backend, x.element_size())
    t = time_ms(fn, device)
    if graphs:
        row["time_graph_ms"], row["graph_error"] = graph_time_ms(fn, device)
    floor = max(moved / PEAK_GBPS / 1e6, flops / PEAK_TFLOPS / 1e9)  # ms: no version runs much faster
    row.update(bytes=moved, flops=flops, floor_ms=floor, time_ms=t, timed=t is not None,
               gbps=None if t is None else moved / t / 1e6, tflops=None if t is None else flops / t / 1e9,
               of_floor=None if t is None else floor / t)
    return row


def cases(models, tokens, dropped, skipped, backends):
    for m in models:
        for t in tokens:
            for d in dropped:
                for s in skipped:
                    for b in backends:
                        yield Case(m, t, d, s, b)


def main(argv=None):
    global PEAK_GBPS, PEAK_TFLOPS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--dropped", nargs="+", type=float, default=list(DROPPED))
    p.add_argument("--skipped", nargs="+", type=float, default=list(SKIPPED))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS))
    p.add_argument("--check", action="store_true", help="also compare each backend with the fp32 reference")
    p.add_argument("--graphs", action="store_true", help="also time CUDA-graph replays (and record capture errors)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/moe_gemm_<device>.json)")
    p.add_argument("--peak-gbps", type=float, default=PEAK_GBPS, help="measured memory bandwidth, GB/s")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="measured bf16 matmul rate, TFLOP/s")
    p.add_argument("--measure-peaks", action="store_true",
                   help="measure the copy bandwidth and bf16 matmul rate of this GPU, print them (and --out JSON)")
    args = p.parse_args(argv)
    if args.measure_peaks:
        if not torch.cuda.is_available():
            p.error("--measure-peaks needs a GPU")
        peaks = measure_peaks(torch.device("cuda"))
        print(json.dumps(peaks))
        if args.out:
            args.out.write_text(json.dumps(peaks, indent=1) + "\n")
        return peaks
    PEAK_GBPS, PEAK_TFLOPS = args.peak_gbps, args.peak_tflops
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = MODELS
    if args.smoke or device.type != "cuda":
        shapes, args.models, args.tokens, args.check = SMOKE, ["smoke"], [t for t in args.tokens if t <= 16], True
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": _commit(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timed": device.type == "cuda", "peak_gbps": PEAK_GBPS, "peak_tflops": PEAK_TFLOPS,
            "peaks_measured": (args.peak_gbps, args.peak_tflops) != (DATASHEET_GBPS, DATASHEET_TFLOPS)}
    out = args.out
    if out is None and device.type == "cuda":
        out = RESULTS / "moe_gemm_cuda.json"
    rows = []
    for case in cases(args.models, args.tokens, args.dropped, args.skipped, args.backends):
        row = run_case(shapes[case.model], case, device, dtype, args.check, args.graphs)
        rows.append(row)
        t = "-" if row["time_ms"] is None else (f"{row['time_ms']:.4f} ms {row['gbps']:.0f} GB/s "
                                                f"{row['tflops']:.1f} TF {100 * row['of_floor']:.0f}% of floor")
        err = f" err={row['rel_err']:.1e}" if "rel_err" in row else ""
        if row.get("time_graph_ms") is not None:
            err += f" graph={row['time_graph_ms']:.4f} ms"
        elif row.get("graph_error"):
            err += " graph: no capture"
        print(f"{case.model:18s} T={case.tokens:5d} drop={case.dropped:.2f} skip={case.skipped:.1f} "
              f"{case.backend:10s} {t}{err}", flush=True)
        if out is not None:  # after every case, so a run cut short keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if out is not None:  # a CPU smoke run writes only where asked: it has no figures to record
        print(f"wrote {out}")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_moe_gemm.py --benchmark-enable` (smoke cases on a CPU; every case on a
# GPU with MOEKERN_BENCH_FULL=1, else decode and a mid-size prefill of each model)
# ----------------------------------------------------------------------------------------------------------------------
def _pytest_cases():
    if not torch.cuda.is_available():
        return list(cases(["smoke"], [1, 16], [0.0, 0.5], [0.0, 0.5], BACKENDS))
    if os.environ.get("MOEKERN_BENCH_FULL") == "1":
        return list(cases(DEFAULT_MODELS, TOKENS, DROPPED, SKIPPED, BACKENDS))
    return list(cases(DEFAULT_MODELS, [1, 256], [0.0, 0.5], [0.0], BACKENDS))


try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("case", _pytest_cases(), ids=lambda c: f"{c.model}-T{c.tokens}-d{c.dropped}-s{c.skipped}"
                             f"-{c.backend}")
    def test_moe_gemm(benchmark, case):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shape = (MODELS | SMOKE)[case.model]
        x, ids, weights, w1, w2 = make_inputs(shape, case, device, dtype)
        fn = runner(case.backend, x, ids, weights, w1, w2)
        moved, flops = must_move(shape, ids, w1, case.backend, x.element_size())
        benchmark.extra_info.update(bytes=moved, flops=flops, timed=device.type == "cuda")
        if device.type != "cuda":  # the interpreter: run once to prove it works, the time is not a figure
            benchmark.pedantic(fn, rounds=1, iterations=1)
            return

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark(synced)


if __name__ == "__main__":
    main()
