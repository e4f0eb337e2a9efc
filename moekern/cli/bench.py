"""`moekern bench MODEL`: decode speed at a long context, memory and FLOPs, transformers against moekern
(moekern.bench.harness.run_bench)."""

from pathlib import Path

from moekern.cli.common import add_loading_args, batch_list, device_dependent_dtype, positive_int, settings_from


def add_parser(sub) -> None:
    from moekern.bench.harness import DEFAULT_OUT
    from moekern.bench.presets import PRESETS

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
    device_dependent_dtype(bench)
    bench.set_defaults(run=run, writes="runs")


def run(args) -> int:
    from moekern.bench.harness import BenchSettings, run_bench

    return run_bench(settings_from(BenchSettings, args))
