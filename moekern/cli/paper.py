"""`moekern paper [MODEL] --out DIR`: the paper's comparison, the main job (moekern.bench.paper)."""

import argparse
from pathlib import Path

from moekern.cli.common import (add_loading_args, batch_list, device_dependent_dtype, names, positive_int,
                                settings_from)


def add_parser(sub) -> None:
    from moekern.bench.paper import DEFAULT_RECIPES, DEFAULT_TASKS, RECORDS, PaperSettings

    paper = sub.add_parser(
        "paper",
        help="the paper's comparison on one model: every recipe compressed once, then perplexity, lm-eval tasks, "
        "speed, FLOPs and memory; one report with tables and figures",
        description="Compress MODEL (default: the shipped model) by each recipe once and measure each: held-out "
        "perplexity, the offline lm-eval tasks, FLOPs, weight bytes and speed per batch size against transformers' "
        "own model in the same process. Results are appended to DIR/" + RECORDS + " as they are made; DIR/report.md "
        "(the paper table with held-out perplexity, the shape of the paper's Table 3, the similarity figures and "
        "drop patterns), report.json and PNG plots are written at the end. Defaults: on a GPU the paper's settings "
        "(context 2048, batch 1..64, 64 decode tokens, calibration 128 x 2048); on the CPU context 256, batch 1 "
        "and 4, 16 decode tokens, calibration 32 x 256.",
        epilog="Example: moekern paper --out moekern-runs/paper   (about 2.5 minutes on 2 CPU cores)",
    )
    paper.add_argument("model", nargs="?", default="shipped", help="local model folder, or 'shipped' (default)")
    paper.add_argument("--out", type=Path, default=PaperSettings.out, metavar="DIR",
                       help="run folder (default: %(default)s)")
    paper.add_argument("--recipes", type=names, default=list(DEFAULT_RECIPES),
                       help="comma-separated recipes, one row each after the baseline; 'none' is moekern without "
                       "compression (default: " + ",".join(DEFAULT_RECIPES) + ")")
    paper.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=list(DEFAULT_TASKS),
                       help="lm-eval tasks besides the held-out perplexity (default: moekern_heldout_mc; the paper's "
                       "eight need --data-dir)")
    paper.add_argument("--limit", type=positive_int, default=None,
                       help="examples per task and perplexity windows of 256 tokens (default: all)")
    paper.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="where the paper's tasks' datasets are: a datasets cache folder, or files "
                       "DIR/<task>/<split>.jsonl (see moekern eval)")
    paper.add_argument("--calib", default=None, metavar="PATH",
                       help="calibration corpus (default: the shipped training corpus)")
    paper.add_argument("--samples", type=positive_int, default=None, help="calibration blocks (default: see above)")
    paper.add_argument("--seq-len", type=positive_int, default=None, help="tokens per calibration block")
    paper.add_argument("--seed", type=int, default=0, help="seed of the choice of calibration blocks (default: 0)")
    paper.add_argument("--order", type=str.upper, choices=("ST", "TS"), default="ST",
                       help="ST: slimming then trimming (default, as in the paper); TS: trimming first")
    paper.add_argument("--allow-fewer-experts", action="store_true",
                       help="let Expert Drop leave fewer experts than top_k in a layer")
    paper.add_argument("--matrix-tokens", type=positive_int, default=PaperSettings.matrix_tokens,
                       help="calibration tokens behind the block-wise similarity matrix (default: %(default)s)")
    paper.add_argument("--context", type=positive_int, default=None, help="prompt tokens of the speed runs")
    paper.add_argument("--batch-sizes", type=batch_list, default=None, help="comma-separated batch sizes")
    paper.add_argument("--decode-tokens", type=positive_int, default=None, help="decode steps timed")
    paper.add_argument("--eval-batch-size", type=positive_int, default=8, help="lm-eval batch size (default: 8)")
    add_loading_args(paper)
    add_extras_args(paper)
    add_finetune_args(paper)
    device_dependent_dtype(paper)
    paper.set_defaults(run=run, writes="runs")


def run(args) -> int:
    from moekern.bench.paper import PaperSettings, run_paper

    return run_paper(settings_from(PaperSettings, args), ["moekern", *args.argv])


def add_extras_args(parser) -> None:
    """--figures, --tables, --calib2: the paper's artefacts that need many more models (moekern.bench.paper_extras)."""
    from moekern.bench.paper_extras import FIGURES, TABLES

    parser.add_argument("--figures", type=lambda s: _choices(s, FIGURES, "--figures"), default=[],
                        help="also make the paper's figures that need many more models: sweeps (Figs. 3, 5, 6, "
                        "13-15), robustness (Fig. 9), or all (comma-separated; default: none)")
    parser.add_argument("--tables", type=lambda s: _choices(s, TABLES, "--tables"), default=[],
                        help="also make the paper's appendix tables 5, 6, 7, 8, or all (comma-separated)")
    parser.add_argument("--calib2", default=None, metavar="PATH",
                        help="the second calibration source of the robustness figure (default: the Python standard "
                        "library's source files)")


def _choices(text: str, allowed: tuple, flag: str) -> list[str]:
    wanted = [t.strip().lower() for t in text.split(",") if t.strip()]
    if wanted == ["all"]:
        return list(allowed)
    if wanted == ["none"]:
        return []
    unknown = [t for t in wanted if t not in allowed]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"{flag} takes all, none or {', '.join(allowed)}; got {text!r}")
    return wanted


def add_finetune_args(parser) -> None:
    """The fine-tuning section's options (moekern.bench.paper_finetune)."""
    from moekern.bench.paper_finetune import FINETUNE_BATCH, FINETUNE_LR, FINETUNE_RECIPES, FINETUNE_STEPS

    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                        help="fine-tuning section: optimizer steps of --finetune-batch blocks per fine-tuned row "
                        "(default: %(default)s; 0 leaves the section out)")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR, help="its learning rate (default: "
                        "%(default)s)")
    parser.add_argument("--finetune-batch", type=int, default=FINETUNE_BATCH,
                        help="its blocks per step (default: %(default)s)")
    parser.add_argument("--finetune-recipes", type=lambda s: [r.strip() for r in s.split(",") if r.strip()],
                        default=list(FINETUNE_RECIPES),
                        help="the rows fine-tuned, among --recipes (default: " + ",".join(FINETUNE_RECIPES) + ")")
    parser.add_argument("--finetune-data", default=None, metavar="PATH",
                        help="its training data (default: the shipped corpus's training split, shipped model only)")
