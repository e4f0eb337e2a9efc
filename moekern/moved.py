"""The old import paths of modules that moved, kept working with a DeprecationWarning that names the new place.

`import moekern.quant.layout` gives a stand-in module whose attributes are read, on each access, from
moekern.formats.layout: the two never disagree. The old packages moekern.compress and moekern.finetune stay callable
as they were. Patch the new module, not the stand-in: code runs there. moekern/__init__.py installs the finder; it
answers only for the names in MOVED.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules its names now live in, searched in order
MOVED = {
    "moekern.compress": ("moekern.compression",),
    "moekern.compress.layerwise": ("moekern.compression.layerwise",),
    "moekern.layerwise": ("moekern.compression.layerwise",),
    "moekern.finetune": ("moekern.finetuning",),
    "moekern.finetune.cli": ("moekern.cli.finetune",),
    "moekern.quant": ("moekern.compression.slimming", "moekern.quantized_folders"),
    "moekern.quant.layout": ("moekern.formats.layout",),
    "moekern.quant.formats": ("moekern.formats.published",),
    "moekern.quant.hub": ("moekern.quantized_folders", "moekern.formats.hub_config"),
    "moekern.quant.targets": ("moekern.targets",),
    "moekern.quant.rebuild": ("moekern.checkpoint",),
    "moekern.eval.perplexity": ("moekern.perplexity",),
}
MOVED.update({f"moekern.compress.{m}": (f"moekern.compression.{m}",)
              for m in ("calibration", "recipe", "report", "shared", "steps", "steps.base", "steps.depth_drop",
                        "steps.enum_prune", "steps.expert_drop", "steps.prune", "steps.quantize", "steps.skip")})
MOVED.update({f"moekern.compress.{m}": (f"moekern.compression.trimming.{m}",)
              for m in ("depth_drop", "enum_prune", "expert_drop", "skip", "stats")})
MOVED.update({f"moekern.quant.{m}": (f"moekern.compression.slimming.{m}",)
              for m in ("apply", "autoawq", "awq", "calibrate", "config", "ffn", "gptq", "hessian", "linears", "prune",
                        "rtn")})
FINETUNE = {f"moekern.finetune.{m}": (f"moekern.finetuning.{m}",)
            for m in ("config", "data", "lora", "report", "run", "train")}
MOVED.update(FINETUNE)

# the old packages that were callable, and the function each call went to
CALLS = {"moekern.compress": ("moekern.compression.recipe", "compress"),
         "moekern.finetune": ("moekern.finetuning.run", "finetune")}


class MovedModule(types.ModuleType):
    """A module that moved: its attributes are the new modules' (submodules of an old package are stand-ins too)."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"moved: {', '.join(homes)}")
        self.__homes = homes
        if any(other.startswith(name + ".") for other in MOVED):
            self.__path__ = []  # a package: its old submodules import through the finder below

    def __getattr__(self, attr: str):
        for home in self.__homes:
            value = getattr(importlib.import_module(home), attr, _MISSING)
            if value is not _MISSING:
                return value
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__homes)}) has no attribute {attr!r}")


class CallableMovedModule(MovedModule):
    def __call__(self, *args, **kwargs):
        module, function = CALLS[self.__name__]
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


_MISSING = object()


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        kind = CallableMovedModule if spec.name in CALLS else MovedModule
        return kind(spec.name, MOVED[spec.name])

    def exec_module(self, module):
        homes = " or ".join(MOVED[module.__name__])
        # stacklevel 2 is the importing line: warnings skips the import machinery's own frames
        warnings.warn(f"{module.__name__} moved to {homes}; import it from there", DeprecationWarning, stacklevel=2)


def install() -> None:
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
