"""moekern's defaults against the papers' own definitions on the shipped model: held-out perplexity and the KL
divergence of the next-token distribution from the uncompressed model's, per recipe.

    PYTHONPATH=. python benchmarks/paper_variants_table.py [--out benchmarks/results/paper_variants.json]
        [--only awq4,awq4:autoawq] [--resume] [--render benchmarks/results/paper_variants.json]

Slimming: moekern's AWQ (per expert, routing-weighted) and AutoAWQ's MoE scheme (awq4:autoawq); moekern's GPTQ
(routing-weighted Hessian, asymmetric grid) with act-order (:act), AutoGPTQ's symmetric grid (:sym), both, and
AutoGPTQ's defaults as He et al. ran them (:autogptq: act-order, symmetric, unweighted Hessian); RTN as the floor.
Trimming: Expert Drop with moekern's per-layer floor of top_k against Eq. 11 without it (:nofloor) and the authors'
DeepSeek score (:topk); enumeration pruning on a 4096-token sample against every token with Lu et al.'s loss (:all).

Every row is compressed from a fresh copy of the model with the same calibration as benchmarks/slimming_table.py
(32 evenly spaced windows of 256 tokens of the shipped training text; the papers' C4, Pile and Alpaca are not on this
machine) and scored on the whole held-out text: perplexity, KL(baseline || compressed) in nats per token, and the
paired standard error of the perplexity change. Prints a markdown table; the JSON is written again after every row,
and --resume keeps the rows an interrupted run of the same command already wrote.
"""

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from slimming_table import calibration_ids, evaluate  # noqa: E402 - the same calibration and scoring

from moekern.compression.recipe import compress  # noqa: E402
from moekern.perplexity import token_windows  # noqa: E402
from moekern.shipped import heldout_text, load_model  # noqa: E402

