"""`moekern info [MODEL]`: load a model (default: the shipped one), report its size, memory and held-out
perplexity, and generate a short text."""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from moekern.cli.common import add_loading_args, positive_int, settings_from
from moekern.errors import MoekernError


@dataclass(frozen=True)
class InfoSettings:
    model: str = "shipped"
    prompt: str = "The with statement"
    max_new_tokens: int = 32
    ppl_tokens: int | None = None  # score only the first N held-out tokens
    seq_len: int = 256  # perplexity window
    json: Path | None = None  # also write the figures here
    dtype: str = "float32"
    device: str | None = None
    trust_remote_code: bool = False


def add_parser(sub) -> None:
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
    info.set_defaults(run=lambda args: run_info(settings_from(InfoSettings, args)))


def run_info(settings: InfoSettings) -> int:
    import torch

    from moekern import runs
    from moekern.arguments import check_positions
    from moekern.perplexity import mean_nll, token_windows
    from moekern.model_info import describe, human_bytes, human_count, peak_memory_bytes
    from moekern.shipped import heldout_text

    s = settings
    started = time.perf_counter()
    model, tokenizer = runs.load_from_args(s)  # looked up at the call, so that a test can replace it
    check_positions(model.config, s.seq_len, "--seq-len")
    device = next(model.parameters()).device
    facts = describe(model)
    facts["model"] = str(s.model)
    facts["device"] = str(device)
    facts["load_seconds"] = round(time.perf_counter() - started, 2)

    try:
        windows = token_windows(tokenizer, heldout_text(), s.seq_len, max_tokens=s.ppl_tokens)
    except ValueError as exc:
        raise MoekernError(f"{exc}: lower --seq-len or raise --ppl-tokens") from exc
    facts["heldout_tokens"] = int(windows.numel())
    facts["perplexity"] = math.exp(mean_nll(model, windows))
    if not math.isfinite(facts["perplexity"]):
        raise MoekernError(f"the perplexity of {s.model!r} is {facts['perplexity']}: the model gives non-finite "
                           f"logits on the held-out text" + (" (in float16: try --dtype bfloat16 or float32)"
                                                             if s.dtype == "float16" else ""))

    prompt = tokenizer(s.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=s.max_new_tokens, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=tokenizer.pad_token_id)
    facts["sample"] = tokenizer.decode(out[0], skip_special_tokens=True)
    facts["peak_memory_bytes"] = peak_memory_bytes(device)

    experts = (f"{human_count(facts['expert_parameters'])} in routed experts "
               f"({facts['layers']} layers x {facts['experts']} experts, top-{facts['top_k']})"
               if facts["experts"] else "dense model")
    peak_kind = "allocated" if device.type == "cuda" else "resident (whole process)"
    rows = [
        ("model", f"{s.model}: {facts['architecture']} ({facts['model_type']})"),
        ("parameters", f"{human_count(facts['parameters'])}, {experts}"),
        ("weights", f"{human_bytes(facts['weight_bytes'])} as {facts['dtype']} on {device}"),
        ("peak memory", f"{human_bytes(facts['peak_memory_bytes'])} {peak_kind}"),
        ("perplexity", f"{facts['perplexity']:.2f} on {facts['heldout_tokens']:,} held-out tokens "
                       f"(windows of {s.seq_len})"),
        ("sample", repr(facts["sample"])),
        ("kernels", kernels_line(model, facts)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if s.json:
        from moekern.folders import write_file

        write_file(s.json, json.dumps(facts, indent=2) + "\n")
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
