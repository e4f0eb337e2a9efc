"""Expert Slimming on the shipped model: held-out perplexity after 4-bit quantization (RTN, AWQ, GPTQ) and after
pruning (Wanda, SparseGPT; 50% unstructured and 2:4) of the experts.

    PYTHONPATH=. python benchmarks/slimming_table.py [--out benchmarks/results/slimming_table.json]
        [--only rtn-g128,awq-g128] [--render benchmarks/results/slimming_table.json]

Calibration: 32 windows of 256 tokens from the shipped training text (evenly spaced over it, so the choice is
deterministic); evaluation: moekern.eval.perplexity on the whole held-out text (fp32, windows of 256). Each method
starts from a fresh copy of the model. Prints a markdown table and writes the figures as JSON.
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from moekern.eval.perplexity import mean_nll, token_windows
from moekern.quant import PruneConfig, QuantConfig, prune_, quantize_
from moekern.shipped import heldout_text, load_model, train_text

CALIBRATION_WINDOWS, SEQ_LEN = 32, 256

RUNS = {
    "baseline": None,
    "rtn-g128": QuantConfig("rtn", group_size=128),
    "awq-g128": QuantConfig("awq", group_size=128),
    "gptq-g128": QuantConfig("gptq", group_size=128),
    "gptq-g128-act-order": QuantConfig("gptq", group_size=128, act_order=True),
    "rtn-g64": QuantConfig("rtn", group_size=64),
    "awq-g64": QuantConfig("awq", group_size=64),
    "gptq-g64": QuantConfig("gptq", group_size=64),
    "wanda-50%": PruneConfig("wanda", sparsity=0.5),
    "sparsegpt-50%": PruneConfig("sparsegpt", sparsity=0.5),
    "wanda-2:4": PruneConfig("wanda", n=2, m=4),
    "sparsegpt-2:4": PruneConfig("sparsegpt", n=2, m=4),
}


def calibration_ids(tokenizer) -> torch.Tensor:
    windows = token_windows(tokenizer, train_text(), SEQ_LEN)
    pick = torch.linspace(0, windows.shape[0] - 1, CALIBRATION_WINDOWS).long()
    return windows[pick]


def describe(config) -> str:
    if config is None:
        return "fp32, no compression"
    if isinstance(config, QuantConfig):
        extra = ", act-order" if config.act_order else ""
        return f"{config.method.upper()} 4-bit, group {config.group_size}{extra} (experts)"
    pattern = f"{config.n}:{config.m}" if config.structured else f"{config.sparsity:.0%} unstructured"
    return f"{config.method} {pattern} (experts)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slimming_table.json")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--render", type=Path, default=None, help="only print the table of an earlier JSON")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())["rows"]))
        return
    names = args.only.split(",") if args.only else list(RUNS)
    torch.manual_seed(0)
    _, tokenizer = load_model(torch.float32)
    heldout = token_windows(tokenizer, heldout_text(), SEQ_LEN)
    calibration = calibration_ids(tokenizer)
    rows = []
    for name in names:
        config = RUNS[name]
        model, _ = load_model(torch.float32)
        started = time.time()
        report = {}
        if isinstance(config, QuantConfig):
            report = quantize_(model, config, calibration)
        elif isinstance(config, PruneConfig):
            report = prune_(model, config, calibration)
        seconds = time.time() - started
        ppl = math.exp(mean_nll(model, heldout))
        row = {
            "name": name, "method": describe(config), "perplexity": round(ppl, 3),
            "compress_seconds": round(seconds, 1),
            "fallback": report.get("fallback_rtn", report.get("fallback_magnitude")),
            "mean_rel_output_error": report.get("mean_rel_output_error"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "model": "moekern shipped (Mixtral-style, 8 layers x 8 experts, top-2)",
        "calibration": f"{CALIBRATION_WINDOWS} x {SEQ_LEN} tokens of train_text(), evenly spaced windows",
        "heldout_tokens": int(heldout.numel()), "seq_len": SEQ_LEN, "rows": rows,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    base = next((r["perplexity"] for r in rows if r["name"] == "baseline"), None)
    lines = ["| run | method | held-out ppl | vs baseline | expert output error | compress s | fallbacks |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = f"{r['perplexity'] / base - 1:+.2%}" if base else ""
        error = "" if r["mean_rel_output_error"] is None else f"{r['mean_rel_output_error']:.4f}"
        fallback = "" if r["fallback"] is None else r["fallback"]
        lines.append(f"| {r['name']} | {r['method']} | {r['perplexity']:.3f} | {delta} | {error} | "
                     f"{r['compress_seconds']} | {fallback} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
