"""What the commands share, and nothing else: argparse types and the loading options, and settings made from parsed
arguments. Loading a model as the commands do and the machine's facts for the records are moekern.runs (the runners
need them too, and a runner imports no command)."""

import argparse
import dataclasses

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
