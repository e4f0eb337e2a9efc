"""What the commands share, and nothing else: argparse types and the loading options, settings made from parsed
arguments, loading a model as the commands do, and the facts about the machine a record carries. A leaf: it imports
no command and no runner, so runners may use it too."""

import argparse
import dataclasses
import os
import platform
import subprocess
from pathlib import Path

from moekern.errors import MoekernError

DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------------------------------
def add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default: float32)")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda or cuda:N (default: cuda where available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own Python code to run (off by default: read it first)")


def device_dependent_dtype(parser: argparse.ArgumentParser) -> None:
    """--dtype defaults to None: bfloat16 on a GPU, float32 on the CPU (resolved by with_device)."""
    parser.set_defaults(dtype=None)
    next(a for a in parser._actions if a.dest == "dtype").help = "weights' dtype (default: bfloat16 on a GPU, " \
        "float32 on the CPU)"


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


def batch_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def names(text: str) -> list[str]:
    """A comma-separated list (tasks, recipes), empty parts left out."""
    return [part.strip() for part in text.split(",") if part.strip()]


def settings_from(cls, args: argparse.Namespace, **extra):
    """The settings dataclass `cls` from parsed arguments (the fields it has; the rest keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**given | extra)


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------
def with_device(settings):
    """The settings with the device resolved (cuda where available) and, where not given, the dtype for it
    (bfloat16 on a GPU, float32 on the CPU): a copy, the given settings are left as they are."""
    import torch

    from moekern.arguments import device as usable_device

    device = usable_device(settings.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return dataclasses.replace(settings, device=device, dtype=dtype)


def load_from_args(settings):
    """(model, tokenizer) of a local folder or 'shipped' from settings with model, dtype, device and
    trust_remote_code; a folder without a tokenizer is refused."""
    import torch

    from transformers.utils import logging as hf_logging

    from moekern.checkpoint import load

    hf_logging.disable_progress_bar()  # a bar for loading a few shards says nothing to a reader of this report
    from moekern.arguments import device as usable_device

    device = usable_device(settings.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(settings.model, dtype=getattr(torch, settings.dtype), device=device,
                            trust_remote_code=settings.trust_remote_code)
    if tokenizer is None:
        raise MoekernError(f"{settings.model!r} has no tokenizer files; save the model with its tokenizer")
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# the machine, for the records
# ----------------------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch
    import transformers

    name = (torch.cuda.get_device_name(device) if device.startswith("cuda")
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__}


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


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
