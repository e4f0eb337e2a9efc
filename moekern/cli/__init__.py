"""The `moekern` command: one module per command, each adding its parser and turning the parsed arguments into the
settings of the runner that does the work (the runners take settings, never arguments, and import no command).

    moekern info [MODEL]      info.py      a model's size, memory, held-out perplexity and a generated sample
    moekern compress MODEL    compress.py  compress by a recipe; the checkpoint and its report
    moekern bench MODEL       bench.py     speed, memory and FLOPs against transformers (moekern.bench.harness)
    moekern eval MODEL        evaluate.py  lm-eval tasks and held-out perplexity (moekern.bench.harness)
    moekern report RUN_DIR    report.py    the report of bench, eval or paper runs (moekern.bench.harness)
    moekern paper [MODEL]     paper.py     the paper's comparison, the main job (moekern.bench.paper)
    moekern finetune, serve                added by moekern.cli.finetune and moekern.serving.server
    common.py                 what they share: argparse types and the loading options (loading itself: moekern.runs)

Mistakes a user can fix end with a one-line message and exit status 2, never a traceback. The folder a command
writes (`writes`: a model or a run folder) is claimed before any work, under moekern.folders' output rule; SIGTERM
ends a command like SIGINT (exit 143 and 130).
"""

import argparse
import contextlib
import sys

from moekern.cli.common import DTYPES, add_loading_args, batch_list, device_name, positive_int
from moekern.errors import MoekernError
from moekern.runs import load_from_args

__all__ = ["main", "build_parser", "DTYPES", "add_loading_args", "positive_int", "device_name", "batch_list",
           "load_from_args"]


def build_parser() -> argparse.ArgumentParser:
    from moekern.cli import bench, compress, evaluate, info, paper, report
    from moekern.cli.finetune import add_finetune_command
    from moekern.serving.server import add_serve_command  # serve (vLLM, from its own environment)

    parser = argparse.ArgumentParser(
        prog="moekern",
        description="Compress Mixture-of-Experts language models and run them fast on one GPU. "
        "Every command works offline on local folders; MODEL may be 'shipped', the small Mixtral-style model "
        "that comes with moekern.",
        epilog="Start with `moekern info` (the shipped model measured, and a sample) or `moekern paper --out DIR` "
        "(the paper's comparison on the shipped model, about 2.5 minutes on 2 CPU cores).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (info, compress, bench, evaluate, report, paper):
        command.add_parser(sub)
    add_finetune_command(sub)
    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for the reports
    parser = build_parser()
    # argparse itself exits 2 with a usage line on an unknown command or option
    args = parser.parse_args(argv, namespace=argparse.Namespace(argv=argv))
    if args.command is None:
        parser.print_help()
        return 0
    from moekern import folders

    try:
        with folders.interruptible(), claim_output(args):
            return args.run(args)
    except MoekernError as exc:
        print(f"moekern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, folders.Terminated)
        print(f"moekern {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (exc.signum if terminated else 2)


def claim_output(args):
    """The folder the command writes (its `writes` kind), claimed before any work: the output rule and the lock of
    moekern.folders. `report` writes into its first run folder unless --out says otherwise."""
    from moekern import folders

    kind = getattr(args, "writes", None)
    run_dirs = getattr(args, "run_dirs", None) or []
    if kind is None or not all(p.exists() for p in run_dirs):
        return contextlib.nullcontext()  # (a missing run folder is run_report's error to give)
    target = args.out if args.out is not None else run_dirs[0]
    model = getattr(args, "model", None)
    return folders.claim(target, kind, overwrite=getattr(args, "overwrite", False),
                         sources=[model] if model else [], command=" ".join(["moekern", *args.argv]))


def __getattr__(name: str):
    """Names this module had when it was one file, where they are now."""
    moved = {"BLOCK_MATRIX_TOKENS": "moekern.compression.shared", "run_info": "moekern.cli.info",
             "kernels_line": "moekern.cli.info", "run_compress": "moekern.cli.compress"}
    if name in moved:
        from importlib import import_module

        return getattr(import_module(moved[name]), name)
    raise AttributeError(f"module 'moekern.cli' has no attribute {name!r}")
