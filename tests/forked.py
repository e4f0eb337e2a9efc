"""Run moekern's CLI in a fork of the test process, where torch and moekern are already imported (a fresh
interpreter would spend seconds importing torch for every run), and kill it where a test wants."""

import os
import signal
import time

import torch


def run_forked(function, kill_at: str | None = None, sig: int = signal.SIGKILL, delay: float | None = None,
               exchange: bool = True, timeout: float = 120.0, save_seconds: list | None = None) -> int:
    """Run function() -> exit code in a forked child with stdout/stderr discarded. kill_at: the save step
    (moekern.folders.on_step) where the child sends itself `sig`; delay: seconds after the save starts writing when
    this process sends it `sig`. exchange=False forces the two-rename fallback of moekern.folders. save_seconds:
    gets the time from the start of the save to the child's end. Returns the exit code, or -signal if a signal
    ended the child."""
    from moekern import folders

    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(started_r)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork; one thread needs none
            folders.EXCHANGE = exchange

            def on_step(step: str) -> None:
                if step == "writing":
                    os.write(started_w, b"w")
                if step == kill_at:
                    os.kill(os.getpid(), sig)

            folders.on_step = on_step
            code = function()
        finally:
            os._exit(code)
    os.close(started_w)
    try:
        started = os.read(started_r, 1) and time.perf_counter()  # blocks until the save starts (or the child ends)
        if delay is not None and started:
            time.sleep(delay)
            os.kill(pid, sig)  # (a child that already ended is a zombie until waited for: this cannot hit another)
        code = wait(pid, timeout)
        if save_seconds is not None and started:
            save_seconds.append(time.perf_counter() - started)
        return code
    finally:
        os.close(started_r)


def wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"the forked child {pid} ran longer than {timeout} s")
