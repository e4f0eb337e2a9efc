"""One MoE layer's routed experts on the CPU: moekern's C++ kernels (4-bit, and dense fp32/bf16) against
transformers' own experts implementations (eager, batched_mm, grouped_mm) in fp32 and bf16, side by side in one
process, at 1, 4 and 16 tokens, on the expert shapes of real models.

    python benchmarks/bench_cpu_moe.py                                  # every model, 1/4/16 tokens
    python benchmarks/bench_cpu_moe.py --models mixtral-8x7b --experts 8 --inner all   # the inner-product figures
    python benchmarks/bench_cpu_moe.py --models olmoe-1b-7b --tokens 1 --repeats 21
    python benchmarks/bench_cpu_moe.py --models in-cache --inner all --threads 1 --clock thread  # compute rates

Per path and token count: median and best time over --repeats calls (the paths take turns, so a neighbour's load
hits them alike), the bytes the call must read (the weights of the distinct experts the routing reaches, read once:
4-bit codes, scales and zeros; dense weights in their dtype), and the GB/s that makes against the machine's read
bandwidth: the kernels' own probe (a 1 GiB buffer read with vector loads on every thread) takes turns with the paths,
and each row's reference is the faster of the probe and the fastest path, in the same minutes. The 4-bit layer is
random codes, scales and zeros in moekern's layout, group --group (speed does not depend on the values); routing is
uniform at random (top-k distinct experts per token, seeded).

Each timed call comes right after an untimed call of the same path on a tiny layer (hidden 256, top-k experts): in a
model's decode loop one layer's MoE follows another's, so its code, the allocator and the threads are warm while its
weights are cold, and so they are here (the probe and the other paths read GBs between two calls of a path). A lone
call after those reads (--no-prelude) also pays for instruction and data misses outside the weights and for waking
the threads: 0.1-0.2 ms a call on the 2-core machine of the README, where a small expert layer takes 0.7-1 ms.

Writes benchmarks/results/cpu/bench_cpu_moe-<models>.json (CPU model, flags, threads, versions, commit, command) after
every model. Times on a shared machine are noisy: compare paths within one run (the ratios), not across runs.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekern.ops import cpu  # noqa: E402
from moekern.ops.reference import Activation  # noqa: E402
from moekern.runs import cpu_model, source_commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu"

# name: (hidden, expert intermediate, routed experts, top_k, source): the routed experts of one MoE layer
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2, "mistralai/Mixtral-8x7B-v0.1"),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "Qwen/Qwen3-30B-A3B"),
    "olmoe-1b-7b": (2048, 1024, 64, 8, "allenai/OLMoE-1B-7B-0924"),
    "deepseek-v2-lite": (2048, 1408, 64, 6, "deepseek-ai/DeepSeek-V2-Lite"),
    # one expert of 6.8 MB in 4 bits: it stays in the caches, so with --threads 1 --clock thread the time is the
    # kernels' compute alone (the inner products compared without the memory or the neighbours' load)
    "in-cache": (4096, 1024, 1, 1, "a 4096 x 1024 expert"),
}
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
TINY = (256, 128)  # hidden and expert intermediate of the preludes' layer (see timed)


PROBE = "read probe"


class ReadBandwidth(float):
    """Bytes per second read by the kernels' probe (vector loads on every thread), best of `repeats`; keeps its
    buffer so that the probe can take turns with the timed paths."""
    buffer: torch.Tensor


def read_bandwidth(megabytes: int = 1024, repeats: int = 7) -> ReadBandwidth:
    buf = torch.ones(megabytes * 2**20, dtype=torch.uint8)
    cpu.read_bytes(buf)
    best = min(_seconds(lambda: cpu.read_bytes(buf)) for _ in range(repeats))
    bandwidth = ReadBandwidth(buf.numel() / best)
    bandwidth.buffer = buf
    return bandwidth


CLOCK = time.perf_counter  # --clock thread: time.thread_time, the calling thread's CPU time (for --threads 1)


def _seconds(fn) -> float:
    started = CLOCK()
    fn()
    return CLOCK() - started


def hf_experts(hidden, inter, experts, top_k, dtype, generator):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    module = MixtralExperts(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.empty(p.shape).normal_(0, 0.02, generator=generator))
    return module.to(dtype)


def random_4bit(experts, n, k, group, generator):
    qweight = torch.randint(-2**31, 2**31 - 1, (experts, k // 8, n), dtype=torch.int32, generator=generator)
    scales = torch.rand(experts, k // group, n, generator=generator) * 0.002
    zeros = torch.randint(0, 16, (experts, k // group, n), dtype=torch.uint8, generator=generator)
    return qweight, scales, zeros


def routing(tokens, experts, top_k, generator):
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    return ids, torch.rand(tokens, top_k, generator=generator)


def timed(paths: dict, repeats: int, preludes: dict | None = None, budget_s: float = 30.0) -> dict:
    """Median and best seconds of each path; the paths take turns (one warm-up call each first), and each timed call
    follows its path's prelude (untimed) where one is given. A path stops being timed once it has taken budget_s (with
    at least 3 samples): transformers' batched_mm is seconds per call here."""
    for fn in paths.values():
        fn()
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            if len(times[name]) < 3 or sum(times[name]) < budget_s:
                if preludes:
                    preludes[name]()
                times[name].append(_seconds(fn))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def layer_paths(x32, ids, weights, gate_up4, down4, dense: dict, inners, group, max_gather_gb, act, say=print) -> dict:
    """name -> (call, weights' kind) of every path on one layer: moekern's 4-bit kernel per inner product, its dense
    kernel and transformers' experts implementations per dtype (those this torch build runs)."""
    tokens, top_k = ids.shape
    paths = {}
    for inner in inners:
        def run4(inner=inner):
            os.environ["MOEKERN_CPU_INNER"] = inner
            cpu.moe_experts_4bit(x32, ids, weights, gate_up4, down4, act=act)
        paths[f"moekern 4-bit g{group} ({inner})"] = (run4, "4-bit")
    for dtype, module in dense.items():
        x = x32.to(module.gate_up_proj.dtype)
        paths[f"moekern {dtype}"] = (lambda x=x, m=module: cpu.moe_experts_dense(
            x, ids, weights, m.gate_up_proj, m.down_proj, act=act), dtype)
        per_expert = sum(p.numel() * p.element_size() for p in module.parameters()) // module.gate_up_proj.shape[0]
        for impl in HF_IMPLEMENTATIONS:
            gathered = tokens * top_k * per_expert
            if impl == "batched_mm" and gathered > max_gather_gb * 1e9:
                say(f"  transformers batched_mm {dtype}: skipped, it would copy {gathered / 1e9:.1f} GB of "
                    f"weights (one expert per token and slot; --max-gather-gb {max_gather_gb})")
                continue

            def run_hf(x=x, m=module, impl=impl):
                m.config._experts_implementation = impl
                m(x, ids, weights)
            try:
                run_hf()
            except Exception as exc:  # an implementation this torch build lacks on the CPU
                say(f"  transformers {impl} {dtype}: unavailable ({type(exc).__name__}: {exc})")
                continue
            paths[f"transformers {impl} {dtype}"] = (run_hf, dtype)
    return paths


