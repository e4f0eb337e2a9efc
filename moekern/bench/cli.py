"""The `bench`, `eval`, `report` and `paper` subcommands; moekern/cli.py adds them with add_harness_commands(sub)."""

import argparse
import platform
import sys
import time
from pathlib import Path

from moekern.errors import MoekernError

DEFAULT_OUT = Path("moekern-runs")


def add_harness_commands(sub) -> None:
    from moekern.bench.presets import PRESETS
    from moekern.cli import add_loading_args, positive_int

    bench = sub.add_parser(
        "bench",
        help="decode speed at a long context, memory and FLOPs: transformers vs moekern, side by side",
        description="Measure MODEL as transformers runs it (the baseline) and then patched by moekern (and "
        "compressed by --recipe), in the same process: prefill --context tokens, decode --decode-tokens tokens with "
        "the KV cache, per batch size; peak memory, weight bytes, FLOPs of one forward of --context tokens, and the "
        "bytes floor of a decode step. MODEL is a local folder, 'shipped', or a preset with random weights: "
        + ", ".join(PRESETS) + ". Results are appended to DIR/bench.jsonl as they are measured.",
        epilog="Example: moekern bench shipped --context 256 --batch-sizes 1,4 --decode-tokens 16 --device cpu",
    )
    bench.add_argument("model", help="local model folder, 'shipped', or a preset name")
    bench.add_argument("--recipe", default=None, help="compress the variant by this recipe (see moekern compress)")
    bench.add_argument("--context", type=positive_int, default=2048, help="prompt tokens (default: 2048)")
    bench.add_argument("--decode-tokens", type=positive_int, default=64, help="decode steps timed (default: 64)")
    bench.add_argument("--batch-sizes", type=batch_list, default=[1, 2, 4, 8, 16, 32, 64],
                       help="comma-separated (default: 1,2,4,8,16,32,64)")
    bench.add_argument("--layers", type=positive_int, default=None, help="keep the first N layers of a preset")
    bench.add_argument("--calib-samples", type=positive_int, default=32,
                       help="calibration blocks of 256 tokens for --recipe (default: 32)")
    bench.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="run folder (default: %(default)s)")
    add_loading_args(bench)
    bench.set_defaults(run=run_bench, dtype=None, writes="runs")  # dtype None: bfloat16 on a GPU, float32 on the CPU
    next(a for a in bench._actions if a.dest == "dtype").help = "weights' dtype (default: bfloat16 on a GPU, " \
        "float32 on the CPU)"

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
    evaluate.set_defaults(run=run_eval, writes="runs")

    report = sub.add_parser(
        "report",
        help="one markdown report (the paper's Table 3), plots and JSON from bench and eval runs",
        description="Read the *.jsonl records of the RUN_DIRs and write report.md, report.json and PNG plots. A "
        "folder of `moekern paper` (even an interrupted one) gets the paper report of its latest run.",
    )
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: the first RUN_DIR")
    report.set_defaults(run=run_report, writes="runs")

    from moekern.bench.paper import add_paper_command

    add_paper_command(sub)


def batch_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def _device(args) -> str:
    import torch

    from moekern.arguments import device

    return device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args):
    """(model, tokenizer or None, facts about where it came from) for a preset, 'shipped' or a local folder."""
    import torch

    from moekern.bench.presets import PRESETS, build_preset
    from moekern.cli import load_from_args

    args.device = _device(args)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    layers = getattr(args, "layers", None)
    if args.model in PRESETS:
        spec = PRESETS[args.model]
        model = build_preset(args.model, layers, getattr(torch, args.dtype), args.device)
        notes = [f"{args.model} is a preset: the shape of {spec['source']} with random weights; random routers "
                 f"route near uniformly, unlike the trained model"]
        if layers:
            notes.append(f"shrunk to its first {layers} of {spec['fields']['num_hidden_layers']} layers (--layers)")
        if spec["differs"]:
            notes.append(spec["differs"])
        return model, None, {"preset": args.model, "source": spec["source"], "notes": notes}
    if args.model != "shipped" and not Path(args.model).expanduser().exists():
        raise MoekernError(f"{args.model!r} is neither a local model folder nor a preset; presets: "
                           f"{', '.join(PRESETS)} (or 'shipped')")
    if layers:
        raise MoekernError("--layers shrinks a preset only; compress a model folder with block-drop instead")
    model, tokenizer = load_from_args(args)
    notes = []
    if getattr(model.config, "moekern", None):
        notes.append(f"{args.model} is a moekern checkpoint: its baseline already runs moekern's MoE blocks (the "
                     f"recorded drops), with transformers' experts implementation")
    return model, tokenizer, {"preset": None, "source": str(args.model), "notes": notes}


def _environment(device: str) -> dict:
    import torch
    import transformers

    name = (torch.cuda.get_device_name(device) if device.startswith("cuda")
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__}


