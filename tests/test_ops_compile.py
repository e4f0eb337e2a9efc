"""Every Triton kernel variant compiles ahead of time to a cubin for sm_80 and sm_90 on this CPU-only machine
(triton.compile + ASTSource + GPUTarget; Triton's wheel ships ptxas), and none spills registers (ptxas -v).
A subprocess, because the test session runs with TRITON_INTERPRET=1, under which @triton.jit makes interpreted
functions the compiler cannot take."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "moekern.ops.compile_check", "--arch", "80", "90", "--resources"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("sm_")]
    assert sum(line.startswith("sm_80") for line in lines) == sum(line.startswith("sm_90") for line in lines) >= 9
    spilling = [line for line in lines if "spill=0 B" not in line]
    assert not spilling, "register spills (ptxas -v): " + "; ".join(spilling)
