"""Fixtures of the serving tests: the serving environment (vLLM + moekern's plugin), the shipped model compressed
by each recipe, and `moekern serve` started on 127.0.0.1 and stopped again.

Run with `MOEKERN_SERVING_VENV=<env> python -m pytest tests/serving` (.ci/run creates the environment). These tests
never run in the main suite (tests/conftest.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
SAMPLES, SEQ_LEN = 16, 128  # calibration of the recipes: small, the tests compare serving, not quality
START_TIMEOUT = 900  # seconds for a server to answer /health (vLLM's start is ~30 s on an idle 2-core machine)


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
    from moekern.compress.calibration import calibration_blocks

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`moekern serve` in its own process group, killed with it at the end."""

    def __init__(self, folder: Path, venv: str, extra_env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "moekern.cli", "serve", str(folder), "--venv", venv, "--host", "127.0.0.1",
                "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                "--served-model-name", "m"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", **(extra_env or {})}
        self.log = open(log or folder.parent / "server.log", "w")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)
        self.started = time.perf_counter()

    def wait_ready(self) -> float:
        deadline = self.started + START_TIMEOUT
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"the server did not answer within {START_TIMEOUT} s: {self.tail()}")

    def complete(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        body = {"model": "m", "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True}
        request = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            choices = sorted(json.loads(answer.read())["choices"], key=lambda c: c["index"])
        return [c["token_ids"] for c in choices]

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-n:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture
def serve(serving_venv):
    started = []

    def start(folder: Path, **kwargs) -> Server:
        server = Server(folder, serving_venv, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
