"""`moekern paper`: the paper's comparison (He et al., Table 3, Figs. 4, 7, 10, 12) on one model, on the machine at
hand, in one command.

    moekern paper [MODEL] --out DIR          MODEL: 'shipped' (default) or a local model folder

Row 0 is the baseline: transformers' own model as it loads. Every other row is a recipe (default: DEFAULT_RECIPES):
the model is patched by moekern, compressed ONCE by the recipe, and then measured: held-out perplexity, the offline
lm-eval tasks (and the paper's eight with --tasks/--data-dir), FLOPs of one forward of the context, weight bytes, and
prefill and decode speed per batch size, in the same process as the baseline (the speedup is against it). Each result
is appended to DIR/paper.jsonl as soon as it exists, so an interrupt loses nothing measured (`moekern report DIR`
writes the report from what is there). At the end DIR/report.md and report.json (moekern.bench.paper_report) and the
PNG plots are written from that file alone.

Calibration is shared where that is exact:
  - one pass on the uncompressed model gives the statistics of every recipe whose first step is a trimming step
    (moekern.compress.recipe.run_recipe(base_stats=...)); the same pass records the layer-wise similarities (Fig. 4),
    the block-wise similarity matrix (Fig. 7) and the drop patterns for every count (Figs. 10, 12);
  - a slimming step that comes first (order ST: awq4 in awq4+block-drop=2) runs once, and each recipe that starts with
    it continues from a copy of that model, with one calibration pass of the slimmed model for all of them.
A recipe that cannot be parsed, that does not fit the model, or whose row fails (out of memory, ...) becomes a row
that says so, and the next row goes on.
"""

import copy
import gc
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moekern.errors import MoekernError

RECORDS = "paper.jsonl"
DEFAULT_RECIPES = (
    "none",  # moekern's path without compression: the kernels' share of the speedup
    "awq4",
    "expert-drop=2", "awq4+expert-drop=2",
    "layer-drop=2", "awq4+layer-drop=2",
    "block-drop=2", "awq4+block-drop=2",
    "layer-drop=4", "block-drop=4",
    "rtn4",  # 4-bit without calibration
    "enum-prune=6", "skip",  # Lu et al.'s expert pruning and dynamic skipping
)
DEFAULT_TASKS = ("moekern_heldout_mc",)
# speed settings where no option says otherwise: the paper's on a GPU; on the CPU small enough to end in minutes
GPU_SPEED = {"context": 2048, "batch_sizes": [1, 2, 4, 8, 16, 32, 64], "decode_tokens": 64}
CPU_SPEED = {"context": 256, "batch_sizes": [1, 4], "decode_tokens": 16}
GPU_CALIBRATION = {"samples": 128, "seq_len": 2048}  # the paper's
CPU_CALIBRATION = {"samples": 32, "seq_len": 256}


