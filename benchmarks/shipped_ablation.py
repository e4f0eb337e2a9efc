"""The first figures of the README: held-out perplexity of the shipped model, with one expert masked in every layer
and with one decoder layer removed.

    python benchmarks/shipped_ablation.py [--out benchmarks/results/shipped_ablation.json]

Masking expert e is Expert Drop of that id everywhere (mask-only mode: its router logit is -inf, tokens route among
the other experts); removing layer i is Block Drop of that one decoder layer. Both go through moekern.surgery on a
fresh copy of the model, so the figures also exercise the library's own edits.
"""

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moekern import surgery
from moekern.perplexity import mean_nll, token_windows
from moekern.shipped import heldout_text, load_model


def ppl(model, windows) -> float:
    return math.exp(mean_nll(model, windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shipped_ablation.json")
    args = parser.parse_args()
    started = time.time()

    model, tokenizer = load_model(torch.float32)
    windows = token_windows(tokenizer, heldout_text(), seq_len=256)
    layers, experts = model.config.num_hidden_layers, model.config.num_local_experts
    result = {"heldout_tokens": int(windows.numel()), "seq_len": 256, "baseline": ppl(model, windows)}

    masked = []
    for e in range(experts):
        model, _ = load_model(torch.float32)
        surgery.drop_experts(model, {i: [x for x in range(experts) if x != e] for i in range(layers)}, mask_only=True)
        masked.append(ppl(model, windows))
    removed = []
    for i in range(layers):
        model, _ = load_model(torch.float32)
        surgery.remove_blocks(model, [i])
        removed.append(ppl(model, windows))
    result["expert_masked"] = masked
    result["layer_removed"] = removed
    result["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def summary(xs):
        return f"{min(xs):.2f} / {statistics.mean(xs):.2f} / {max(xs):.2f}"

    print("| model | held-out perplexity (min / mean / max) |\n|---|---|")
    print(f"| baseline | {result['baseline']:.2f} |")
    print(f"| one expert masked in every layer (8 choices) | {summary(masked)} |")
    print(f"| one decoder layer removed (8 choices) | {summary(removed)} |")
    print("\nper layer removed: " + ", ".join(f"{i}: {p:.2f}" for i, p in enumerate(removed)))
    print("per expert masked: " + ", ".join(f"{e}: {p:.2f}" for e, p in enumerate(masked)))


if __name__ == "__main__":
    main()
