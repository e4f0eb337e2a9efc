"""The runners of `moekern bench`, `moekern eval` and `moekern report` (their commands are in moekern/cli/), each
taking its settings: a model measured as transformers runs it and then patched by moekern (and compressed), the
lm-eval tasks of a model, and the report of the records in run folders."""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import moekern.runs as runs
from moekern.runs import environment, with_device
from moekern.errors import MoekernError

DEFAULT_OUT = Path("moekern-runs")


@dataclass(frozen=True)
class BenchSettings:
    model: str  # a local folder, 'shipped', or a preset (moekern.bench.presets)
    recipe: str | None = None  # compress the variant by this recipe
    context: int = 2048  # prompt tokens
    decode_tokens: int = 64  # decode steps timed
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    layers: int | None = None  # keep the first N layers of a preset
    calib_samples: int = 32  # calibration blocks of 256 tokens for `recipe`
    out: Path = DEFAULT_OUT
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    device: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EvalSettings:
    model: str
    tasks: list[str]
    limit: int | None = None  # examples per task
    recipe: str | None = None  # compress the model by this recipe first
    data_dir: Path | None = None  # a datasets cache folder holding the tasks' datasets
    batch_size: int = 8
    calib_samples: int = 32
    out: Path = DEFAULT_OUT
    dtype: str = "float32"
    device: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ReportSettings:
    run_dirs: list[Path]
    out: Path | None = None  # default: the first run folder


def load_model(settings):
    """(model, tokenizer or None, facts about where it came from) for a preset, 'shipped' or a local folder; the
    settings' device and dtype resolved (moekern.runs.with_device)."""
    import torch

    from moekern.bench.presets import PRESETS, build_preset

    s = with_device(settings)
    layers = getattr(s, "layers", None)
    if s.model in PRESETS:
        spec = PRESETS[s.model]
        model = build_preset(s.model, layers, getattr(torch, s.dtype), s.device)
        notes = [f"{s.model} is a preset: the shape of {spec['source']} with random weights; random routers "
                 f"route near uniformly, unlike the trained model"]
        if layers:
            notes.append(f"shrunk to its first {layers} of {spec['fields']['num_hidden_layers']} layers (--layers)")
        if spec["differs"]:
            notes.append(spec["differs"])
        return model, None, {"preset": s.model, "source": spec["source"], "notes": notes}
    if s.model != "shipped" and not Path(s.model).expanduser().exists():
        raise MoekernError(f"{s.model!r} is neither a local model folder nor a preset; presets: "
                           f"{', '.join(PRESETS)} (or 'shipped')")
    if layers:
        raise MoekernError("--layers shrinks a preset only; compress a model folder with block-drop instead")
    model, tokenizer = runs.load_from_args(s)  # looked up at the call, so that a test can replace it
    notes = []
    if getattr(model.config, "moekern", None):
        notes.append(f"{s.model} is a moekern checkpoint: its baseline already runs moekern's MoE blocks (the "
                     f"recorded drops), with transformers' experts implementation")
    return model, tokenizer, {"preset": None, "source": str(s.model), "notes": notes}


