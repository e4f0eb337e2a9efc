"""The kinds of recipe step, one module each (Layer Drop and Block Drop share one): each defines a dataclass that
owns how the step is written (parse, str), what it needs of the model (check), what it does (apply) and how the
paper names it (label), and registers it with @register (base.py, which also states the grammar of a step once).

Every module of this package is imported here, so adding a kind of step is one new file here (plus its test):
the parser, the error messages, `moekern compress --help` and the paper's labels find it in the registry.
"""

import importlib
import pkgutil

from moekern.compression.steps.base import (STEPS, CountedStep, Shape, SlimmingStep, Step, TrimmingStep, WorstCase,
                                         help_text, parse_step, register, syntax)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

from moekern.compression.steps.depth_drop import BlockDrop, LayerDrop  # noqa: E402
from moekern.compression.steps.enum_prune import EnumPrune  # noqa: E402
from moekern.compression.steps.expert_drop import ExpertDrop  # noqa: E402
from moekern.compression.steps.prune import Prune  # noqa: E402
from moekern.compression.steps.quantize import Quantize  # noqa: E402
from moekern.compression.steps.skip import Skip  # noqa: E402

__all__ = ["STEPS", "Step", "SlimmingStep", "TrimmingStep", "CountedStep", "WorstCase", "Shape", "register",
           "parse_step", "syntax", "help_text", "Quantize", "Prune", "ExpertDrop", "LayerDrop", "BlockDrop",
           "EnumPrune", "Skip"]
