"""What every runner shares (the commands' runners in moekern/cli/ and those in moekern.bench): the settings' device
resolved, a model loaded as the commands load it, and the facts about the machine a record carries. Settings are any
object with the fields named below (the commands' frozen dataclasses)."""

import dataclasses
import os
import platform
import subprocess
from pathlib import Path

from moekern.errors import MoekernError


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
            else f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)")
    return {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": source_commit()}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


def source_commit() -> str | None:
    """The git commit of moekern's source tree ('+ uncommitted' when it has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
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