def run_bench(settings: BenchSettings) -> int:
    from moekern.arguments import check_positions
    from moekern.bench import variants
    from moekern.bench.bandwidth import copy_bandwidth
    from moekern.bench.flops import forward_flops_if_it_fits
    from moekern.bench.records import RecordWriter
    from moekern.bench.speed import measure_batches
    from moekern.model_info import describe, human_bytes

    variants.parse_recipe(settings.recipe)
    s = with_device(settings)
    model, tokenizer, origin = load_model(s)
    check_positions(model.config, s.context + s.decode_tokens, "--context + --decode-tokens")
    variants.check_calibration(s.recipe, tokenizer)  # before the baseline is measured, not after
    writer = RecordWriter(s.out, "bench.jsonl")
    bandwidth = copy_bandwidth(s.device)
    notes = origin["notes"]
    if not s.device.startswith("cuda"):
        import torch

        from moekern.ops import backend

        runs = {"cpu": "its C++ CPU kernels", "triton": "its Triton kernels in the interpreter",
                "reference": "its PyTorch reference"}[backend.backend_for(torch.device(s.device))]
        notes.append(f"measured on the CPU: these times say nothing about GPU kernels; moekern runs {runs} here "
                     f"(the variant's `kernels` record says which)")
    writer.write("run", command="bench", model=str(s.model), **origin, device=s.device, dtype=s.dtype,
                 context=s.context, decode_tokens=s.decode_tokens, batch_sizes=s.batch_sizes,
                 recipe=s.recipe, copy_bandwidth_bytes_s=bandwidth, **environment(s.device))
    print(f"bench {s.model} on {s.device} ({s.dtype}), context {s.context}, "
          f"{s.decode_tokens} decode tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s -> {writer.path}")
    for note in notes:
        print(f"  note: {note}")

    def measure(variant: str, recipe: str) -> None:
        from moekern.ops import backend
        from moekern.patching import is_patched

        facts = describe(model)
        flops = forward_flops_if_it_fits(model, s.context)
        kernels = backend.describe(model)["paths"] if is_patched(model) else "transformers"
        writer.write("model", variant=variant, recipe=recipe, model=str(s.model), flops=flops,
                     flops_tokens=s.context, decisions=getattr(model.config, "moekern", None), kernels=kernels,
                     **facts)
        print(f"{variant}: {human_bytes(facts['weight_bytes'])} weights, "
              f"{'?' if flops is None else f'{flops / 1e9:.1f} GFLOPs'} per forward of {s.context} tokens; "
              f"experts: {kernels if isinstance(kernels, str) else '; '.join(kernels.values())}")
        print(f"  {'batch':>5} {'prefill tok/s':>14} {'decode step':>12} {'decode tok/s':>13} {'peak mem':>10} "
              f"{'x floor':>8}")

        def on_record(record):
            if record["status"] == "ok":
                print(f"  {record['batch']:>5} {record['prefill_tok_s']:>14.1f} "
                      f"{record['decode_step_median_s'] * 1e3:>9.2f} ms {record['decode_tok_s']:>13.1f} "
                      f"{human_bytes(record['peak_memory_bytes']):>10} {record['times_floor']:>8.1f}")
            else:
                print(f"  {record['batch']:>5} out of memory: {record['error']}")
            return writer.write("speed", variant=variant, recipe=recipe, model=str(s.model), **record)

        measure_batches(model, s.batch_sizes, s.context, s.decode_tokens, bandwidth, on_record)

    measure(variants.BASELINE, variants.recipe_of(model))
    model = variants.make_variant(model, tokenizer, s.recipe, s.calib_samples)
    measure(variants.variant_name(s.recipe), variants.recipe_of(model))
    print("x floor: decode step / ((non-expert weights, of the embedding table one row per token + the experts a batch "
          "selects, estimated from top_k and the batch size as if routing were uniform + KV cache) / copy bandwidth)")
    return 0


def run_eval(settings: EvalSettings) -> int:
    from moekern.bench import variants
    from moekern.bench.records import RecordWriter
    from moekern.eval.harness import check_tasks, evaluate
    from moekern.model_info import describe

    check_tasks(settings.tasks)
    if settings.data_dir is not None and not settings.data_dir.is_dir():
        raise MoekernError(f"--data-dir {str(settings.data_dir)!r} is not a folder")
    variants.parse_recipe(settings.recipe)
    s = with_device(settings)
    model, tokenizer, origin = load_model(s)
    if tokenizer is None:
        raise MoekernError(f"{s.model!r} is a preset with random weights and no tokenizer: evaluate a model folder")
    if s.recipe:
        model = variants.make_variant(model, tokenizer, s.recipe, s.calib_samples)
    writer = RecordWriter(s.out, "eval.jsonl")
    recipe = variants.recipe_of(model)
    writer.write("run", command="eval", model=str(s.model), **origin, device=s.device, dtype=s.dtype,
                 tasks=s.tasks, limit=s.limit, recipe=recipe, **environment(s.device))
    writer.write("model", variant=variants.variant_name(s.recipe) if s.recipe else "checkpoint",
                 recipe=recipe, model=str(s.model), decisions=getattr(model.config, "moekern", None),
                 **describe(model))
    started = time.perf_counter()
    for result in evaluate(model, tokenizer, s.tasks, limit=s.limit, data_dir=s.data_dir,
                           batch_size=s.batch_size):
        writer.write("eval", model=str(s.model), recipe=recipe, limit=s.limit, **result)
        stderr = f" +- {result['stderr']:.4f}" if result.get("stderr") is not None else ""
        print(f"{result['task']:<24} {result['metric']:<10} {result['value']:.4f}{stderr}  (n={result['n']})")
    print(f"eval {s.model} (recipe {recipe}) in {time.perf_counter() - started:.1f} s -> {writer.path}")
    return 0


def run_report(settings: ReportSettings) -> int:
    from moekern.bench.records import read_records
    from moekern.bench.report import write_report

    missing = [str(p) for p in settings.run_dirs if not p.exists()]
    if missing:
        raise MoekernError(f"no such run folder: {', '.join(missing)}")
    notes = []
    records = read_records(settings.run_dirs, notes)
    for note in notes:
        print(f"moekern report: note: {note}", file=sys.stderr)
    if not records:
        raise MoekernError(f"no records (*.jsonl) in {', '.join(map(str, settings.run_dirs))}; run moekern bench "
                           f"or eval")
    out = settings.out or settings.run_dirs[0]
    if any(r["kind"] == "run" and r.get("command") == "paper" for r in records):
        from moekern.bench import paper_report

        written = paper_report.write_report(records, out)
    else:
        written = write_report(records, out)
    print("report      " + ", ".join(str(p) for p in written))
    return 0
