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

Calibration is shared where that is exact (moekern.compression.shared):
  - one pass on the uncompressed model gives the statistics of every recipe whose first step is a trimming step
    (moekern.compress(base_stats=...)); the same pass records the layer-wise similarities (Fig. 4),
    the block-wise similarity matrix (Fig. 7) and the drop patterns for every count (Figs. 10, 12);
  - a slimming step that comes first (order ST: awq4 in awq4+block-drop=2) runs once, and each recipe that starts with
    it continues from a copy of that model, with one calibration pass of the slimmed model for all of them.
A recipe that cannot be parsed, that does not fit the model, or whose row fails (out of memory, ...) becomes a row
that says so, and the next row goes on.
"""

import copy
import gc
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from moekern.bench.harness import DEFAULT_OUT
from moekern.bench.paper_finetune import FINETUNE_BATCH, FINETUNE_LR, FINETUNE_RECIPES, FINETUNE_STEPS
from moekern.runs import environment, machine, source_commit, with_device
from moekern.compression.shared import BLOCK_MATRIX_TOKENS
from moekern.errors import MoekernError

__all__ = ["Paper", "PaperSettings", "run_paper", "method_label", "machine", "source_commit"]

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


@dataclass(frozen=True)
class PaperSettings:
    """What `moekern paper` runs; None where the device decides (GPU_SPEED or CPU_SPEED, GPU_ or CPU_CALIBRATION)."""

    model: str = "shipped"
    out: Path = DEFAULT_OUT / "paper"
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))  # one row each after the baseline
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # lm-eval tasks besides held-out ppl
    limit: int | None = None  # examples per task and perplexity windows of 256 tokens
    data_dir: Path | None = None  # where the paper's tasks' datasets are
    calib: str | None = None  # calibration corpus (None: the shipped training corpus)
    samples: int | None = None  # calibration blocks
    seq_len: int | None = None  # tokens per calibration block
    seed: int = 0
    order: str = "ST"
    allow_fewer_experts: bool = False
    matrix_tokens: int = BLOCK_MATRIX_TOKENS  # calibration tokens behind the block-wise similarity matrix
    context: int | None = None  # prompt tokens of the speed runs
    batch_sizes: list[int] | None = None
    decode_tokens: int | None = None
    eval_batch_size: int = 8
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    device: str | None = None
    trust_remote_code: bool = False
    figures: list[str] = field(default_factory=list)  # moekern.bench.paper_extras
    tables: list[str] = field(default_factory=list)
    calib2: str | None = None
    finetune_steps: int = FINETUNE_STEPS  # moekern.bench.paper_finetune (0 leaves the section out)
    finetune_lr: float = FINETUNE_LR
    finetune_batch: int = FINETUNE_BATCH
    finetune_recipes: list[str] = field(default_factory=lambda: list(FINETUNE_RECIPES))
    finetune_data: str | None = None

    def for_device(self) -> "PaperSettings":
        """These settings with the device, the dtype, and the speed and calibration sizes resolved."""
        s = with_device(self)
        gpu = s.device.startswith("cuda")
        speed = GPU_SPEED if gpu else CPU_SPEED
        calib = GPU_CALIBRATION if gpu else CPU_CALIBRATION
        return replace(s, context=s.context or speed["context"], batch_sizes=s.batch_sizes or speed["batch_sizes"],
                       decode_tokens=s.decode_tokens or speed["decode_tokens"], samples=s.samples or calib["samples"],
                       seq_len=s.seq_len or calib["seq_len"])


class Paper:
    def __init__(self, settings: PaperSettings, argv: list[str]):
        self.args, self.argv = settings, argv  # (`args`: what extras and fine-tuning read the settings as)
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> int:
        import torch

        from moekern.bench.bandwidth import copy_bandwidth
        from moekern.bench.harness import load_model
        from moekern.bench.records import RecordWriter
        from moekern.eval.harness import HELDOUT_PPL, check_tasks

        args = self.args
        self.tasks = [t for t in args.tasks if t != HELDOUT_PPL]
        check_tasks([*self.tasks, HELDOUT_PPL])
        if args.data_dir is not None and not args.data_dir.is_dir():
            raise MoekernError(f"--data-dir {str(args.data_dir)!r} is not a folder")
        self.args = args = args.for_device()
        model, tokenizer, origin = load_model(args)
        if tokenizer is None:
            raise MoekernError(f"{args.model!r} is a preset with random weights and no tokenizer: give a model "
                               f"folder (or 'shipped')")
        gpu = args.device.startswith("cuda")
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
        from moekern.compression.calibration import calibration_blocks

        self.calibration = calibration_blocks(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
        self.writer.write(
            "run", command="paper", argv=self.argv, model=self.model_name, **origin | {"notes": notes},
            device=args.device, dtype=args.dtype, context=args.context, batch_sizes=args.batch_sizes,
            decode_tokens=args.decode_tokens, tasks=[*self.tasks, HELDOUT_PPL], limit=args.limit,
            calibration={"source": args.calib or "shipped training corpus", "samples": int(self.calibration.shape[0]),
                         "seq_len": int(self.calibration.shape[1]), "seed": args.seed},
            order=args.order, recipes=args.recipes, matrix_tokens=args.matrix_tokens,
            copy_bandwidth_bytes_s=self.bandwidth, python=platform.python_version(),
            threads=torch.get_num_threads(), machine=machine(), **environment(args.device))
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

        from moekern.bench.memory import is_out_of_memory

        try:  # once at the full size before anything is timed: the first large forward pays for allocations
            prefill_and_decode(model, max(self.args.batch_sizes), self.args.context, 2)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
        moekern.unpatch(model)  # a remote-code model moekern adopted at load (DeepSeek-MoE): its own blocks again
        self._measure_row(0, "Baseline (transformers)", None, model, {"variant": "transformers", "steps": []})
        moekern.patch(model)  # from here on the rows run moekern's path; the baseline is not needed again
        from moekern.compression.shared import SharedCompression

        self.shared = SharedCompression(model, self.calibration, order=self.args.order,
                                        allow_fewer=self.args.allow_fewer_experts, seed=self.args.seed)
        self.shared.on_slimmed = self._slimmed
        self.base = self.shared.base
        try:
            self._base_stats()
        except Exception as exc:  # noqa: BLE001 - the figures are missing; each row calibrates for itself
            print(f"calibration pass on the uncompressed model failed: {type(exc).__name__}: {exc}", flush=True)
        prefixes = [slimming_prefix(text, self.args.order) for text in self.args.recipes]
        from moekern.bench.paper_finetune import FinetuneSection

        finetuning = FinetuneSection(self)  # Section 8: some rows fine-tuned after they are measured
        for index, text in enumerate(self.args.recipes, start=1):
            self.shared.keep_slimmed(prefixes[index - 1:])  # free those no row left starts with
            self.row = index
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
        from moekern.compression.report import drop_sweeps, stats_data
        from moekern.models import family_of

        started = time.perf_counter()
        stats = self._stats(self.base, record_tokens=False, block_tokens=self.args.matrix_tokens)
        top_k = family_of(self.base.model).router_spec(self.base.model.config).top_k
        sweeps = drop_sweeps(stats, top_k, self.args.allow_fewer_experts)
        self.writer.write("stats", of="uncompressed", seconds=round(time.perf_counter() - started, 2),
                          top_k=top_k, **stats_data(stats), sweeps=sweeps)
        print(f"calibration pass on the uncompressed model: {time.perf_counter() - started:.1f} s "
              f"(shared by every recipe that trims first)", flush=True)

    def _stats(self, root, record_tokens: bool, block_tokens: int = 0):
        return self.shared.stats(root, {"record_tokens": record_tokens, "enumerate_keep": 0}, block_tokens)

    # ------------------------------------------------------------------------------------------------------------
    def _compress(self, text: str, index: int):
        """A copy of the right root, compressed by the rest of the recipe (moekern.compression.shared); (model, facts
        about how)."""
        import moekern
        from moekern.compression.recipe import paper_label

        if text.lower() in ("none", "-", "moekern"):
            model = copy.deepcopy(self.base.model)
            return model, {"variant": "moekern", "label": "moekern, uncompressed", "steps": [], "reused": []}
        done = self.shared.compress(text)
        moekern.patch(done.model)  # blocks swapped in by the compression run moekern's experts too
        recipe = done.recipe
        return done.model, {"variant": f"moekern+{recipe}", "label": paper_label(recipe, self.base.model),
                            "recipe": str(recipe), "steps": done.steps, "reused": [str(s) for s in done.shared],
                            "shared": [_record(s) for s in done.shared],
                            "compress_seconds": round(done.seconds, 2)}

    def _slimmed(self, root) -> None:
        """A slimming step made once for every recipe that starts with it: recorded as a prefix."""
        self.writer.write("prefix", row=self.row, step=root.name, seconds=round(root.seconds, 2), steps=root.steps)
        print(f"{root.name}: made once in {root.seconds:.1f} s for every recipe that starts with it", flush=True)

    # ------------------------------------------------------------------------------------------------------------
    def _measure_row(self, index: int, label: str, text, model, info: dict, started: float | None = None) -> None:
        from moekern.model_info import describe
        from moekern.bench.flops import forward_flops_if_it_fits
        from moekern.bench.speed import measure_batches
        from moekern.compression.report import model_size
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
                              steps=info.get("steps"), reused=info.get("reused"), shared=info.get("shared"),
                              compress_seconds=info.get("compress_seconds"), **describe(model))
            print(f"[{index}] {label}: {human_bytes(describe(model)['weight_bytes'])} weights"
                  + (f", compressed in {info['compress_seconds']:.1f} s" if info.get("compress_seconds") else "")
                  + (f" (reusing {'; '.join(info['reused'])})" if info.get("reused") else ""),
                  flush=True)
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

        from moekern.bench.memory import is_out_of_memory

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
    from moekern.compression.recipe import Recipe

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
    """The paper's way of naming a row (moekern.compression.recipe.paper_label, which each step's label makes)."""
    from moekern.compression.recipe import paper_label

    return paper_label(recipe, model)


def _record(shared) -> dict:
    """A row's record of work it shared (moekern.compression.shared.Shared), seconds to the hundredth."""
    return {**vars(shared), "seconds": None if shared.seconds is None else round(shared.seconds, 2)}


def run_paper(settings: PaperSettings, argv: list[str] | None = None) -> int:
    """The paper's comparison by `settings`; `argv`, the command as typed, goes into the records."""
    return Paper(settings, argv or ["moekern", "paper"]).run()
