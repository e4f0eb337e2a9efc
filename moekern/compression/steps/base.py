"""What every recipe step is, the one grammar of a step, and the registry that maps a step's name to its class.

A recipe is steps joined by "+". A step is written

    NAME                 e.g. skip, rtn4
    NAME=VALUE           e.g. layer-drop=2, wanda=0.5, skip=q0.3
    ...:OPTION:OPTION    options after the name or the value, in any order, each once (e.g. gptq4:g64:act)

in any case and with spaces around it. `parse_step` splits a step by this grammar and hands the parts to the class
registered for the name, which says what its value and options mean. A class owns everything about its kind of
step: how it is read (parse) and written (str), what it needs of the model (check, against the worst-case counts
of WorstCase), what it does (apply), and how the paper names it (label).
"""

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from moekern.errors import MoekernError

STEPS: list[type["Step"]] = []  # every registered step class, in the order the help lists them


def register(cls: type["Step"]) -> type["Step"]:
    """Class decorator: make a step class known to the parser, the help and the checks."""
    STEPS.append(cls)
    STEPS.sort(key=lambda c: c.rank)
    return cls


class Step:
    """One step of a recipe. Subclasses are frozen dataclasses whose fields are what the step's text says."""

    names: ClassVar[tuple[str, ...]] = ()  # the names the step is written with
    slimming: ClassVar[bool] = False  # Expert Slimming (at most one per recipe) or Expert Trimming
    once: ClassVar[bool] = False  # may appear at most once in a recipe
    rank: ClassVar[int] = 100  # its place in the help
    syntax: ClassVar[str] = ""  # the short form, for error messages and --help
    example: ClassVar[str] = ""  # one step written out, canonical (str(parse_step(example)) == example)
    help: ClassVar[str] = ""  # the long form: the lines of the recipe's documentation

    @classmethod
    def accepts(cls, name: str) -> bool:
        return name in cls.names

    @classmethod
    def split_value(cls, rest: str, raw: str) -> tuple[str, list[str]]:
        """The text after "=": its value, then the options."""
        value, _, options = rest.partition(":")
        return value, split_options(options or None, raw)

    @classmethod
    def parse(cls, name: str, value: str | None, options: list[str], raw: str) -> "Step":
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, model, worst: "WorstCase", where: str) -> None:
        """Raise MoekernError if this step could fail on a model left as `worst` says; update `worst` to what the
        step can leave."""

    def label(self, shape: "Shape") -> str:
        """The paper's name of the step in a table row: '+ E2/8', 'w/ AWQ', ..."""
        raise NotImplementedError


class SlimmingStep(Step):
    """Expert Slimming: a method of moekern.compression.slimming, run once on the model."""

    slimming = True
    quantizes: ClassVar[bool] = False  # calibrated by a quantization's own data (compress(quant_calibration=...))

    def config(self):
        """The moekern.compression.slimming config that does this step."""
        raise NotImplementedError

    def check(self, model, worst, where):
        self.config().validate()

    def apply(self, model, calibration, *, batch_size: int, device) -> dict:
        """Run the step on `model` in place; what it did, for the report."""
        raise NotImplementedError


class TrimmingStep(Step):
    """Expert Trimming: decided from the calibration statistics of the model as it is when the step runs."""

    slimming = False

    def measure_options(self) -> dict:
        """What moekern.compression.trimming.stats.measure must record for this step (besides the defaults)."""
        return {"record_tokens": False, "enumerate_keep": 0}

    def check(self, model, worst, where):
        if not worst.experts:
            raise MoekernError(f"{where}: no MoE layer is left for it")

    def apply(self, model, stats, *, allow_fewer: bool) -> dict:
        """Run the step on `model` in place from `stats`; what it decided, for the report and the decisions."""
        raise NotImplementedError