def run_bench(args) -> int:
    from moekern.bench import variants
    from moekern.bench.bandwidth import copy_bandwidth
    from moekern.bench.flops import forward_flops_if_it_fits
    from moekern.bench.records import RecordWriter
    from moekern.bench.speed import measure_batches
    from moekern.model_info import describe
    from moekern.model_info import human_bytes

    from moekern.arguments import check_positions

    variants.parse_recipe(args.recipe)
    model, tokenizer, origin = load_model(args)
    check_positions(model.config, args.context + args.decode_tokens, "--context + --decode-tokens")
    variants.check_calibration(args.recipe, tokenizer)  # before the baseline is measured, not after
    writer = RecordWriter(args.out, "bench.jsonl")
    bandwidth = copy_bandwidth(args.device)
    notes = origin["notes"]
    if not args.device.startswith("cuda"):
        notes.append("measured on the CPU: these times say nothing about GPU kernels (moekern's Triton/CUDA path "
                     "runs only on a GPU)")
    writer.write("run", command="bench", model=str(args.model), **origin, device=args.device, dtype=args.dtype,
                 context=args.context, decode_tokens=args.decode_tokens, batch_sizes=args.batch_sizes,
                 recipe=args.recipe, copy_bandwidth_bytes_s=bandwidth, **_environment(args.device))
    print(f"bench {args.model} on {args.device} ({args.dtype}), context {args.context}, "
          f"{args.decode_tokens} decode tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s -> {writer.path}")
    for note in notes:
        print(f"  note: {note}")

    def measure(variant: str, recipe: str) -> None:
        facts = describe(model)
        flops = forward_flops_if_it_fits(model, args.context)
        writer.write("model", variant=variant, recipe=recipe, model=str(args.model), flops=flops,
                     flops_tokens=args.context, decisions=getattr(model.config, "moekern", None), **facts)
        print(f"{variant}: {human_bytes(facts['weight_bytes'])} weights, "
              f"{'?' if flops is None else f'{flops / 1e9:.1f} GFLOPs'} per forward of {args.context} tokens")
        print(f"  {'batch':>5} {'prefill tok/s':>14} {'decode step':>12} {'decode tok/s':>13} {'peak mem':>10} "
              f"{'x floor':>8}")

        def on_record(record):
            if record["status"] == "ok":
                print(f"  {record['batch']:>5} {record['prefill_tok_s']:>14.1f} "
                      f"{record['decode_step_median_s'] * 1e3:>9.2f} ms {record['decode_tok_s']:>13.1f} "
                      f"{human_bytes(record['peak_memory_bytes']):>10} {record['times_floor']:>8.1f}")
            else:
                print(f"  {record['batch']:>5} out of memory: {record['error']}")
            return writer.write("speed", variant=variant, recipe=recipe, model=str(args.model), **record)

        measure_batches(model, args.batch_sizes, args.context, args.decode_tokens, bandwidth, on_record)

    measure(variants.BASELINE, variants.recipe_of(model))
    model = variants.make_variant(model, tokenizer, args.recipe, args.calib_samples)
    measure(variants.variant_name(args.recipe), variants.recipe_of(model))
    print("x floor: decode step / ((non-expert weights + the experts a batch selects, estimated from top_k and the "
          "batch size as if routing were uniform + KV cache) / copy bandwidth)")
    return 0


def run_eval(args) -> int:
    from moekern.bench import variants
    from moekern.bench.records import RecordWriter
    from moekern.eval.harness import check_tasks, evaluate
    from moekern.model_info import describe

    check_tasks(args.tasks)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise MoekernError(f"--data-dir {str(args.data_dir)!r} is not a folder")
    variants.parse_recipe(args.recipe)
    model, tokenizer, origin = load_model(args)
    if tokenizer is None:
        raise MoekernError(f"{args.model!r} is a preset with random weights and no tokenizer: evaluate a model folder")
    if args.recipe:
        model = variants.make_variant(model, tokenizer, args.recipe, args.calib_samples)
    writer = RecordWriter(args.out, "eval.jsonl")
    recipe = variants.recipe_of(model)
    writer.write("run", command="eval", model=str(args.model), **origin, device=args.device, dtype=args.dtype,
                 tasks=args.tasks, limit=args.limit, recipe=recipe, **_environment(args.device))
    writer.write("model", variant=variants.variant_name(args.recipe) if args.recipe else "checkpoint",
                 recipe=recipe, model=str(args.model), decisions=getattr(model.config, "moekern", None),
                 **describe(model))
    started = time.perf_counter()
    for result in evaluate(model, tokenizer, args.tasks, limit=args.limit, data_dir=args.data_dir,
                           batch_size=args.batch_size):
        writer.write("eval", model=str(args.model), recipe=recipe, limit=args.limit, **result)
        stderr = f" +- {result['stderr']:.4f}" if result.get("stderr") is not None else ""
        print(f"{result['task']:<24} {result['metric']:<10} {result['value']:.4f}{stderr}  (n={result['n']})")
    print(f"eval {args.model} (recipe {recipe}) in {time.perf_counter() - started:.1f} s -> {writer.path}")
    return 0


def run_report(args) -> int:
    from moekern.bench.records import read_records
    from moekern.bench.report import write_report

    missing = [str(p) for p in args.run_dirs if not p.exists()]
    if missing:
        raise MoekernError(f"no such run folder: {', '.join(missing)}")
    notes = []
    records = read_records(args.run_dirs, notes)
    for note in notes:
        print(f"moekern report: note: {note}", file=sys.stderr)
    if not records:
        raise MoekernError(f"no records (*.jsonl) in {', '.join(map(str, args.run_dirs))}; run moekern bench or eval")
    if any(r["kind"] == "run" and r.get("command") == "paper" for r in records):
        from moekern.bench import paper_report

        written = paper_report.write_report(records, args.out or args.run_dirs[0])
    else:
        written = write_report(records, args.out or args.run_dirs[0])
    print("report      " + ", ".join(str(p) for p in written))
    return 0
