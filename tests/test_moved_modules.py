"""Modules that moved keep their old import paths, with a DeprecationWarning that names the new place, and the old
names give the very objects of the new modules. Run in a fresh interpreter each: importing an old package path sets
it as an attribute of moekern, which the rest of the suite must not see."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import moekern
from moekern.moved import CALLS, MOVED

ROOT = Path(moekern.__file__).resolve().parents[1]


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:__main__", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_new_home_exists(old):
    for home in MOVED[old]:
        assert importlib.util.find_spec(home) is not None, f"{old} points to {home}, which does not exist"


def test_the_new_entry_points_are_plain_functions():
    assert inspect.isfunction(moekern.compress) and moekern.compress.__module__ == "moekern.compression.recipe"
    assert inspect.isfunction(moekern.finetune) and moekern.finetune.__module__ == "moekern.finetuning.run"
    assert inspect.isfunction(moekern.quantize_) and moekern.QuantConfig.__module__.startswith("moekern.compression")


def test_old_paths_warn_and_give_the_new_objects():
    out = run("""
import warnings
import moekern
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from moekern.quant import QuantConfig, quantize_, load_quantized_folder
    from moekern.quant.layout import pack
    import moekern.quant.hub as hub
    from moekern.compress.stats import measure
    from moekern.finetune.lora import ExpertsLora
    from moekern.layerwise import stream_layers
from moekern.compression.slimming import QuantConfig as Q, quantize_ as q
from moekern.formats.layout import pack as p
from moekern.quantized_folders import load_quantized_folder as l
from moekern.formats.hub_config import read_quantization_config as r
from moekern.compression.trimming.stats import measure as m
from moekern.modules.lora import ExpertsLora as E
from moekern.compression.layerwise import stream_layers as s
old = (QuantConfig, quantize_, load_quantized_folder, pack, measure, ExpertsLora, stream_layers)
assert old == (Q, q, l, p, m, E, s)
assert hub.read_quantization_config is r and hub.load_quantized_folder is l
messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
for old, new in (("moekern.quant", "moekern.compression.slimming"), ("moekern.quant.layout", "moekern.formats.layout"),
                 ("moekern.compress.stats", "moekern.compression.trimming.stats"),
                 ("moekern.finetune.lora", "moekern.finetuning.lora")):
    assert any(m.startswith(f"{old} moved to {new}") for m in messages), (old, messages)
assert all(w.filename == "<string>" for w in caught), [w.filename for w in caught]  # the importing line, not importlib
print("ok")
""")
    assert out.strip() == "ok"


@pytest.mark.parametrize("old", sorted(CALLS))
def test_an_old_package_stays_callable(old):
    """Code that imported moekern.compress (or moekern.finetune) as a package and called it keeps working."""
    module, function = CALLS[old]
    out = run(f"""
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
import moekern, {old} as old
import {module} as new
assert moekern.{old.split('.')[1]} is old and callable(old)
assert old.__call__.__func__ is not None and getattr(new, "{function}") is not None
print(type(old).__name__)
""")
    assert out.strip() == "CallableMovedModule"


def test_an_unknown_name_of_a_moved_module_says_where_it_moved():
    out = run("""
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
import moekern.quant.layout as layout
try:
    layout.no_such_name
except AttributeError as exc:
    print(exc)
""")
    assert "moved to moekern.formats.layout" in out and "no_such_name" in out
