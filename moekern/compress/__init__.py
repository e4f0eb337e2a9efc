"""Compression: calibration one decoder layer at a time, the methods that decide what to drop or quantize, and the
recipe that orders them. The structural edits themselves are in moekern.surgery.

    calibration.py  token blocks from a local corpus (or the shipped one)
    stats.py        one calibration pass recording routing scores, similarities, weight ratios, MoE inputs/outputs
    expert_drop.py  Expert Drop (layer-wise, global)      depth_drop.py  Layer Drop and Block Drop
    enum_prune.py   enumeration expert pruning            skip.py        dynamic skipping (beta)
    steps/          the kinds of recipe step, one dataclass each (parse, check, apply, label), in a registry
    recipe.py       the recipe string and compress()      shared.py      many recipes from one model, sharing work
    report.py       the report of a compression: markdown, JSON and plots

`moekern.compress(model, recipe, calibration=None, order="ST", ...)` is the function compress of recipe.py (it
returns a compressed copy of the model; see there), also `moekern.compress.compress`. A package and a function
cannot share the name `moekern.compress` (Python sets the package as that attribute once any submodule is
imported), so the package's module class calls that function: one function, three spellings.
"""

import sys
import types

__all__ = ["compress", "Recipe", "CompressionResult", "run_recipe"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from moekern.compress.recipe import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage


def __getattr__(name: str):
    # imported on first use (the recipe module imports torch); __signature__ is what help(moekern.compress) shows
    if name in __all__ or name == "__signature__":
        from moekern.compress import recipe

        if name == "__signature__":
            import inspect

            return inspect.signature(recipe.compress)
        return getattr(recipe, name)
    raise AttributeError(f"module 'moekern.compress' has no attribute {name!r}")
