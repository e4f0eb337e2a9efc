"""`moekern paper [MODEL] --out DIR`: the paper's comparison, the main job (moekern.bench.paper)."""

from pathlib import Path

from moekern.cli.common import (add_loading_args, batch_list, device_dependent_dtype, names, positive_int,
                                settings_from)


def add_parser(sub) -> None:
    from moekern.bench.paper import DEFAULT_RECIPES, DEFAULT_TASKS, RECORDS, PaperSettings
    from moekern.bench.paper_extras import add_arguments
    from moekern.bench.paper_finetune import add_finetune_args

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
    add_arguments(paper)  # --figures, --tables, --calib2: the paper's artefacts that need many more models
    add_finetune_args(paper)
    device_dependent_dtype(paper)
    paper.set_defaults(run=run, writes="runs")


def run(args) -> int:
    from moekern.bench.paper import PaperSettings, run_paper

    return run_paper(settings_from(PaperSettings, args), ["moekern", *args.argv])
