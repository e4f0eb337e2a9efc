"""moekern's 4-bit decode next to llama.cpp's, on the same random-weight Mixtral-shaped folder, the same threads and
context, on the same machine: the CPU peer that runs at the memory floor.

    python benchmarks/cpu_side_by_side.py                 # writes /tmp/mixtral-1l if missing, ~15 minutes
    python benchmarks/cpu_side_by_side.py --recipes rtn4 rtn4:attn+skip --threads 2 --context 128 --rounds 10

Runs ../shared/tools/llamacpp-peer FOLDER THREADS CONTEXT (llama.cpp Q4_0, BF16 and F32 through llama-cpp-python;
PEER env var: another path to that tool), then `python -m moekern.cli bench FOLDER --recipe R --context C
--batch-sizes 1 --device cpu` for each recipe (rtn4; rtn4+skip: per-token skip, the compression llama.cpp has no
counterpart for), and writes benchmarks/results/cpu/side_by_side.json with both sides' figures and the commands.

Those runs follow one another, minutes apart, and this machine's speed drifts by tens of percent over minutes (other
tenants share its memory): the verdict comes from the interleaved part. llama.cpp (the peer's Q4_0 file, in the
peer's environment) and one moekern process per recipe each hold their model after a prefill of --context tokens
and take turns decoding --steps tokens, for --rounds rounds; each round's ratio compares turns a few seconds apart.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu"
PEER = Path(os.environ.get("PEER", ROOT.parent / "shared" / "tools" / "llamacpp-peer"))  # ../shared beside the checkout
PEER_HOME = Path(os.environ.get("PEER_HOME", Path.home() / ".cache" / "moekern-peer"))
LINE = re.compile(r"llama\.cpp (\S+)\s+prefill (\d+) tokens\s+([\d.]+) tok/s\s+decode\s+([\d.]+) ms/step")


def run(command: list[str], env=None) -> str:
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(done.stdout, flush=True)
    return done.stdout


# What one llama.cpp decode step must read, from the GGUF file the peer timed (read with llama.cpp's own gguf-py in
# the peer's environment): every tensor, but of the expert tensors the top_k / E share a token selects and of the
# token embedding one row; the same accounting as moekern's bytes floor.
GGUF_BYTES = """
import json, sys
sys.path[:0] = [sys.argv[1]]
import gguf
reader = gguf.GGUFReader(sys.argv[2])
top_k, total = int(sys.argv[3]), 0
for t in reader.tensors:
    shape = [int(d) for d in t.shape]
    if "_exps." in t.name:
        total += t.n_bytes * top_k // shape[-1]
    elif t.name == "token_embd.weight":
        total += t.n_bytes // shape[-1]
    else:
        total += t.n_bytes