RECIPES = {
    "slimming": ["rtn4", "awq4", "awq4:autoawq", "gptq4", "gptq4:act", "gptq4:sym", "gptq4:act:sym",
                 "gptq4:autogptq"],
    "trimming": ["expert-drop=2", "expert-drop=2:topk", "expert-drop=4", "expert-drop=4:nofloor", "enum-prune=6",
                 "enum-prune=6:all"],
}
WHAT = {
    "rtn4": "RTN, group 128 (no calibration)",
    "awq4": "AWQ, moekern: a scale per expert, routing-weighted, RTN kept where better",
    "awq4:autoawq": "AWQ as the paper ran it: AutoAWQ's one scale for all experts, folded into the norm",
    "gptq4": "GPTQ, moekern: routing-weighted Hessian, asymmetric grid",
    "gptq4:act": "+ act-order (static groups)",
    "gptq4:sym": "+ AutoGPTQ's symmetric grid",
    "gptq4:act:sym": "+ act-order and symmetric",
    "gptq4:autogptq": "GPTQ as the paper ran it: AutoGPTQ's act-order, symmetric, unweighted Hessian",
    "expert-drop=2": "Expert Drop 2/8 global, each layer keeps >= top_k",
    "expert-drop=2:nofloor": "Expert Drop 2/8 global, Eq. 11 exactly (no floor)",
    "expert-drop=2:topk": "Expert Drop 2/8 global, scored by the mean top-k weight (the authors' DeepSeek score)",
    "expert-drop=4": "Expert Drop 4/8 global, each layer keeps >= top_k",
    "expert-drop=4:nofloor": "Expert Drop 4/8 global, Eq. 11 exactly (no floor)",
    "enum-prune=6": "keep 6/8 by enumeration, 4096 sampled tokens per layer",
    "enum-prune=6:all": "keep 6/8 by enumeration, every token, Lu et al.'s loss",
    "enum-prune=4": "keep 4/8 by enumeration, 4096 sampled tokens per layer",
    "enum-prune=4:all": "keep 4/8 by enumeration, every token, Lu et al.'s loss",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "paper_variants.json")
    parser.add_argument("--only", default=None, help="comma-separated recipes (default: all)")
    parser.add_argument("--render", type=Path, default=None, help="only print the table of an earlier JSON")
    parser.add_argument("--resume", action="store_true", help="keep the rows --out already holds")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())["rows"]))
        return
    wanted = args.only.split(",") if args.only else [r for group in RECIPES.values() for r in group]
    started_all = time.time()
    torch.manual_seed(0)
    model, tokenizer = load_model(torch.float32)
    heldout = token_windows(tokenizer, heldout_text(), 256)
    args.heldout_tokens = int(heldout.numel())
    calibration = calibration_ids(tokenizer)
    baseline = evaluate(model, heldout)
    base_ppl = math.exp(sum(baseline["window_nll"]) / len(baseline["window_nll"]))
    rows = [{"recipe": "none", "group": "-", "what": "fp32, no compression", "perplexity": round(base_ppl, 3),
             "kl_to_baseline": 0.0, "delta_nll_se": 0.0, "compress_seconds": 0.0}]
    if args.resume and args.out.exists():
        rows += [r for r in json.loads(args.out.read_text())["rows"] if r["recipe"] != "none"]
    print(json.dumps(rows[0]), flush=True)
    done = {r["recipe"] for r in rows}
    for recipe in [r for r in wanted if r not in done]:
        group = next(g for g, rs in RECIPES.items() if recipe in rs)
        fresh, _ = load_model(torch.float32)
        started = time.time()
        result = compress(fresh, recipe, calibration, inplace=True, return_result=True)
        seconds = time.time() - started
        scored = evaluate(result.model, heldout, baseline["logprobs"])
        nll = torch.tensor(scored["window_nll"], dtype=torch.float64)
        diff = nll - torch.tensor(baseline["window_nll"], dtype=torch.float64)
        row = {"recipe": recipe, "group": group, "what": WHAT[recipe], "perplexity": round(math.exp(nll.mean()), 3),
               "kl_to_baseline": scored["kl"], "delta_nll_se": float(diff.std() / math.sqrt(diff.numel())),
               "compress_seconds": round(seconds, 1), "decisions": _decisions(result)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "decisions"}), flush=True)
        write(args, rows, started_all)
    write(args, rows, started_all)
    print(markdown(rows))


def write(args, rows: list[dict], started_all: float) -> None:
    order = {r: i for i, r in enumerate(["none", *[r for group in RECIPES.values() for r in group]])}
    rows = sorted(rows, key=lambda r: order.get(r["recipe"], len(order)))
    result = {
        "command": "PYTHONPATH=. python benchmarks/paper_variants_table.py" + (f" --only {args.only}" if args.only else ""),
        "model": "moekern shipped (Mixtral-style, 8 layers x 8 experts, top-2)",
        "calibration": "32 x 256 tokens of train_text(), evenly spaced windows (benchmarks/slimming_table.py)",
        "heldout_tokens": args.heldout_tokens, "rows": rows, "seconds": round(time.time() - started_all, 1),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}",
                        "commit": _commit()},
        "note": "CPU shared with other programs while measured: the seconds are noisy; perplexity and KL are not",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def _decisions(result) -> dict:
    from moekern import surgery

    d = surgery.decisions(result.model)
    return {k: d.get(k) for k in ("quant", "kept_experts", "dropped_moe_layers")}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | what | held-out ppl | vs baseline (+- 1 s.e.) | KL to baseline (1e-4 nats) |",
             "|---|---|---:|---:|---:|"]
    base = rows[0]["perplexity"]
    for r in rows:
        delta = "" if r["recipe"] == "none" else f"{r['perplexity'] / base - 1:+.2%} +- {r['delta_nll_se']:.2%}"
        kl = "" if r["recipe"] == "none" else f"{r['kl_to_baseline'] * 1e4:.1f}"
        lines.append(f"| `{r['recipe']}` | {r['what']} | {r['perplexity']:.2f} | {delta} | {kl} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