@torch.no_grad()
def bench_model(name, args, bandwidth) -> list[dict]:
    hidden, inter, experts, top_k, _ = MODELS[name]
    experts = min(experts, args.experts or experts)
    top_k = min(top_k, experts)
    gen = torch.Generator().manual_seed(0)
    act = Activation("silu")
    rows = []
    # 4-bit: random codes in moekern's layout, fp32 scales (an fp32 model's), as QuantizedExperts holds them
    gate_up4 = random_4bit(experts, 2 * inter, hidden, args.group, gen)
    down4 = random_4bit(experts, hidden, inter, args.group, gen)
    per_expert = {"4-bit": sum(t.numel() * t.element_size() for t in (*gate_up4, *down4)) // experts}
    dense = {}
    for dtype in args.dtypes:
        module = hf_experts(hidden, inter, experts, top_k, getattr(torch, dtype), gen)
        dense[dtype] = module
        per_expert[dtype] = sum(p.numel() * p.element_size() for p in module.parameters()) // experts
    inners = cpu.INNERS if args.inner == "all" else (args.inner,)
    if "bf16" in inners and "avx512bf16" not in cpu.cpu_flags().split():
        inners = tuple(i for i in inners if i != "bf16")
    # The preludes' layer: top_k experts of hidden 256, every one of them routed
    tiny_gen = torch.Generator().manual_seed(1)
    tiny_gate_up4 = random_4bit(top_k, 2 * TINY[1], TINY[0], args.group, tiny_gen)
    tiny_down4 = random_4bit(top_k, TINY[0], TINY[1], args.group, tiny_gen)
    tiny_dense = {dtype: hf_experts(*TINY, top_k, top_k, getattr(torch, dtype), tiny_gen) for dtype in args.dtypes}
    tiny_probe = torch.ones(1 << 16, dtype=torch.uint8)
    for tokens in args.tokens:
        ids, weights = routing(tokens, experts, top_k, gen)
        distinct = ids.unique().numel()
        x32 = torch.randn(tokens, hidden, generator=gen)
        paths = layer_paths(x32, ids, weights, gate_up4, down4, dense, inners, args.group, args.max_gather_gb, act)
        kind = {name: k for name, (_, k) in paths.items()}
        tiny_ids = torch.arange(top_k).repeat(tokens, 1)
        tiny_x = torch.randn(tokens, TINY[0], generator=tiny_gen)
        tiny = layer_paths(tiny_x, tiny_ids, weights, tiny_gate_up4, tiny_down4, tiny_dense, inners, args.group,
                           args.max_gather_gb, act, say=lambda _: None)
        preludes = {name: tiny[name][0] for name in paths} if args.prelude else None
        paths = {name: fn for name, (fn, _) in paths.items()}
        # The probe takes turns with the paths: a shared machine's bandwidth drifts over minutes, so each row is
        # judged against the read rate of the same minutes, and against the fastest path when that read faster
        # (the conservative reference: a fraction of what this machine was seen to deliver, never of a low probe).
        paths[PROBE] = lambda: cpu.read_bytes(bandwidth.buffer)
        if preludes:
            preludes[PROBE] = lambda: cpu.read_bytes(tiny_probe)
        results = timed(paths, args.repeats, preludes)
        os.environ.pop("MOEKERN_CPU_INNER", None)
        probe_median = results.pop(PROBE)[0]
        seen = max(bandwidth.buffer.numel() / probe_median,
                   max(distinct * per_expert[kind[path]] / median for path, (median, _) in results.items()))
        print(f"{name}: {tokens} token(s), {distinct} of {experts} experts reached, read bandwidth "
              f"{seen / 1e9:.1f} GB/s (probe {bandwidth.buffer.numel() / probe_median / 1e9:.1f}, "
              f"the faster of the probe and the fastest path)")
        for path, (median, best) in results.items():
            must_read = distinct * per_expert[kind[path]]
            row = {"model": name, "tokens": tokens, "experts": experts, "top_k": top_k, "hidden": hidden,
                   "intermediate": inter, "experts_reached": distinct, "path": path, "weights": kind[path],
                   "median_s": median, "best_s": best, "bytes_must_read": must_read,
                   "gb_s_median": must_read / median / 1e9,
                   "read_bandwidth_bytes_s": seen, "probe_bytes_s": bandwidth.buffer.numel() / probe_median,
                   "fraction_of_read_bandwidth": must_read / median / seen}
            rows.append(row)
            print(f"  {path:<36} {median * 1e3:9.2f} ms (best {best * 1e3:8.2f})  {must_read / 1e6:9.1f} MB  "
                  f"{row['gb_s_median']:6.1f} GB/s  {100 * row['fraction_of_read_bandwidth']:5.1f}% of read bw")
        _ratios(rows, name, tokens, args.group)
    return rows


def _ratios(rows, name, tokens, group):
    mine = [r for r in rows if r["model"] == name and r["tokens"] == tokens]
    four = [r for r in mine if r["path"] == f"moekern 4-bit g{group} ({cpu.INNER_DEFAULT})"]
    if not four:
        return
    t4 = four[0]["median_s"]
    for dtype in ("float32", "bfloat16"):
        hf = [r["median_s"] for r in mine if r["path"].startswith("transformers") and r["weights"] == dtype]
        ours = [r["median_s"] for r in mine if r["path"] == f"moekern {dtype}"]
        if hf:
            print(f"  4-bit ({cpu.INNER_DEFAULT}) vs transformers' fastest {dtype}: {min(hf) / t4:.2f}x faster"
                  + (f"; moekern {dtype} vs it: {min(hf) / ours[0]:.2f}x" if ours else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "in-cache"], choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--experts", type=int, default=None,
                        help="keep at most N experts (to fit memory: fp32 Mixtral-8x7B experts are 5.6 GB)")
    parser.add_argument("--group", type=int, default=128, help="4-bit group size (default: 128)")
    parser.add_argument("--inner", default=cpu.INNER_DEFAULT, choices=[*cpu.INNERS, "all"],
                        help=f"the 4-bit inner product(s) (default: {cpu.INNER_DEFAULT}; all: the three side by side)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--max-gather-gb", type=float, default=3.0,
                        help="skip transformers' batched_mm where it would copy more weights than this (default: 3)")
    parser.add_argument("--no-prelude", dest="prelude", action="store_false",
                        help="time lone calls: no call of the path on a tiny layer before each timed one, so the "
                        "timed call also pays for code, allocator and threads that the paths between evicted or idled")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall time, or the calling thread's CPU time (meaningful with --threads 1: the time the "
                        "kernel ran, whatever else the machine runs)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/cpu/...)")
    args = parser.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        CLOCK = time.thread_time
    if not cpu.available():
        print(f"the CPU kernels are not available: {cpu.unavailable_reason()}")
        return 2
    import transformers

    bandwidth = read_bandwidth()
    clock = "-thread-clock" if args.clock == "thread" else ""
    out = args.out or RESULTS / f"bench_cpu_moe-{'+'.join(args.models)}{clock}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/bench_cpu_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "cpu_flags": cpu.cpu_flags(), "threads": torch.get_num_threads(),
        "isa_variant": cpu.isa_name(), "inner_default": cpu.INNER_DEFAULT, "group": args.group, "clock": args.clock,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "commit": source_commit(), "read_bandwidth_bytes_s": bandwidth,
        "prelude": args.prelude,
        "note": "median and best of --repeats calls, paths taking turns, each timed call after an untimed one of its "
                "path on a tiny layer (unless prelude is false); a shared machine: compare within one run",
        "rows": [],
    }
    print(f"{record['cpu']} ({record['cpu_flags']}), {record['threads']} threads, variant {record['isa_variant']}, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name in args.models:
        record["rows"] += bench_model(name, args, bandwidth)
        out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
