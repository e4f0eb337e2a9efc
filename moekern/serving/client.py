"""`moekern serve` started in a process group of its own, asked over plain HTTP, and stopped with everything it
started: what the serving tests and benchmarks/serving_throughput.py use.

    with ServedModel(folder, venv, ["--dtype", "float32"]) as server:
        seconds = server.wait_ready()
        token_ids = server.complete(["The with statement"], max_tokens=24)
"""

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

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedModel:
    def __init__(self, folder: str | Path, venv: str, vllm_args: list[str] = (), env: dict | None = None,
                 log: str | Path | None = None, name: str = "m"):
        self.port, self.name = free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "moekern.cli", "serve", str(folder), "--venv", str(venv), "--host",
                "127.0.0.1", "--port", str(self.port), "--served-model-name", name, *vllm_args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = Path(log) if log else Path(folder).parent / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)
        self.started = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def wait_ready(self, timeout: float = 900) -> float:
        """Seconds from the start of `moekern serve` until the server answers /health."""
        while time.perf_counter() < self.started + timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"moekern serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def completions(self, prompts: list, max_tokens: int, **options) -> list[dict]:
        """The choices of a greedy (temperature 0) completion request, in prompt order; prompts are texts or lists
        of token ids. Each choice has its generated "token_ids"."""
        body = {"model": self.name, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, **options}
        request = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=900) as answer:
            return sorted(json.loads(answer.read())["choices"], key=lambda c: c["index"])

    def complete(self, prompts: list, max_tokens: int, **options) -> list[list[int]]:
        """The generated token ids of each prompt."""
        return [c["token_ids"] for c in self.completions(prompts, max_tokens, **options)]

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM to the process group (vLLM's server and the engine processes it started), SIGKILL after 60 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if not self.log.closed:
            self.log.close()