class CountedStep(TrimmingStep):
    """A trimming step written NAME=N[:option...], N a whole number >= 1."""

    options: ClassVar[tuple[str, ...]] = ()  # the options it takes; where two exclude each other, the first is default
    exclusive: ClassVar[tuple[frozenset, ...]] = ()

    @classmethod
    def parse(cls, name, value, options, raw):
        if value is None:
            raise MoekernError(f"recipe step {raw!r}: give a count, e.g. {name}=2")
        if not re.fullmatch(r"\d+", value) or int(value) < 1:
            raise MoekernError(f"recipe step {raw!r}: {name} needs a whole number >= 1, got {value!r}")
        for option in options:
            if option not in cls.options:
                what = (f"no option other than :{cls.options[0]}" if len(cls.options) == 1
                        else " or ".join(f":{o}" for o in cls.options))
                raise MoekernError(f"recipe step {raw!r}: {name} takes {what}, not :{option}")
        for group in cls.exclusive:
            if len(group & set(options)) > 1:
                raise MoekernError(f"recipe step {raw!r}: choose one of {' or '.join(sorted(':' + o for o in group))}")
        return cls.from_count(int(value), set(options))

    @classmethod
    def from_count(cls, count: int, options: set[str]) -> "CountedStep":
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------------
# What the checks and the labels know of a model
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class WorstCase:
    """The counts a recipe may leave, followed step by step in the worst case: which layers a data-driven step
    removes is not known in advance, so a Block Drop is assumed to remove MoE layers, a Layer or Block Drop the
    layers with the most experts, and after a global Expert Drop every layer is assumed to be at its minimum."""

    top_k: int
    original_experts: int
    blocks: int  # decoder layers left
    experts: list[int]  # experts left per MoE layer, sorted
    allow_fewer: bool  # a layer may keep fewer experts than top_k


@dataclass(frozen=True)
class Shape:
    """The uncompressed model's sizes, as the paper's labels count them (E2/8: 2 of 8 experts)."""

    layers: int
    experts: int
    moe_layers: int


# ----------------------------------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------------------------------
def syntax() -> str:
    """Every step's short form: what an error about an unknown step lists, and --help."""
    return ", ".join(cls.syntax for cls in STEPS)


def help_text() -> str:
    """Every step's long form, slimming steps first: the recipe's documentation."""
    lines = []
    for slimming, title in ((True, "Expert Slimming (at most one step; needs moekern.compression.slimming)"),
                            (False, "Expert Trimming (in the order written)")):
        lines.append(f"  {title}")
        lines += [cls.help.rstrip("\n") for cls in STEPS if cls.slimming == slimming and cls.help]
    return "\n".join(lines)


def step_class(name: str) -> type[Step] | None:
    return next((cls for cls in STEPS if cls.accepts(name)), None)


def parse_step(text: str) -> Step:
    """One step of a recipe's text (see the module doc)."""
    raw = text
    text = text.strip().lower()
    if not text:
        raise MoekernError("empty step in the recipe (two '+' in a row, or a '+' at an end?)")
    head, equals, rest = text.partition("=")
    if equals:
        name, value, options = head, rest, None
    else:
        name, _, after = head.partition(":")
        value, options = None, split_options(after or None, raw)
    cls = step_class(name)
    if cls is None:
        raise MoekernError(f"unknown recipe step {raw.strip()!r}; the steps are: {syntax()}")
    if equals:
        value, options = cls.split_value(rest, raw)
    return cls.parse(name, value, options, raw)


def split_options(text: str | None, raw: str) -> list[str]:
    """The ":"-separated options after a step's name or value; an empty or repeated one is an error."""
    if text is None:
        return []
    options = text.split(":")
    if "" in options:
        raise MoekernError(f"recipe step {raw!r}: an empty option (two ':' in a row, or a ':' at the end?)")
    if len(set(options)) != len(options):
        raise MoekernError(f"recipe step {raw!r}: an option is repeated")
    return options


def number(text: str, raw: str, expected: str) -> float:
    """A step's numeric value, finite, or an error that says what was expected."""
    try:
        value = float(text)
    except ValueError:
        raise MoekernError(f"recipe step {raw!r}: {text!r} is not a number; expected {expected}") from None
    if not math.isfinite(value):
        raise MoekernError(f"recipe step {raw!r}: expected {expected}")
    return value


def quant_configs(step: Step):
    """The slimming methods' configs (QuantConfig, PruneConfig), or an error that says the build has no Expert
    Slimming."""
    try:
        from moekern.compression.slimming import PruneConfig, QuantConfig
    except ImportError as exc:
        raise MoekernError(
            f"step {step}: Expert Slimming (moekern.compression.slimming) is not available in this build "
            f"({exc})") from exc
    return QuantConfig, PruneConfig
