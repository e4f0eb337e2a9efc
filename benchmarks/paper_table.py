"""The paper's comparison (He et al., Tables 3 and 6; Figs. 3, 5, 6) on the shipped model: Expert Drop, Layer Drop,
Block Drop, 4-bit quantization and a combination, each scored by held-out perplexity and size.

    python benchmarks/paper_table.py [--samples 32] [--seq-len 256] [--out benchmarks/results/paper_table.json]

Every row starts from a fresh copy of the shipped model and runs `moekern.compress` with the row's recipe on the
same calibration blocks (from the shipped training corpus); perplexity is on all of the shipped held-out text
(windows of 256 tokens, moekern.eval.perplexity). Writes the JSON and a PNG (perplexity against parameters) beside
it, and prints the markdown table.
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import moekern
from moekern import surgery
from moekern.compress.calibration import calibration_blocks
from moekern.compress.report import model_size
from moekern.errors import MoekernError
from moekern.eval.perplexity import mean_nll, token_windows
from moekern.shipped import heldout_text, load_model

ROWS = [
    ("Baseline", None),
    ("Expert Drop, 2/8 per layer (global)", "expert-drop=2"),
    ("Layer Drop, 2/8", "layer-drop=2"),
    ("Layer Drop, 4/8", "layer-drop=4"),
    ("Block Drop, 2/8", "block-drop=2"),
    ("Block Drop, 4/8", "block-drop=4"),
    ("Enumeration pruning, keep 6/8 (Lu et al.)", "enum-prune=6"),
    ("Dynamic skip, median beta (Lu et al.)", "skip"),
    ("4-bit RTN (g128)", "rtn4"),
    ("4-bit RTN + Layer Drop 2/8 (S+T)", "rtn4+layer-drop=2"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "paper_table.json")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)

    base, tokenizer = load_model(torch.float32)
    calibration = calibration_blocks(tokenizer, None, args.samples, args.seq_len, args.seed)
    windows = token_windows(tokenizer, heldout_text(), seq_len=256)
    baseline_size = model_size(base)
    rows = []
    for label, recipe in ROWS:
        t0 = time.time()
        row = {"method": label, "recipe": recipe}
        model, _ = load_model(torch.float32)
        try:
            if recipe is not None:
                model = moekern.compress(model, recipe, calibration=calibration, inplace=True)
        except MoekernError as exc:  # e.g. moekern.quant missing in this build
            row.update(available=False, error=str(exc))
            rows.append(row)
            print(f"{label}: not available ({exc})", flush=True)
            continue
        size = model_size(model)
        d = surgery.decisions(model) if recipe else {}
        row.update(
            available=True,
            perplexity=math.exp(mean_nll(model, windows)),
            parameters=size["parameters"],
            removed_parameters=baseline_size["parameters"] - size["parameters"],
            state_bytes=size["state_bytes"],
            dropped_moe_layers=d.get("dropped_moe_layers"),
            dropped_blocks=d.get("dropped_blocks"),
            kept_experts=d.get("kept_experts"),
            skip_beta=d.get("skip_beta"),
            seconds=round(time.time() - t0, 1),
        )
        rows.append(row)
        print(f"{label}: ppl {row['perplexity']:.2f} ({row['seconds']} s)", flush=True)

    result = {
        "calibration": {"samples": int(calibration.shape[0]), "seq_len": int(calibration.shape[1]),
                        "seed": args.seed, "source": "shipped train corpus"},
        "heldout_tokens": int(windows.numel()),
        "rows": rows,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "seconds": round(time.time() - started, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print()
    print(table(rows, baseline_size))
    print(f"\n{result['heldout_tokens']:,} held-out tokens; calibration {calibration.shape[0]} x "
          f"{calibration.shape[1]} tokens; {result['environment']['seconds']} s")


def table(rows, baseline_size) -> str:
    base = rows[0]["perplexity"]
    lines = ["| method | recipe | parameters | removed | weights | held-out ppl | vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["available"]:
            lines.append(f"| {r['method']} | `{r['recipe']}` | not available | | | | |")
            continue
        removed = r["removed_parameters"] / baseline_size["parameters"]
        lines.append(f"| {r['method']} | `{r['recipe'] or '-'}` | {r['parameters'] / 1e6:.2f}M | {removed:.1%} | "
                     f"{r['state_bytes'] / 1e6:.1f} MB | {r['perplexity']:.2f} | "
                     f"{(r['perplexity'] - base) / base:+.1%} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, r in enumerate(rows):
        if r["available"]:
            ax.scatter(r["state_bytes"] / 1e6, r["perplexity"])
            ax.annotate(r["recipe"] or "baseline", (r["state_bytes"] / 1e6, r["perplexity"]), fontsize=8,
                        xytext=(4, 4 if index % 2 else -10), textcoords="offset points")  # alternate: points overlap
    ax.set_yscale("log")
    ax.set(xlabel="weights (MB, state dict)", ylabel="held-out perplexity",
           title="Shipped model: compression methods (lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
