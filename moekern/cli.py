"""The `moekern` command.

    moekern info [MODEL]      load a model (default: the small one shipped with moekern), report its size, memory
                              and held-out perplexity, and generate a short text
    moekern compress MODEL --recipe R --out DIR
                              compress a model by a recipe (e.g. awq4+layer-drop=4) and write the checkpoint and a
                              report (markdown, JSON, plots) into DIR
    moekern paper [MODEL] --out DIR
                              the paper's comparison: every recipe compressed once, then perplexity, lm-eval tasks,
                              speed, FLOPs and memory, in one report with tables and figures (moekern/bench/paper.py)
    moekern finetune MODEL --out DIR
                              fine-tune a compressed model to recover quality (moekern/finetune/)

bench, eval, report and paper hang off the same parser (moekern/bench/cli.py). Mistakes a user can fix end with a one-line
message and exit status 2, never a traceback. The folder a command writes (`writes`: a model or a run folder) is
claimed before any work, under moekern.folders' output rule; SIGTERM ends a command like SIGINT (exit 143 and 130).
"""

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from moekern.errors import MoekernError

DTYPES = ("float32", "bfloat16", "float16")
BLOCK_MATRIX_TOKENS = 8192  # calibration tokens behind the block-wise similarity matrix (Fig. 7) of a report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekern",
        description="Compress Mixture-of-Experts language models and run them fast on one GPU. "
        "Every command works offline on local folders; MODEL may be 'shipped', the small Mixtral-style model "
        "that comes with moekern.",
        epilog="Start with `moekern info` (the shipped model measured, and a sample) or `moekern paper --out DIR` "
        "(the paper's comparison on the shipped model, about 2.5 minutes on 2 CPU cores).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="size, memory, held-out perplexity and a generated sample of a model",
        description="Load MODEL, report its parameters, weight bytes, peak memory and perplexity on the shipped "
        "held-out text, and generate a short continuation of a prompt.",
    )
    info.add_argument("model", nargs="?", default="shipped", help="local model folder, or 'shipped' (default)")
    add_loading_args(info)
    info.add_argument("--prompt", default="The with statement", help="prompt for the sample (default: %(default)r)")
    info.add_argument("--max-new-tokens", type=positive_int, default=32, help="length of the sample (default: 32)")
    info.add_argument("--ppl-tokens", type=positive_int, default=None,
                      help="score only the first N held-out tokens (default: all of them)")
    info.add_argument("--seq-len", type=positive_int, default=256, help="perplexity window (default: 256)")
    info.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    info.set_defaults(run=run_info)

    compress = sub.add_parser(
        "compress",
        help="compress a model by a recipe; write the checkpoint and a report",
        description="Compress MODEL by RECIPE, steps joined by '+': rtn4, awq4 (:autoawq), gptq4 (:act, :sym, "
        ":autogptq; each also :g64, :g32), wanda=0.5, sparsegpt=2:4 (:shared), expert-drop=N (:global, :layerwise, "
        ":nofloor, :topk), layer-drop=N, block-drop=N (:iterative), enum-prune=R (:all), skip or skip=q0.3. "
        "Calibration data is read from --calib (a local .txt, .jsonl, .json (.gz, .zst), .parquet, a folder saved "
        "by datasets, or c4:/pile:/alpaca:PATH) or, by default, from the shipped corpus. Writes the checkpoint "
        "(with its tokenizer) and compress_report.md/.json and plots into --out.",
        epilog="Example: moekern compress shipped --recipe rtn4+layer-drop=2 --out shipped-rtn4-l2 "
        "--samples 32 --seq-len 256",
    )
    compress.add_argument("model", help="local model folder, or 'shipped'")
    compress.add_argument("--recipe", required=True, help="the compression steps, e.g. awq4+block-drop=4")
    compress.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the checkpoint")
    compress.add_argument("--overwrite", action="store_true",
                          help="replace DIR if it holds a moekern model (never anything else)")
    compress.add_argument("--calib", default=None, metavar="PATH",
                          help="calibration corpus (default: the shipped training corpus); the paper's as they are "
                          "published: c4:PATH (a C4 .json.gz shard), pile:PATH (.jsonl.zst), alpaca:PATH (.json)")
    compress.add_argument("--quant-calib", default=None, metavar="PATH",
                          help="calibration of a quantization step (AWQ, GPTQ) if not --calib's; the paper: "
                          "pile:val.jsonl.zst for AWQ, alpaca:alpaca_data.json for GPTQ")
    compress.add_argument("--samples", type=positive_int, default=128, help="calibration blocks (default: 128)")
    compress.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per block (default: 2048)")
    compress.add_argument("--seed", type=int, default=0, help="seed of the choice of blocks (default: 0)")
    compress.add_argument("--order", type=str.upper, choices=("ST", "TS"), default="ST",
                          help="ST: slimming (quantization/pruning) then trimming (default, as in the paper); "
                          "TS: trimming first")
    compress.add_argument("--allow-fewer-experts", action="store_true",
                          help="let Expert Drop / enumeration pruning leave fewer experts than top_k in a layer")
    compress.add_argument("--batch-size", type=positive_int, default=8, help="calibration batch (default: 8)")
    add_loading_args(compress)
    compress.set_defaults(run=run_compress, writes="model")
    from moekern.bench.cli import add_harness_commands  # bench, eval, report
    from moekern.serving.server import add_serve_command  # serve (vLLM, from its own environment)

    add_harness_commands(sub)
    from moekern.finetune.cli import add_finetune_command

    add_finetune_command(sub)
    add_serve_command(sub)
    return parser


