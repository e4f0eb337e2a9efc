"""Compression: calibration one decoder layer at a time, the methods that decide what to drop (Expert Trimming) or how
to store what stays (Expert Slimming), and the recipe that orders them. The structural edits themselves are in
moekern.surgery; the 4-bit formats the slimming methods write are in moekern.formats.

    calibration.py  token blocks from a local corpus (or the shipped one)
    layerwise.py    calibration data through the model one decoder layer at a time (trimming and slimming alike)
    trimming/       stats.py (one pass: routing scores, similarities, weight ratios, MoE inputs/outputs),
                    expert_drop.py, depth_drop.py (Layer and Block Drop), enum_prune.py, skip.py (beta)
    slimming/       quantize_ (RTN, AWQ, GPTQ) and prune_ (Wanda, SparseGPT), torchao-style configs
    steps/          the kinds of recipe step, one dataclass each (parse, check, apply, label), in a registry
    recipe.py       the recipe string and compress()      shared.py      many recipes from one model, sharing work
    report.py       the report of a compression: markdown, JSON and plots

The one call is the function `moekern.compress(model, recipe, calibration=None, order="ST", ...)`
(moekern.compression.recipe.compress): it returns a compressed copy of the model.
"""

from importlib import import_module

# Imported on first use: the recipe module imports torch.
_LAZY = {"compress": "recipe", "Recipe": "recipe", "CompressionResult": "recipe", "run_recipe": "recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"moekern.compression.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moekern.compression' has no attribute {name!r}")


__all__ = list(_LAZY)
