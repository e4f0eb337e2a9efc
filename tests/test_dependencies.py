"""What `import moekern` costs: the core (patch, load, save) needs neither lm-eval, datasets, matplotlib nor peft,
and a command that needs one of these extras says which `pip install 'moekern[...]'` brings it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekern.errors import MoekernError, require

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("lm_eval", "datasets", "matplotlib", "peft", "pyarrow")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_import_and_patch_load_no_extra():
    done = run_python(
        "import sys\n"
        "import moekern\n"
        "moekern.patch, moekern.load, moekern.save, moekern.drop_experts\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({EXTRAS!r})))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_core_works_with_the_extras_absent(tmp_path):
    # None in sys.modules is how Python spells "not installed": import fails, importlib.util.find_spec says None
    hidden = (*EXTRAS, "accelerate")
    done = run_python(
        "import sys\n"
        f"for name in {hidden!r}:\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        "import moekern\n"
        "model, tokenizer = moekern.load('shipped', dtype=torch.float32)\n"
        "ids = tokenizer('The quick brown fox', return_tensors='pt').input_ids\n"
        "before = model(ids).logits\n"
        "moekern.patch(model)\n"
        "moekern.drop_experts(model, {0: [0, 1, 2, 3, 4, 5]})\n"
        f"moekern.save(model, {str(tmp_path / 'out')!r}, tokenizer)\n"
        f"again, _ = moekern.load({str(tmp_path / 'out')!r})\n"
        "after = model(ids).logits\n"
        "assert before.shape == after.shape\n"
        "assert torch.allclose(again(ids).logits, after, atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("module, extra", [("lm_eval", "eval"), ("datasets", "eval"), ("matplotlib.pyplot", "report"),
                                           ("peft.tuners.lora", "finetune")])
def test_a_missing_extra_names_its_install_command(monkeypatch, module, extra):
    for name in {module.split(".")[0], module}:  # the submodule too: another test may have imported it already
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MoekernError, match=rf"pip install 'moekern\[{extra}\]'"):
        require(module, "this command")


def test_require_returns_the_module():
    import json

    assert require("json", "reading JSON") is json
