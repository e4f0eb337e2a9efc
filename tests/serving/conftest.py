"""Fixtures of the serving tests: the serving environment (vLLM + moekern's plugin), the shipped model compressed
by each recipe, and `moekern serve` started on 127.0.0.1 and stopped again.

Run with `MOEKERN_SERVING_VENV=<env> python -m pytest tests/serving` (.ci/run creates the environment). These tests
never run in the main suite (tests/conftest.py)."""

import os
from pathlib import Path

import pytest
import torch

from moekern.serving.client import ServedModel

SAMPLES, SEQ_LEN = 16, 128  # calibration of the recipes: small, the tests compare serving, not quality
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


@pytest.fixture(scope="session")
def serving_venv() -> str:
    venv = os.environ.get("MOEKERN_SERVING_VENV")
    if not venv:
        pytest.fail("set MOEKERN_SERVING_VENV to moekern's serving environment (see requirements-serving.txt)")
    return venv


@pytest.fixture(scope="session")
def shipped_fp32():
    from moekern.shipped import load_model

    return load_model(torch.float32)


@pytest.fixture(scope="session")
def calibration(shipped_fp32):
    from moekern.compression.calibration import calibration_blocks

    return calibration_blocks(shipped_fp32[1], samples=SAMPLES, seq_len=SEQ_LEN)


@pytest.fixture(scope="session")
def compressed(tmp_path_factory, shipped_fp32, calibration):
    """compressed(recipe) -> the folder of the shipped model compressed by `recipe` (made once per session)."""
    import moekern

    model, tokenizer = shipped_fp32
    made = {}

    def make(recipe: str) -> Path:
        if recipe not in made:
            result = moekern.compress(model, recipe, calibration)
            folder = tmp_path_factory.mktemp(recipe.replace("=", "").replace(":", "-").replace("+", "_"))
            moekern.save(result, folder / "model", tokenizer=tokenizer)
            made[recipe] = folder / "model"
        return made[recipe]

    return make


@pytest.fixture
def serve(serving_venv):
    """serve(folder, env=None, extra_args=()) -> a ServedModel on 127.0.0.1, float32, eager (no compile: the tests check tokens)."""
    started = []

    def start(folder: Path, env: dict | None = None, extra_args: list[str] = ()) -> ServedModel:
        server = ServedModel(folder, serving_venv, [*VLLM_ARGS, *extra_args],
                             env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