def add_paper_command(sub) -> None:
    from moekern.bench.cli import DEFAULT_OUT, batch_list
    from moekern.cli import BLOCK_MATRIX_TOKENS, add_loading_args, positive_int

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
    paper.add_argument("--out", type=Path, default=DEFAULT_OUT / "paper", metavar="DIR",
                       help="run folder (default: %(default)s)")
    paper.add_argument("--recipes", type=lambda s: [r.strip() for r in s.split(",") if r.strip()],
                       default=list(DEFAULT_RECIPES),
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
    paper.add_argument("--matrix-tokens", type=positive_int, default=BLOCK_MATRIX_TOKENS,
                       help="calibration tokens behind the block-wise similarity matrix (default: %(default)s)")
    paper.add_argument("--context", type=positive_int, default=None, help="prompt tokens of the speed runs")
    paper.add_argument("--batch-sizes", type=batch_list, default=None, help="comma-separated batch sizes")
    paper.add_argument("--decode-tokens", type=positive_int, default=None, help="decode steps timed")
    paper.add_argument("--eval-batch-size", type=positive_int, default=8, help="lm-eval batch size (default: 8)")
    add_loading_args(paper)
    from moekern.bench.paper_extras import add_arguments
    from moekern.bench.paper_finetune import add_finetune_args

    add_arguments(paper)  # --figures, --tables, --calib2: the paper's artefacts that need many more models
    add_finetune_args(paper)
    paper.set_defaults(run=run_paper, dtype=None, writes="runs")
    next(a for a in paper._actions if a.dest == "dtype").help = "weights' dtype (default: bfloat16 on a GPU, " \
        "float32 on the CPU)"


@dataclass
class Root:
    """A model the rows start from (copied, never measured itself): the uncompressed patched model, or it after a
    slimming step; with its calibration statistics by record_tokens, measured once when first needed."""

    model: object
    name: str
    steps: list = field(default_factory=list)  # the log of the step that made it
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


class Paper:
    def __init__(self, args, argv: list[str]):
        self.args, self.argv = args, argv
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> int:
        import torch

        from moekern.bench.bandwidth import copy_bandwidth
        from moekern.bench.cli import _environment, load_model
        from moekern.bench.records import RecordWriter
        from moekern.eval.harness import HELDOUT_PPL, check_tasks

        args = self.args
        self.tasks = [t for t in args.tasks if t != HELDOUT_PPL]
        check_tasks([*self.tasks, HELDOUT_PPL])
        if args.data_dir is not None and not args.data_dir.is_dir():
            raise MoekernError(f"--data-dir {str(args.data_dir)!r} is not a folder")
        model, tokenizer, origin = load_model(args)
        if tokenizer is None:
            raise MoekernError(f"{args.model!r} is a preset with random weights and no tokenizer: give a model "
                               f"folder (or 'shipped')")
        gpu = args.device.startswith("cuda")
        speed = GPU_SPEED if gpu else CPU_SPEED
        calib = GPU_CALIBRATION if gpu else CPU_CALIBRATION
        args.context = args.context or speed["context"]
        args.batch_sizes = args.batch_sizes or speed["batch_sizes"]
        args.decode_tokens = args.decode_tokens or speed["decode_tokens"]
        args.samples = args.samples or calib["samples"]
        args.seq_len = args.seq_len or calib["seq_len"]
        from moekern.arguments import check_positions

        check_positions(model.config, args.context + args.decode_tokens, "--context + --decode-tokens")
        check_positions(model.config, args.seq_len, "--seq-len")
        self.model_name, self.tokenizer = str(args.model), tokenizer

        self.writer = RecordWriter(args.out, RECORDS)
        self.bandwidth = copy_bandwidth(args.device)
        notes = list(origin["notes"])
        if not gpu:
            from moekern.ops import backend

            runs = {"cpu": "its C++ CPU kernels", "triton": "its Triton kernels in the interpreter",
                    "reference": "its PyTorch reference"}[backend.backend_for(torch.device(args.device))]
            notes.append(f"measured on the CPU: these times say nothing about GPU kernels (moekern's Triton/CUDA "
                         f"path runs only on a GPU; on the CPU moekern runs {runs})")
        from moekern.compress.calibration import calibration_blocks

        self.calibration = calibration_blocks(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
        self.writer.write(
            "run", command="paper", argv=self.argv, model=self.model_name, **origin | {"notes": notes},
            device=args.device, dtype=args.dtype, context=args.context, batch_sizes=args.batch_sizes,
            decode_tokens=args.decode_tokens, tasks=[*self.tasks, HELDOUT_PPL], limit=args.limit,
            calibration={"source": args.calib or "shipped training corpus", "samples": int(self.calibration.shape[0]),
                         "seq_len": int(self.calibration.shape[1]), "seed": args.seed},
            order=args.order, recipes=args.recipes, matrix_tokens=args.matrix_tokens,
            copy_bandwidth_bytes_s=self.bandwidth, commit=source_commit(), python=platform.python_version(),
            threads=torch.get_num_threads(), machine=machine(), **_environment(args.device))
        print(f"moekern paper: {self.model_name} on {args.device} ({args.dtype}); calibration "
              f"{self.calibration.shape[0]} x {self.calibration.shape[1]} tokens; speed at context {args.context}, "
              f"batch {','.join(map(str, args.batch_sizes))}, {args.decode_tokens} decode tokens -> "
              f"{self.writer.path}", flush=True)
        for note in notes:
            print(f"  note: {note}")

        quiet_evaluation()
        try:
            self._rows(model)
            from moekern.bench.paper_extras import run as run_extras

            run_extras(self)
        finally:
            # also after an interrupt: the report of what was measured
            from moekern.bench.paper_report import write_report

            written = write_report(self.writer.path, args.out, run=self.writer.run)
            from moekern.bench.paper_finetune import write_finetune_report

            for path in write_finetune_report(self.writer.path, args.out)[:1]:
                print(f"finetuning  {path}")
            print(f"report      {', '.join(str(p) for p in written[:2])} and {len(written) - 2} plots "
                  f"({time.perf_counter() - self.started:.0f} s in all)")
        return 0

    # ------------------------------------------------------------------------------------------------------------
    def _rows(self, model) -> None:
        import moekern

        from moekern.bench.speed import prefill_and_decode

        from moekern.bench.presets import is_out_of_memory

        try:  # once at the full size before anything is timed: the first large forward pays for allocations
            prefill_and_decode(model, max(self.args.batch_sizes), self.args.context, 2)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
        moekern.unpatch(model)  # a remote-code model moekern adopted at load (DeepSeek-MoE): its own blocks again
        self._measure_row(0, "Baseline (transformers)", None, model, {"variant": "transformers", "steps": []})
        moekern.patch(model)  # from here on the rows run moekern's path; the baseline is not needed again
        self.base = Root(model, "uncompressed")
        try:
            self._base_stats()
        except Exception as exc:  # noqa: BLE001 - the figures are missing; each row calibrates for itself
            print(f"calibration pass on the uncompressed model failed: {type(exc).__name__}: {exc}", flush=True)
        self.slimmed: dict[str, Root] = {}
        prefixes = [slimming_prefix(text, self.args.order) for text in self.args.recipes]
        from moekern.bench.paper_finetune import FinetuneSection

        finetuning = FinetuneSection(self)  # Section 8: some rows fine-tuned after they are measured
        for index, text in enumerate(self.args.recipes, start=1):
            for name in [n for n in self.slimmed if n not in prefixes[index - 1:]]:
                del self.slimmed[name]  # no row left starts with it
            started = time.perf_counter()
            try:
                row_model, info = self._compress(text, index)
            except Exception as exc:  # noqa: BLE001 - the row says what failed; the next row goes on
                self._failed(index, text, exc, started, "compress")
                continue
            self._measure_row(index, info["label"], text, row_model, info, started)
            finetuning.after_row(index, text, row_model, info)
            del row_model
            gc.collect()
        self._baseline_again()

    def _baseline_again(self) -> None:
        """The baseline's speed once more, at the end: how steady the machine was while the rows were timed."""
        import moekern
        from moekern.bench.speed import measure_batches

        model = moekern.unpatch(copy.deepcopy(self.base.model))  # transformers' own model again
        base = {"row": 0, "label": "Baseline (transformers)", "model": self.model_name, "variant": "transformers",
                "recipe": "none", "repeat": True}
        records = measure_batches(model, self.args.batch_sizes, self.args.context, self.args.decode_tokens,
                                  self.bandwidth, lambda record: self.writer.write("speed", **base, **record))
        ok = [r for r in records if r["status"] == "ok"]
        if ok:
            print(f"baseline again: decode {ok[-1]['decode_step_median_s'] * 1e3:.1f} ms/step at b={ok[-1]['batch']}",
                  flush=True)

    def _base_stats(self) -> None:
        """One calibration pass on the uncompressed model: the statistics of every recipe that trims first, the
        layer-wise similarities, the block-wise matrix, and the drop pattern of every count."""
        from moekern.compress.report import drop_sweeps, stats_data
        from moekern.models import family_of

        started = time.perf_counter()
        stats = self._stats(self.base, record_tokens=False, block_tokens=self.args.matrix_tokens)
        top_k = family_of(self.base.model).router_spec(self.base.model.config).top_k
        sweeps = drop_sweeps(stats, top_k, self.args.allow_fewer_experts)
        self.writer.write("stats", of="uncompressed", seconds=round(time.perf_counter() - started, 2),
                          top_k=top_k, **stats_data(stats), sweeps=sweeps)
        print(f"calibration pass on the uncompressed model: {time.perf_counter() - started:.1f} s "
              f"(shared by every recipe that trims first)", flush=True)

    def _stats(self, root: Root, record_tokens: bool, block_tokens: int = 0):
        from moekern.compress.stats import measure

        if record_tokens not in root.stats:
            root.stats[record_tokens] = measure(root.model, self.calibration, record_tokens=record_tokens,
                                                seed=self.args.seed, block_tokens=block_tokens)
        return root.stats[record_tokens]

    # ------------------------------------------------------------------------------------------------------------
    def _compress(self, text: str, index: int):
        """A copy of the right root, compressed by the rest of the recipe; (model, facts about how)."""
        import moekern
        from moekern import surgery
        from moekern.compress.recipe import EnumPrune, Recipe, check_recipe, run_recipe

        if text.lower() in ("none", "-", "moekern"):
            model = copy.deepcopy(self.base.model)
            return model, {"variant": "moekern", "label": "moekern, uncompressed", "steps": [], "reused": []}
        recipe = Recipe.parse(text)
        check_recipe(recipe, self.base.model, self.args.allow_fewer_experts)
        ordered = recipe.ordered(self.args.order)
        root, rest, reused = self.base, ordered, []
        if ordered[0].slimming:
            root = self._slimmed(ordered[0], index)
            rest = ordered[1:]
            reused.append(f"the {root.name} model (made once, {root.seconds:.1f} s)")
        started = time.perf_counter()
        model = copy.deepcopy(root.model)
        steps = list(root.steps)
        if rest:
            first = rest[0]
            base_stats = None
            if not first.slimming:
                base_stats = self._stats(root, isinstance(first, EnumPrune))
                reused.append(f"the calibration statistics of the {root.name} model")
            result = run_recipe(model, Recipe(tuple(rest)), self.calibration, self.args.order, inplace=True,
                                allow_fewer=self.args.allow_fewer_experts, seed=self.args.seed,
                                base_stats=base_stats)
            model, steps = result.model, steps + result.steps
        d = surgery.decisions(model)
        d["recipe"], d["recipe_order"] = str(recipe), self.args.order
        moekern.patch(model)  # blocks swapped in by the compression run moekern's experts too
        return model, {"variant": f"moekern+{recipe}", "label": method_label(recipe, self.base.model),
                       "recipe": str(recipe), "steps": steps, "reused": reused,
                       "compress_seconds": round(time.perf_counter() - started, 2)}

    def _slimmed(self, step, index: int) -> Root:
        from moekern.compress.recipe import Recipe, run_recipe

        name = str(step)
        if name not in self.slimmed:
            started = time.perf_counter()
            model = copy.deepcopy(self.base.model)
            result = run_recipe(model, Recipe((step,)), self.calibration, inplace=True, seed=self.args.seed)
            seconds = time.perf_counter() - started
            self.slimmed[name] = Root(result.model, name, result.steps, seconds)
            self.writer.write("prefix", row=index, step=name, seconds=round(seconds, 2), steps=result.steps)
            print(f"{name}: made once in {seconds:.1f} s for every recipe that starts with it", flush=True)
        return self.slimmed[name]

    # ------------------------------------------------------------------------------------------------------------
    def _measure_row(self, index: int, label: str, text, model, info: dict, started: float | None = None) -> None:
        from moekern.model_info import describe
        from moekern.bench.flops import forward_flops_if_it_fits
        from moekern.bench.speed import measure_batches
        from moekern.compress.report import model_size
        from moekern.eval.harness import HELDOUT_PPL, evaluate
        from moekern.model_info import human_bytes

        args = self.args
        started = started or time.perf_counter()
        recipe = info.get("recipe") or "none"
        base = {"row": index, "label": label, "model": self.model_name, "variant": info["variant"], "recipe": recipe}
        stage = "measure"
        try:
            stage = "flops"
            flops = forward_flops_if_it_fits(model, args.context)
            self.writer.write("model", **base, recipe_text=text, flops=flops, flops_tokens=args.context,
                              decisions=getattr(model.config, "moekern", None), size=model_size(model),
                              steps=info.get("steps"), reused=info.get("reused"),
                              compress_seconds=info.get("compress_seconds"), **describe(model))
            print(f"[{index}] {label}: {human_bytes(describe(model)['weight_bytes'])} weights"
                  + (f", compressed in {info['compress_seconds']:.1f} s" if info.get("compress_seconds") else "")
                  + (f" (reusing {'; '.join(info['reused'])})" if info.get("reused") else ""), flush=True)
            stage = "speed"
            speeds = measure_batches(model, args.batch_sizes, args.context, args.decode_tokens, self.bandwidth,
                                     lambda record: self.writer.write("speed", **base, **record))
            stage = "eval"
            results = {}
            for result in evaluate(model, self.tokenizer, [*self.tasks, HELDOUT_PPL], limit=args.limit,
                                   data_dir=args.data_dir, batch_size=args.eval_batch_size, seed=args.seed):
                self.writer.write("eval", **base, limit=args.limit, **result)
                results[result["task"]] = result["value"]
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001
            self._failed(index, text, exc, started, stage, label)
            return
        seconds = time.perf_counter() - started
        self.writer.write("row", **base, status="ok", seconds=round(seconds, 2))
        ok = [s for s in speeds if s["status"] == "ok"]
        step = f"decode {ok[-1]['decode_step_median_s'] * 1e3:.1f} ms/step at b={ok[-1]['batch']}, " if ok else ""
        scores = ", ".join(f"{k.removeprefix('moekern_')} {v:.4g}" for k, v in results.items())
        print(f"    {step}{scores} ({seconds:.1f} s)", flush=True)

    def _failed(self, index, text, exc, started, stage, label=None) -> None:
        import torch

        from moekern.bench.presets import is_out_of_memory

        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if is_out_of_memory(exc):
            error = f"out of memory ({error})"
        self.writer.write("row", row=index, label=label or text, model=self.model_name, recipe=text,
                          status="error", stage=stage, error=error,
                          seconds=round(time.perf_counter() - started, 2))
        print(f"[{index}] {text}: failed at {stage}: {error}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def slimming_prefix(text: str, order: str) -> str | None:
    """The slimming step a recipe starts with (in this order), or None."""
    from moekern.compress.recipe import Recipe

    try:
        first = Recipe.parse(text).ordered(order)[0]
    except MoekernError:
        return None
    return str(first) if first.slimming else None


def quiet_evaluation() -> None:
    """lm-eval's warnings about being handed a model object, and datasets' bars for the tiny task file, once per row
    say nothing to the reader of this command."""
    import logging

    import datasets

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()


def method_label(recipe, model) -> str:
    """The paper's way of naming a row: '+ E2/8', '+ L2/8 w/ AWQ', 'w/ RTN', ..."""
    from moekern import surgery
    from moekern.compress.recipe import (BlockDrop, EnumPrune, ExpertDrop, LayerDrop, Prune, Quantize, Skip)

    d = surgery.decisions(model)
    layers, experts, moe = d["original_num_hidden_layers"], d["original_num_experts"], len(surgery.moe_layer_ids(model))
    trims, slims = [], []
    for step in recipe.steps:
        if isinstance(step, Quantize):
            slims.append(f"w/ {step.method.upper()}" + ("" if step.group_size == 128 else f" g{step.group_size}")
                         + (" + attention" if step.attention else ""))
        elif isinstance(step, Prune):
            name = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}[step.method]
            slims.append(f"w/ {name} " + (f"{step.n}:{step.m}" if step.n else f"{step.sparsity:.0%}"))
        elif isinstance(step, ExpertDrop):
            trims.append(f"E{step.n}/{experts}" + (" layer-wise" if step.mode == "layerwise" else ""))
        elif isinstance(step, LayerDrop):
            trims.append(f"L{step.n}/{moe}" + (" iterative" if step.iterative else ""))
        elif isinstance(step, BlockDrop):
            trims.append(f"B{step.n}/{layers}" + (" iterative" if step.iterative else ""))
        elif isinstance(step, EnumPrune):
            trims.append(f"keep {step.keep}/{experts} (enumeration)")
        elif isinstance(step, Skip):
            trims.append("skip (beta " + ("median" if step.quantile == 0.5 else f"q{step.quantile}") + ")")
    return " ".join([*(f"+ {t}" for t in trims), *slims])


def source_commit() -> str | None:
    """The git commit of moekern's source tree ('+ uncommitted' when it has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" + uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    import os

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


def run_paper(args) -> int:
    return Paper(args, ["moekern", *getattr(args, "argv", sys.argv[1:])]).run()
