"""Expert Slimming on the shipped model: held-out perplexity after 4-bit quantization (RTN, AWQ, GPTQ) and after
pruning (Wanda, SparseGPT; 50% unstructured and 2:4) of the experts.

    PYTHONPATH=. python benchmarks/slimming_table.py [--out benchmarks/results/slimming_table.json]
        [--only rtn-g128,awq-g128] [--render benchmarks/results/slimming_table.json]

Calibration: 32 windows of 256 tokens from the shipped training text (evenly spaced over it, so the choice is
deterministic); evaluation: the whole held-out text (fp32, windows of 256): perplexity (as moekern.perplexity),
and how far each compressed model's next-token distribution moved from the baseline's, KL(baseline || compressed)
in nats per token (fidelity, which does not depend on whether a perturbation happens to favour the held-out tokens).
"+-" is one standard error of the perplexity change, from the per-window NLL differences to the baseline (paired
windows): differences between methods smaller than about twice that are not resolved by this text. Each method
starts from a fresh copy of the model. Prints a markdown table and writes the figures as JSON.
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekern.perplexity import token_windows
from moekern.compression.slimming import PruneConfig, QuantConfig, prune_, quantize_
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
    baseline_model, _ = load_model(torch.float32)
    baseline = evaluate(baseline_model, heldout)
    del baseline_model
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
        scored = evaluate(model, heldout, baseline["logprobs"])
        window_nll = scored["window_nll"]
        ppl = math.exp(sum(window_nll) / len(window_nll))
        diff = torch.tensor(window_nll, dtype=torch.float64) - torch.tensor(baseline["window_nll"], dtype=torch.float64)
        row = {
            "name": name, "method": describe(config), "perplexity": round(ppl, 3),
            "kl_to_baseline": scored["kl"],
            "delta_nll_se": float(diff.std() / math.sqrt(diff.numel())) if diff.abs().sum() > 0 else 0.0,
            "compress_seconds": round(seconds, 1),
            "fallback": report.get("fallback_rtn", report.get("fallback_magnitude")),
            "awq_kept_rtn": report.get("awq_kept_rtn"),
            "mean_rel_output_error": report.get("mean_rel_output_error"),
            "mean_weighted_rel_output_error": report.get("mean_weighted_rel_output_error"),
            "window_nll": [round(v, 6) for v in window_nll],
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)
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


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, baseline_logprobs: list | None = None, batch_size: int = 8) -> dict:
    """Per-window mean next-token NLL (the perplexity's terms, as moekern.eval.mean_nll computes them) and, given
    the baseline's log-probabilities, the mean KL(baseline || model) per predicted token. Without them, returns the
    model's own log-probabilities (the baseline's, kept for the other runs)."""
    model.eval()
    window_nll, logprobs, kl_sum, count = [], [], 0.0, 0
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size]
        lp = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        nll = -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        window_nll += nll.double().mean(dim=1).tolist()
        if baseline_logprobs is None:
            logprobs.append(lp)
        else:
            base = baseline_logprobs[i]
            kl_sum += float((base.exp() * (base - lp)).sum(dim=-1).double().sum())
            count += nll.numel()
    out = {"window_nll": window_nll}
    if baseline_logprobs is None:
        out["logprobs"] = logprobs
    else:
        out["kl"] = kl_sum / count
    return out


def markdown(rows: list[dict]) -> str:
    base = next((r["perplexity"] for r in rows if r["name"] == "baseline"), None)
    lines = ["| run | method | held-out ppl | vs baseline (+- 1 s.e.) | KL to baseline (1e-4 nats) | "
             "expert output error (routing-weighted) | compress s | fallbacks |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = ""
        if base and r["name"] != "baseline":
            delta = f"{r['perplexity'] / base - 1:+.3%}"
            if r.get("delta_nll_se") is not None:
                delta += f" +- {r['delta_nll_se']:.3%}"
        kl = "" if r.get("kl_to_baseline") is None or r["name"] == "baseline" else f"{r['kl_to_baseline'] * 1e4:.2f}"
        error = "" if r["mean_rel_output_error"] is None else f"{r['mean_rel_output_error']:.4f}"
        if r.get("mean_weighted_rel_output_error") is not None:
            error += f" ({r['mean_weighted_rel_output_error']:.4f})"
        fallback = "" if r["fallback"] is None else r["fallback"]
        lines.append(f"| {r['name']} | {r['method']} | {r['perplexity']:.3f} | {delta} | {kl} | {error} | "
                     f"{r['compress_seconds']} | {fallback} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
