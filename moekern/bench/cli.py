"""Deprecated: the `bench`, `eval`, `report` and `paper` commands are modules of moekern.cli now, and their runners
are in moekern.bench.harness and moekern.bench.paper. The names this module had, where they are now."""

import warnings

_MOVED = {"DEFAULT_OUT": "moekern.bench.harness", "load_model": "moekern.bench.harness",
          "run_bench": "moekern.bench.harness", "run_eval": "moekern.bench.harness",
          "run_report": "moekern.bench.harness", "batch_list": "moekern.cli.common",
          "_environment": "moekern.runs"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'moekern.bench.cli' has no attribute {name!r}")
    from importlib import import_module

    where = _MOVED[name]
    warnings.warn(f"moekern.bench.cli.{name} is deprecated; use {where}", DeprecationWarning, stacklevel=2)
    return getattr(import_module(where), "environment" if name == "_environment" else name)
