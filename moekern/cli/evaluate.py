"""`moekern eval MODEL --tasks T`: lm-eval tasks (zero-shot) and held-out perplexity of a model, offline
(moekern.bench.harness.run_eval)."""

from pathlib import Path

from moekern.cli.common import add_loading_args, positive_int, settings_from


def add_parser(sub) -> None:
    from moekern.bench.harness import DEFAULT_OUT
    from moekern.eval.harness import known_tasks

    evaluate = sub.add_parser(
        "eval",
        help="lm-eval tasks (zero-shot) and held-out perplexity of a model, offline",
        description="Evaluate MODEL (a local folder or 'shipped', compressed by --recipe if given) with lm-eval on "
        "the in-memory model. Tasks: " + ", ".join(known_tasks()) + ". The paper's eight tasks need their datasets "
        "on disk (--data-dir: a datasets cache folder); moekern_heldout_mc and moekern_heldout_ppl are built from "
        "the shipped corpus and need nothing. Results are appended to DIR/eval.jsonl.",
        epilog="Example: moekern eval shipped --tasks moekern_heldout_mc,moekern_heldout_ppl --limit 50",
    )
    evaluate.add_argument("model", help="local model folder, or 'shipped'")
    evaluate.add_argument("--tasks", required=True, type=lambda s: [t for t in s.split(",") if t],
                          help="comma-separated task names")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="examples per task; for moekern_heldout_ppl, windows of 256 tokens (default: all)")
    evaluate.add_argument("--recipe", default=None, help="compress the model by this recipe first")
    evaluate.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                          help="a Hugging Face datasets cache folder holding the tasks' datasets")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size (default: 8)")
    evaluate.add_argument("--calib-samples", type=positive_int, default=32,
                          help="calibration blocks of 256 tokens for --recipe (default: 32)")
    evaluate.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                          help="run folder (default: %(default)s)")
    add_loading_args(evaluate)
    evaluate.set_defaults(run=run, writes="runs")


def run(args) -> int:
    from moekern.bench.harness import EvalSettings, run_eval

    return run_eval(settings_from(EvalSettings, args))
