"""Arguments checked where they enter moekern (the Python API and the CLI alike), with errors that name them:
counts that must be positive whole numbers, layer and expert ids that must be integers, devices, and lengths
against the positions a model has.

Type mistakes raise MoekernTypeError (a MoekernError and a TypeError), value mistakes MoekernError; the CLI prints
either as one line.
"""

import math
import operator
import re
import warnings
from collections.abc import Iterable, Mapping

from moekern.errors import MoekernError


class MoekernTypeError(MoekernError, TypeError):
    """An argument of the wrong type (caught as TypeError as well as MoekernError)."""


def _described(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def positive_int(value, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum (a bool or a float is refused, even 2.0: a count is a whole number)."""
    if isinstance(value, bool):
        raise MoekernTypeError(f"{name} must be a whole number >= {minimum}, got {_described(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise MoekernTypeError(f"{name} must be a whole number >= {minimum}, got {_described(value)}") from None
    if number < minimum:
        raise MoekernError(f"{name} must be a whole number >= {minimum}, got {number}")
    return number


def index(value, name: str, noun: str = "integers") -> int:
    """An integer (a layer or expert id, a seed): int, numpy or 0-d torch integer; not a float, bool or string."""
    if isinstance(value, bool):
        raise MoekernTypeError(f"{name} must be {noun}, got {_described(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise MoekernTypeError(f"{name} must be {noun}, got {_described(value)}") from None


def indices(values, name: str, hint: str = "") -> list[int]:
    """A collection of integer ids (list, tuple, set, range, tensor...), not a single number or a string."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise MoekernTypeError(f"{name} must be a list of integer ids, got {_described(values)}{hint}")
    return [index(v, name) for v in values]


def mapping(value, name: str, shape: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise MoekernTypeError(f"{name} must be a mapping {shape}, got {_described(value)}")
    return value


def fraction(value, name: str) -> float:
    """A number in [0, 1] (not a string or bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise MoekernTypeError(f"{name} must be a number in [0, 1], got {_described(value)}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise MoekernError(f"{name} must be in [0, 1], got {value}")
    return number


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(value) -> str:
    """'cpu', 'cuda' or 'cuda:N' (a torch.device too), lower-cased; anything else is refused without importing
    torch."""
    text = str(value).strip().lower()
    found = _DEVICE.fullmatch(text)
    if not found or (found.group(1) == "cpu" and found.group(2) is not None and found.group(2) != "0"):
        raise MoekernError(f"unknown device {str(value)!r}: moekern runs on 'cpu' or 'cuda' (or 'cuda:N')")
    return text


def device(value) -> str | None:
    """A device moekern can run on here: parse_device, and CUDA only where torch sees that GPU. None stays None (the
    caller's default)."""
    if value is None:
        return None
    text = parse_device(value)
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MoekernError(f"device {text!r} was asked for, but torch sees no CUDA device here; use 'cpu'")
        ordinal = int(text.partition(":")[2] or 0)
        if ordinal >= torch.cuda.device_count():
            raise MoekernError(f"device {text!r} does not exist: torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return text


def check_positions(config, length: int, name: str) -> None:
    """A sequence of `length` tokens against the model's max_position_embeddings: beyond it is an error, or a warning
    where the model's RoPE scaling (yarn, dynamic, linear, ...) is built to extrapolate."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or length <= limit:
        return
    scaling = _rope_scaling(text)
    if scaling:
        warnings.warn(f"{name} = {length} is beyond the model's {limit} positions (max_position_embeddings); its "
                      f"{scaling} RoPE scaling extrapolates, but quality may drop", stacklevel=2)
        return
    raise MoekernError(f"{name} = {length} is longer than the model's {limit} positions (max_position_embeddings), "
                       f"and its RoPE has no scaling to extrapolate: use at most {limit}")


def _rope_scaling(config) -> str | None:
    """The rope type of a config when it is not the default one (transformers 5 rope_parameters, or rope_scaling)."""
    for field in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, field, None)
        if not isinstance(rope, dict):
            continue
        params = [v for v in rope.values() if isinstance(v, dict)] or [rope]  # per attention type, or one
        for p in params:
            kind = p.get("rope_type") or p.get("type")
            if kind and kind != "default":
                return kind
    return None
