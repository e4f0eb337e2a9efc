"""What the compiled kernels must be, from their PTX and SASS (no GPU): the static performance report committed under
benchmarks/results/static/ (python -m moekern.ops.compile_check --sass) keeps every variant free of spills and every
4-bit decode variant's issue ceiling (over the bytes it must read) at twice the memory bandwidth it must saturate,
and is today's (one variant is compiled again and must count the same instructions); row offsets that pass 2^31
in a 40k-token DeepSeek-V3 prefill are computed in 64 bits; one MoE layer is five kernel launches, route to output.

The compiling part runs in one subprocess: the test session runs with TRITON_INTERPRET=1, under which @triton.jit
makes interpreted functions the compiler cannot take."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "static" / "report.json"
H100_TBS = 3.35  # the memory bandwidth a 4-bit decode kernel must be able to issue for
DECODE_TOKENS = 16
MAX_LAUNCHES = 6  # vLLM's count per MoE layer


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


def test_report_covers_every_model_bucket_and_arch(report):
    from moekern.ops import tuning

    seen = {(c["model"], c["tokens"], c["quant"]) for c in report["cases"]}
    for model in report["models"]:
        for tokens in tuning.TOKEN_BUCKETS:
            for quant in (False, True):
                assert (model, tokens, quant) in seen, (model, tokens, quant)
    for case in report["cases"]:
        assert {row["arch"] for row in case["launches"]} == {80, 90}, case["model"]
        gemms = [row for row in case["launches"] if "ceiling_tbs" in row]
        assert len(gemms) == 4, (case["model"], case["tokens"])  # gate_up and down, each arch


def test_report_no_spills_and_decode_issue_ceiling(report):
    spills = [(c["model"], c["tokens"], r["label"], r["arch"]) for c in report["cases"] for r in c["launches"]
              if r["spill_bytes"]]
    assert not spills, f"register spills: {spills}"
    decode = [(c, r) for c in report["cases"] for r in c["launches"]
              if c["quant"] and c["tokens"] <= DECODE_TOKENS and r["arch"] == 90 and "ceiling_tbs" in r]
    assert decode
    low = [(c["model"], c["tokens"], r["label"], round(r["ceiling_tbs"], 2)) for c, r in decode
           if r["ceiling_tbs"] < H100_TBS]
    assert not low, f"4-bit decode variants whose issue rate cannot reach the H100's bandwidth: {low}"
    low = [(c["model"], c["tokens"], r["label"], round(r["ceiling_tbs"], 2)) for c, r in decode
           if r["ceiling_tbs"] < 2 * H100_TBS]
    assert not low, f"4-bit decode variants whose issue ceiling is under twice the H100's bandwidth: {low}"
    assert all(0 < r["useful_fraction"] <= 1 for _, r in decode)
    assert all(r["cp_async"] for _, r in decode), "a 4-bit decode variant without cp.async prefetch"


def test_report_launches_per_layer(report):
    for case in report["cases"]:
        assert case["triton_launches"] + len(case["torch_kernel_ops"]) <= MAX_LAUNCHES, case


def test_compiled_kernels_today(report, tmp_path):
    """In one compiler subprocess: today's SASS of a 4-bit decode gate_up counts what the report says; the row
    offsets of a 40k-token DeepSeek-V3 prefill are 64-bit products (the largest passes 2^31); launches per layer."""
    pytest.importorskip("triton.backends.nvidia")
    script = f"""
import json
from moekern.ops import compile_check as cc
out = dict(
    recheck=cc.recheck({str(REPORT)!r}, "deepseek-v3", 1, True, "gate_up_kernel", 90),
    offsets=cc.row_offset_products("deepseek-v3", 40000, True, 90),
    launches=[cc.launches_per_layer(m, t, q) for m, t, q in
              [("deepseek-v3", 1, True), ("mixtral-8x7b", 2048, False), ("gpt-oss-120b", 16, True)]],
)
print("RESULT" + json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.split("RESULT", 1)[1])

    committed, today = out["recheck"]
    if report["versions"]["triton"] == __import__("triton").__version__:
        assert today == committed, (f"the report counts {committed} instructions a K step, the kernel now {today}: "
                                    "rerun python -m moekern.ops.compile_check --sass --out benchmarks/results/static/")

    offsets = out["offsets"]
    assert offsets["down_kernel.stride_pp"]["largest_product"] >= 2**31, "the shape no longer tests the overflow"
    narrow = {name: o["narrow"] for name, o in offsets.items() if o["narrow"]}
    assert not narrow, f"row offsets computed in 32 bits: {narrow}"
    assert all(o["loaded"] for name, o in offsets.items() if not name.endswith("stride_ps") or "down" in name)

    for kernels, torch_ops in out["launches"]:
        assert kernels == ["route_kernel", "align_kernel", "gate_up_kernel", "down_kernel", "slot_sum_kernel"]
        assert not torch_ops, f"kernels outside the five: {torch_ops}"
