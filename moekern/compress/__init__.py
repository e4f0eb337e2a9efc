"""Compression: calibration one decoder layer at a time, the methods that decide what to drop or quantize, and the
recipe that orders them. The structural edits themselves are in moekern.surgery.

    calibration.py  token blocks from a local corpus (or the shipped one)
    stats.py        one calibration pass recording routing scores, similarities, weight ratios, MoE inputs/outputs
    expert_drop.py  Expert Drop (layer-wise, global)      depth_drop.py  Layer Drop and Block Drop
    enum_prune.py   enumeration expert pruning            skip.py        dynamic skipping (beta)
    recipe.py       the recipe string and compress()      report.py      markdown, JSON and plots

The package itself is callable: `moekern.compress(model, recipe, calibration=None, order="ST", **options)` is
moekern.compress.recipe.compress (it returns a compressed copy of the model; see there). The function and the
package would otherwise compete for the name `moekern.compress`, since Python sets the package as that attribute
once any submodule is imported; so `moekern.compress` is always this package, and it forwards calls.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, model, recipe, calibration=None, order="ST", **options):
        from moekern.compress.recipe import compress

        return compress(model, recipe, calibration, order, **options)


sys.modules[__name__].__class__ = _CallablePackage
compress = sys.modules[__name__]  # what moekern's lazy table looks up: the callable package itself