print(json.dumps({"step_bytes": total}))
"""


def llamacpp_build() -> str | None:
    """llama.cpp's own line of the CPU features it was built for (llama_print_system_info), from the peer's
    environment: which kernels the peer ran (an AMX build, say, or one without AVX-512)."""
    python = PEER_HOME / "venv" / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def machine_facts() -> dict:
    """The CPU, moekern's kernel variant, versions and commit, for the record."""
    import platform

    import torch
    import transformers

    from moekern.ops import cpu
    from moekern.runs import cpu_model, source_commit

    facts = {"cpu": cpu_model(), "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "commit": source_commit(), "llama.cpp_build": llamacpp_build()}
    if cpu.available():
        facts.update(cpu_flags=cpu.cpu_flags(), isa_variant=cpu.isa_name(), inner=cpu.INNER_DEFAULT)
    return facts


def llamacpp_step_bytes(folder: Path, kind: str = "q4_0") -> int | None:
    """Bytes a one-token llama.cpp decode step reads from the GGUF the peer wrote for `folder`, or None if absent."""
    gguf_file = PEER_HOME / "gguf" / f"{folder.name}-{kind}.gguf"
    sources = list(PEER_HOME.glob("llama_cpp_python-*/vendor/llama.cpp/gguf-py"))
    python = PEER_HOME / "venv" / "bin" / "python"
    if not (gguf_file.exists() and sources and python.exists()):
        return None
    top_k = json.loads((folder / "config.json").read_text()).get("num_experts_per_tok", 2)
    done = subprocess.run([str(python), "-c", GGUF_BYTES, str(sources[0]), str(gguf_file), str(top_k)],
                          capture_output=True, text=True)
    return json.loads(done.stdout)["step_bytes"] if done.returncode == 0 else None


LLAMA_WORKER = """
import json, sys, time, llama_cpp
path, threads, context, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=context + total + 64, n_threads=threads, n_threads_batch=threads,
                      n_batch=context, verbose=False)
llm.eval([10 + i % 200 for i in range(context)])
for i in range(4):
    llm.eval([100 + i])
print("ready", flush=True)
i = 0
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t = time.perf_counter(); llm.eval([100 + i % 200]); times.append(time.perf_counter() - t); i += 1
    print(json.dumps(times), flush=True)
"""


def moekern_worker(folder: str, recipe: str, dtype: str, context: int) -> None:
    """One side of the interleaved comparison: the folder compressed by `recipe` under moekern, prefilled with
    `context` random tokens; then for each number N read from stdin, N greedy decode steps, their seconds printed."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekern.bench.variants import make_variant

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    model = make_variant(model, AutoTokenizer.from_pretrained(folder), recipe)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        print("ready", flush=True)
        for line in sys.stdin:
            times = []
            for _ in range(int(line)):
                started = time.perf_counter()
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - started)
            print(json.dumps(times), flush=True)


def interleaved(args, env) -> dict | None:
    """llama.cpp Q4_0 and moekern's recipes taking turns (see the module doc); None where the peer's file is absent."""
    import statistics

    gguf_file = PEER_HOME / "gguf" / f"{args.folder.name}-q4_0.gguf"
    python = PEER_HOME / "venv" / "bin" / "python"
    if not (gguf_file.exists() and python.exists()):
        return None
    total = (args.rounds + 1) * args.steps
    sides = {"llama.cpp q4_0": [str(python), "-c", LLAMA_WORKER, str(gguf_file), str(args.threads),
                                str(args.context), str(total)]}
    for recipe in args.recipes:
        sides[f"moekern {recipe} ({args.interleave_dtype})"] = [
            sys.executable, str(Path(__file__).resolve()), "--worker", str(args.folder), recipe,
            args.interleave_dtype, str(args.context)]
    workers = {}
    try:
        for name, command in sides.items():  # one at a time: a compression's peak memory is transient
            print(f"$ {' '.join(command[:2] if 'llama' in name else command)} ...", flush=True)
            workers[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True)
            line = workers[name].stdout.readline()
            if line.strip() != "ready":
                sys.exit(f"{name} did not start (exit {workers[name].wait()})")
        times = {name: [] for name in workers}
        names = list(workers)
        for r in range(args.rounds + 1):  # round 0 warms every side up again after the others loaded; not kept
            for name in names[r % len(names):] + names[:r % len(names)]:  # who goes first rotates
                workers[name].stdin.write(f"{args.steps}\n")
                workers[name].stdin.flush()
                turn = json.loads(workers[name].stdout.readline())
                if r:
                    times[name].append(turn)
    finally:
        for worker in workers.values():
            worker.kill()
    llama = "llama.cpp q4_0"
    result = {"rounds": args.rounds, "steps_per_turn": args.steps, "sides": {}}
    for name, turns in times.items():
        flat = [t for turn in turns for t in turn]
        side = {"decode_step_median_ms": statistics.median(flat) * 1e3, "turn_medians_ms":
                [statistics.median(turn) * 1e3 for turn in turns]}
        if name != llama:
            side["vs_llama.cpp_per_round"] = [statistics.median(a) / statistics.median(b)
                                              for a, b in zip(turns, times[llama], strict=True)]
            side["vs_llama.cpp_median"] = statistics.median(side["vs_llama.cpp_per_round"])
        result["sides"][name] = side
        print(f"interleaved {name:<36} decode {side['decode_step_median_ms']:7.2f} ms/step"
              + (f", {side['vs_llama.cpp_median']:.2f}x llama.cpp Q4_0 (median of the rounds' ratios)"
                 if name != llama else ""), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mixtral-1l"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--recipes", nargs="+", default=["rtn4", "rtn4+skip", "rtn4:attn", "rtn4:attn+skip"])
    # llama.cpp's Q4_0 also quantizes attention and the output matrix; moekern's recipes quantize the routed experts
    # and keep the rest in the model's dtype: bfloat16 halves those bytes (the closer comparison)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (0: none)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps a side takes per turn")
    parser.add_argument("--interleave-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", nargs=4, metavar=("FOLDER", "RECIPE", "DTYPE", "CONTEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side.json")
    args = parser.parse_args(argv)
    if args.worker:
        folder, recipe, dtype, context = args.worker
        moekern_worker(folder, recipe, dtype, int(context))
        return 0
    if not (args.folder / "config.json").exists():
        run([sys.executable, "benchmarks/peer_model.py", str(args.folder)])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    given = argv if argv is not None else sys.argv[1:]
    record = {"command": "python benchmarks/cpu_side_by_side.py " + " ".join(given),
              "folder": str(args.folder), "threads": args.threads, "context": args.context, **machine_facts(),
              "llama.cpp": {}, "moekern": {}}
    peer_command = [str(PEER), str(args.folder), str(args.threads), str(args.context)]
    for kind, context, tok_s, step_ms in LINE.findall(run(peer_command, env)):
        record["llama.cpp"][kind] = {"prefill_tok_s": float(tok_s), "decode_step_ms": float(step_ms)}
    record["llama.cpp_command"] = " ".join(peer_command)
    step_bytes = llamacpp_step_bytes(args.folder)
    if step_bytes and "q4_0" in record["llama.cpp"]:
        record["llama.cpp"]["q4_0"]["step_bytes"] = step_bytes
    for recipe in args.recipes:
        for dtype in args.dtypes:
            out = Path(tempfile.mkdtemp()) / "bench"
            command = [sys.executable, "-m", "moekern.cli", "bench", str(args.folder), "--recipe", recipe,
                       "--context", str(args.context), "--batch-sizes", "1", "--decode-tokens",
                       str(args.decode_tokens), "--device", "cpu", "--dtype", dtype, "--out", str(out)]
            run(command, env)
            speeds = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
            speeds = [s for s in speeds if s.get("kind") == "speed" and s.get("status") == "ok"]
            record["moekern"][f"{recipe} ({dtype})"] = {"command": " ".join(command[1:]), "speeds": speeds}
            shutil.rmtree(out.parent)
    q4 = record["llama.cpp"].get("q4_0", {}).get("decode_step_ms")
    copy = [s["floor_bytes"] / s["floor_step_s"] for r in record["moekern"].values() for s in r["speeds"]
            if s.get("floor_step_s")]
    if q4 and step_bytes and copy:
        # llama.cpp's own distance from the bytes floor, at the copy bandwidth moekern's runs measured (their median)
        floor_ms = step_bytes / sorted(copy)[len(copy) // 2] * 1e3
        record["llama.cpp"]["q4_0"]["x_floor"] = q4 / floor_ms
        print(f"llama.cpp Q4_0 reads {step_bytes / 1e6:.1f} MB a step: floor {floor_ms:.2f} ms, "
              f"x floor {q4 / floor_ms:.2f}")
    for recipe, result in record["moekern"].items():
        for s in result["speeds"]:
            ms = s["decode_step_median_s"] * 1e3
            ratio = f", {ms / q4:.2f}x llama.cpp Q4_0's {q4:.2f} ms" if q4 else ""
            print(f"{recipe:<22} {s['variant']:<24} decode {ms:8.2f} ms/step{ratio}")
    if args.rounds:
        record["interleaved"] = interleaved(args, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
