"""moekern: compress Mixture-of-Experts language models and run them fast on one GPU.

    import moekern
    moekern.patch(model)                          # moekern's experts path under transformers' MoE modules
    moekern.drop_experts(model, {0: [0, 2, 5]})   # structural edits, recorded in model.config.moekern
    moekern.save(model, "out/")                   # safetensors, written atomically
    model, tokenizer = moekern.load("out/")

Kernels live in `moekern.ops` (Triton, CUDA, and the PyTorch reference they are tested against), the drop-in HF
modules in `moekern.modules`, one adapter per model family in `moekern.models`, and the command line in `moekern.cli`.
"""

from importlib import import_module

from moekern import architectures, moved
from moekern.errors import MoekernError
from moekern.version import __version__

# moekern's model types (checkpoints transformers' own classes cannot hold) join transformers' Auto classes as soon
# as those are imported, without importing transformers here.
architectures.install()
# The old import paths of moved modules keep working, with a DeprecationWarning (moekern/moved.py).
moved.install()

# Imported on first use, so that `moekern --help` does not pay for importing transformers.
_LAZY = {
    "patch": "moekern.patching",
    "unpatch": "moekern.patching",
    "save": "moekern.checkpoint",
    "load": "moekern.checkpoint",
    "drop_experts": "moekern.surgery",
    "remove_moe_layers": "moekern.surgery",
    "remove_blocks": "moekern.surgery",
    "set_skip_beta": "moekern.surgery",
    "compress": "moekern.compression.recipe",  # moekern.compress(model, recipe, ...): a compressed copy
    "finetune": "moekern.finetuning.run",  # moekern.finetune(model, data, out, config, ...)
    "quantize_": "moekern.compression.slimming.apply",  # torchao-style: quantize_(model, QuantConfig(...), ids)
    "prune_": "moekern.compression.slimming.apply",
    "QuantConfig": "moekern.compression.slimming.config",
    "PruneConfig": "moekern.compression.slimming.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekern' has no attribute {name!r}")


__all__ = ["MoekernError", "__version__", *_LAZY]
