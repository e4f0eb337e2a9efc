"""`moekern compress MODEL --recipe R --out DIR`: compress a model by a recipe and write the checkpoint (with its
tokenizer) and its report (markdown, JSON, plots) into DIR."""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from moekern.cli.common import add_loading_args, positive_int, settings_from


@dataclass(frozen=True)
class CompressSettings:
    model: str
    recipe: str
    out: Path
    overwrite: bool = False  # replace `out` if it holds a moekern model (never anything else)
    calib: str | None = None  # calibration corpus (None: the shipped training corpus)
    quant_calib: str | None = None  # calibration of a quantization step (AWQ, GPTQ) if not `calib`'s
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    order: str = "ST"
    allow_fewer_experts: bool = False
    batch_size: int = 8
    dtype: str = "float32"
    device: str | None = None
    trust_remote_code: bool = False


class _StepsHelp(argparse.HelpFormatter):
    """Wraps the description as usual and keeps a text of several lines (the steps' help) as it is laid out."""

    def _fill_text(self, text, width, indent):
        return text if "\n" in text else super()._fill_text(text, width, indent)


def add_parser(sub) -> None:
    from moekern.compression.steps import help_text, syntax

    compress = sub.add_parser(
        "compress",
        help="compress a model by a recipe; write the checkpoint and a report",
        description="Compress MODEL by RECIPE, steps joined by '+': " + syntax() + ". "
        "Calibration data is read from --calib (a local .txt, .jsonl, .json (.gz, .zst), .parquet, a folder saved "
        "by datasets, or c4:/pile:/alpaca:PATH) or, by default, from the shipped corpus. Writes the checkpoint "
        "(with its tokenizer) and compress_report.md/.json and plots into --out.",
        epilog="The steps (a step's options follow it after ':', in any order):\n" + help_text() + "\n\n"
        "Example: moekern compress shipped --recipe rtn4+layer-drop=2 --out shipped-rtn4-l2 --samples 32 --seq-len 256",
        formatter_class=_StepsHelp,
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
    compress.set_defaults(run=lambda args: run_compress(settings_from(CompressSettings, args)), writes="model")


def run_compress(settings: CompressSettings) -> int:
    from moekern import runs
    from moekern.arguments import check_positions
    from moekern.checkpoint import save
    from moekern.compression.calibration import calibration_blocks
    from moekern.compression.recipe import Recipe, check_recipe, compress
    from moekern.compression.report import write_report
    from moekern.compression.shared import BLOCK_MATRIX_TOKENS, first_step_stats
    from moekern.model_info import human_bytes, human_count

    s = settings
    started = time.perf_counter()
    recipe = Recipe.parse(s.recipe)  # a typo fails before the model is loaded
    model, tokenizer = runs.load_from_args(s)  # looked up at the call, so that a test can replace it
    check_recipe(recipe, model, s.allow_fewer_experts)
    calibration = None
    if recipe.needs_calibration():
        check_positions(model.config, s.seq_len, "--seq-len")
        calibration = calibration_blocks(tokenizer, s.calib, s.samples, s.seq_len, s.seed)
    # the first trimming step's calibration pass also records the block-wise matrix (Fig. 7) of the report
    base_stats = None if calibration is None else first_step_stats(
        model, recipe, calibration, s.order, seed=s.seed, batch_size=s.batch_size, device=s.device,
        block_tokens=BLOCK_MATRIX_TOKENS)
    result = compress(model, recipe, calibration, s.order, allow_fewer=s.allow_fewer_experts, inplace=True,
                      seed=s.seed, batch_size=s.batch_size, device=s.device, base_stats=base_stats,
                      quant_calibration=s.quant_calib, tokenizer=tokenizer, samples=s.samples, seq_len=s.seq_len,
                      return_result=True)
    written = []  # the report goes into the checkpoint's temporary folder: both appear together, or neither
    save(result.model, s.out, tokenizer=tokenizer, overwrite=s.overwrite,
         add_files=lambda folder: written.extend(write_report(result, folder)))
    b, a = result.before, result.after
    print(f"recipe      {result.recipe} (order {result.order})")
    for step in result.steps:
        decided = {k: v for k, v in step.items() if k not in ("step", "kind", "seconds", "report")}
        print(f"  {step['step']:<20} {step['seconds']:>7.1f} s  {json.dumps(decided, default=str)[:100]}")
    print(f"parameters  {human_count(b['parameters'])} -> {human_count(a['parameters'])}")
    print(f"weights     {human_bytes(b['state_bytes'])} -> {human_bytes(a['state_bytes'])}")
    print(f"checkpoint  {s.out} ({time.perf_counter() - started:.1f} s)")
    print(f"report      {', '.join(p.name for p in written)}")
    return 0