def add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default: float32)")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda or cuda:N (default: cuda where available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own Python code to run (off by default: read it first)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device_name(text: str) -> str:
    from moekern.arguments import parse_device

    try:
        return parse_device(text)
    except MoekernError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_from_args(args):
    import torch

    from transformers.utils import logging as hf_logging

    from moekern.checkpoint import load

    hf_logging.disable_progress_bar()  # a bar for loading a few shards says nothing to a reader of this report
    from moekern.arguments import device as usable_device

    device = usable_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype), device=device,
                            trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise MoekernError(f"{args.model!r} has no tokenizer files; save the model with its tokenizer")
    return model, tokenizer


def run_info(args) -> int:
    import torch

    from moekern.eval.perplexity import mean_nll, token_windows
    from moekern.model_info import describe, human_bytes, human_count, peak_memory_bytes
    from moekern.shipped import heldout_text

    from moekern.arguments import check_positions

    started = time.perf_counter()
    model, tokenizer = load_from_args(args)
    check_positions(model.config, args.seq_len, "--seq-len")
    device = next(model.parameters()).device
    facts = describe(model)
    facts["model"] = str(args.model)
    facts["device"] = str(device)
    facts["load_seconds"] = round(time.perf_counter() - started, 2)

    try:
        windows = token_windows(tokenizer, heldout_text(), args.seq_len, max_tokens=args.ppl_tokens)
    except ValueError as exc:
        raise MoekernError(f"{exc}: lower --seq-len or raise --ppl-tokens") from exc
    facts["heldout_tokens"] = int(windows.numel())
    facts["perplexity"] = math.exp(mean_nll(model, windows))
    if not math.isfinite(facts["perplexity"]):
        raise MoekernError(f"the perplexity of {args.model!r} is {facts['perplexity']}: the model gives non-finite "
                           f"logits on the held-out text" + (" (in float16: try --dtype bfloat16 or float32)"
                                                             if args.dtype == "float16" else ""))

    prompt = tokenizer(args.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=tokenizer.pad_token_id)
    facts["sample"] = tokenizer.decode(out[0], skip_special_tokens=True)
    facts["peak_memory_bytes"] = peak_memory_bytes(device)

    experts = (f"{human_count(facts['expert_parameters'])} in routed experts "
               f"({facts['layers']} layers x {facts['experts']} experts, top-{facts['top_k']})"
               if facts["experts"] else "dense model")
    peak_kind = "allocated" if device.type == "cuda" else "resident (whole process)"
    rows = [
        ("model", f"{args.model}: {facts['architecture']} ({facts['model_type']})"),
        ("parameters", f"{human_count(facts['parameters'])}, {experts}"),
        ("weights", f"{human_bytes(facts['weight_bytes'])} as {facts['dtype']} on {device}"),
        ("peak memory", f"{human_bytes(facts['peak_memory_bytes'])} {peak_kind}"),
        ("perplexity", f"{facts['perplexity']:.2f} on {facts['heldout_tokens']:,} held-out tokens "
                       f"(windows of {args.seq_len})"),
        ("sample", repr(facts["sample"])),
        ("kernels", kernels_line(model, facts)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        from moekern.folders import write_file

        write_file(args.json, json.dumps(facts, indent=2) + "\n")
    return 0


def kernels_line(model, facts: dict) -> str:
    """Which path runs the experts: transformers' own, or moekern's (and then which kernels, moekern.ops.backend)."""
    from moekern.ops import backend
    from moekern.patching import is_patched

    paths = backend.describe(model)
    facts["kernels"] = paths
    moekern_paths = "; ".join(f"{kind}: {path}" for kind, path in paths["paths"].items()) or "no experts"
    if is_patched(model):
        return f"moekern (MOEKERN_BACKEND={paths['backend']}) - {moekern_paths}"
    return (f"transformers' experts ({model.config._experts_implementation}); moekern.patch would run "
            f"{moekern_paths}")


def run_compress(args) -> int:
    from moekern.arguments import check_positions
    from moekern.checkpoint import save
    from moekern.compress.calibration import calibration_blocks
    from moekern.compress.recipe import Recipe, check_recipe, run_recipe
    from moekern.compress.report import write_report
    from moekern.model_info import human_bytes, human_count

    started = time.perf_counter()
    recipe = Recipe.parse(args.recipe)  # a typo fails before the model is loaded
    model, tokenizer = load_from_args(args)
    check_recipe(recipe, model, args.allow_fewer_experts)
    calibration = None
    if recipe.needs_calibration():
        check_positions(model.config, args.seq_len, "--seq-len")
        calibration = calibration_blocks(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
    base_stats = None
    first = recipe.ordered(args.order)[0]
    if not first.slimming:  # the first trimming step's calibration pass also records the block-wise matrix (Fig. 7)
        from moekern.compress.recipe import EnumPrune
        from moekern.compress.stats import measure

        enum_all = isinstance(first, EnumPrune) and first.all_tokens
        base_stats = measure(model, calibration, batch_size=args.batch_size, device=args.device,
                             record_tokens=isinstance(first, EnumPrune) and not enum_all, seed=args.seed,
                             block_tokens=BLOCK_MATRIX_TOKENS, enumerate_keep=first.keep if enum_all else 0)
    result = run_recipe(model, recipe, calibration, args.order, allow_fewer=args.allow_fewer_experts,
                        inplace=True, seed=args.seed, batch_size=args.batch_size, device=args.device,
                        base_stats=base_stats, quant_calibration=args.quant_calib, tokenizer=tokenizer,
                        samples=args.samples, seq_len=args.seq_len)
    written = []  # the report goes into the checkpoint's temporary folder: both appear together, or neither
    save(result.model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
         add_files=lambda folder: written.extend(write_report(result, folder)))
    b, a = result.before, result.after
    print(f"recipe      {result.recipe} (order {result.order})")
    for step in result.steps:
        decided = {k: v for k, v in step.items() if k not in ("step", "kind", "seconds", "report")}
        print(f"  {step['step']:<20} {step['seconds']:>7.1f} s  {json.dumps(decided, default=str)[:100]}")
    print(f"parameters  {human_count(b['parameters'])} -> {human_count(a['parameters'])}")
    print(f"weights     {human_bytes(b['state_bytes'])} -> {human_bytes(a['state_bytes'])}")
    print(f"checkpoint  {args.out} ({time.perf_counter() - started:.1f} s)")
    print(f"report      {', '.join(p.name for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a usage line on an unknown command or option
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for the reports
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


if __name__ == "__main__":
    sys.exit(main())
