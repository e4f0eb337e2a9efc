"""The one exception type for mistakes a user can fix; the CLI prints its message without a traceback. And the one
check for an optional dependency (an extra of the package) that a command needs and the environment lacks."""

from importlib import import_module

# Which extra of the package installs each optional dependency (pyproject.toml, [project.optional-dependencies]).
EXTRAS = {
    "lm_eval": "eval",
    "datasets": "eval",
    "pyarrow": "eval",
    "matplotlib": "report",
    "peft": "finetune",
}


class MoekernError(Exception):
    """Bad input: the message says what was wrong and what to do instead."""


def require(module: str, purpose: str):
    """Import `module` (a dotted name) from an optional dependency, or raise MoekernError naming the extra that
    installs it. purpose: what needs it, for the message ("lm-eval tasks")."""
    top = module.split(".")[0]
    try:
        return import_module(module)
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but something inside it failed to import: not a missing extra
        extra = EXTRAS.get(top)
        how = f"pip install 'moekern[{extra}]'" if extra else f"pip install {top}"
        raise MoekernError(f"{purpose} needs {top}, which is not installed: run {how}") from exc
