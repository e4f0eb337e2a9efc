"""Whole models on the C++ CPU kernels against the reference backend, and the ways they may not run: the shipped
model quantized (rtn4, awq4), tiny 4-bit and bf16 models of every family (dropped experts, skipped slots, shared
experts in 4-bit Linears), a dtype the kernels do not take, and a machine without a C++ compiler.

Bounds: the shipped model runs the default int8 activations of the 4-bit kernels (tests/test_ops_cpu.py checks that
arithmetic exactly): its logits move by a small fraction of their range, LOGITS_BOUND relative to the largest logit,
and greedy decoding gives the same tokens. The tiny random models of the families amplify any rounding through their
layers (weights of std 0.2, no training), so they check the wiring (routing, drops, skips, shared experts, GPT-OSS's
rows) with fp32 activations, where the kernels compute the reference's products: fp32 bounds.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, rel_err, tiny_model

import moekern
from moekern import surgery
from moekern.modules.quant import QuantizedExperts
from moekern.ops import backend, cpu
from moekern.patching import patch
from moekern.compression.slimming import QuantConfig, quantize_

ROOT = Path(__file__).resolve().parents[1]
LOGITS_BOUND = 2e-2
FP32_BOUND = 1e-5

needs_kernels = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def logits(model, ids, backend_name, monkeypatch, steps=0):
    """Prefill logits and `steps` greedy tokens under MOEKERN_BACKEND=backend_name."""
    monkeypatch.setenv("MOEKERN_BACKEND", backend_name)
    with torch.no_grad():
        out = model(ids)
        tokens = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                pad_token_id=0)[:, ids.shape[1]:] if steps else None
    return out.logits, tokens


def counting_cpu_calls(monkeypatch):
    calls = []
    for name in ("moe_experts_4bit", "moe_experts_dense", "linear_4bit"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rtn4", "awq4"])
def test_shipped_4bit_model_on_the_cpu_kernels(shipped, recipe, monkeypatch):
    model, tokenizer = shipped
    model = moekern.compress(copy.deepcopy(model), recipe, tokenizer=tokenizer, samples=8, seq_len=128)
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())
    ids = tokenizer(["The with statement is used to", "A module can contain executable statements"],
                    return_tensors="pt", padding=True).input_ids
    expected, expected_tokens = logits(model, ids, "reference", monkeypatch, steps=12)
    calls = counting_cpu_calls(monkeypatch)
    got, got_tokens = logits(model, ids, "auto", monkeypatch, steps=12)
    assert "moe_experts_4bit" in calls, "the CPU kernels were not taken"
    assert rel_err(got, expected) <= LOGITS_BOUND
    assert torch.equal(got_tokens, expected_tokens)


@needs_kernels
@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_family_with_drops_and_skips_on_the_cpu_kernels(family, monkeypatch):
    """Every family in 4 bits (group 8: the tiny widths), after Expert Drop and with per-token skip: MoEBlock routing,
    the fused 4-bit MoE and, where the family has them, shared experts as 4-bit Linears."""
    monkeypatch.setenv("MOEKERN_CPU_INNER", "fp32")
    model = tiny_model(family, intermediate_size=32, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    layers = surgery.moe_layer_ids(model)
    first = surgery.moe_block(model, layers[0])
    surgery.drop_experts(model, {layers[0]: list(range(first.num_original_experts - 2))})
    surgery.set_skip_beta(model, {layer: 0.3 for layer in layers})
    quantize_(model, QuantConfig("rtn", group_size=8))
    patch(model)
    ids = torch.randint(3, 97, (2, 9))
    expected, _ = logits(model, ids, "reference", monkeypatch)
    calls = counting_cpu_calls(monkeypatch)
    got, _ = logits(model, ids, "cpu", monkeypatch)
    assert "moe_experts_4bit" in calls
    if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        assert "linear_4bit" in calls, "the shared experts' 4-bit Linears did not run on the CPU kernels"
    assert rel_err(got, expected) <= FP32_BOUND


@needs_kernels
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_family_on_the_cpu_kernels(family, dtype, monkeypatch):
    model = tiny_model(family).to(dtype)
    patch(model)
    ids = torch.randint(3, 97, (2, 7))
    expected, _ = logits(model, ids, "reference", monkeypatch)
    calls = counting_cpu_calls(monkeypatch)
    got, _ = logits(model, ids, "cpu", monkeypatch)
    assert "moe_experts_dense" in calls
    assert rel_err(got, expected) <= (FP32_BOUND if dtype == torch.float32 else 3e-2)


@needs_kernels
def test_a_dtype_the_kernels_do_not_take(monkeypatch):
    """float64: the reference serves it under auto, `moekern info` says so, and MOEKERN_BACKEND=cpu names the
    constraint."""
    model = patch(tiny_model("mixtral").to(torch.float64))
    ids = torch.randint(3, 97, (1, 5))
    monkeypatch.setenv("MOEKERN_BACKEND", "auto")
    with torch.no_grad():
        model(ids)
    paths = backend.describe(model)["paths"]
    assert paths == {"float64 experts": "PyTorch reference (the CPU kernels take float32, bfloat16 or float16 "
                                        "activations, not float64)"}
    monkeypatch.setenv("MOEKERN_BACKEND", "cpu")
    with pytest.raises(ValueError, match="MOEKERN_BACKEND=cpu: the CPU kernels take float32, bfloat16 or float16"):
        with torch.no_grad():
            model(ids)


@needs_kernels
def test_describe_names_the_variant(monkeypatch):
    model = tiny_model("mixtral")
    quantize_(model, QuantConfig("rtn", group_size=8))
    monkeypatch.setenv("MOEKERN_CPU_ISA", "avx2" if "avx2" in cpu.cpu_flags().split() else "portable")
    paths = backend.describe(model)["paths"]
    threads = f"{torch.get_num_threads()} threads"
    assert paths == {"4-bit experts": f"C++ CPU kernels ({cpu.isa_name()}, int8 activations, {threads})"}
    assert backend.describe(tiny_model("olmoe"))["paths"] == {
        "float32 experts": f"C++ CPU kernels ({cpu.isa_name()}, {threads})"}


SCRIPT = """
import torch, sys
sys.path.insert(0, {tests!r})
from tiny_models import tiny_model
from moekern.ops import backend, reference
from moekern.patching import patch
from moekern.compression.slimming import QuantConfig, quantize_
model = tiny_model("mixtral")
quantize_(model, QuantConfig("rtn", group_size=8))
patch(model)
ids = torch.randint(3, 97, (1, 6))
with torch.no_grad():
    model(ids); model(ids)
print("path", backend.backend_for(torch.device("cpu")))
"""


def test_without_a_compiler_the_reference_runs_and_says_so_once(tmp_path):
    """No C++ compiler and no prebuilt library: moekern imports, runs the reference, and says why once."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "MOEKERN_CPU_KERNELS": "jit",
           "MOEKERN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "MOEKERN_BACKEND": "auto"}
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "path reference" in run.stdout
    assert run.stderr.count("the C++ CPU kernels are not available") == 1, run.stderr
    assert "no C++ compiler" in run.stderr and "PyTorch reference runs instead" in run.stderr
    forced = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"))],
                            env={**env, "MOEKERN_BACKEND": "cpu"}, capture_output=True, text=True, timeout=600)
    assert forced.returncode != 0
    assert "MOEKERN_BACKEND=cpu: the C++ CPU kernels are not available (no C++ compiler" in forced.stderr


def test_a_prebuilt_library_of_other_sources_gives_way(tmp_path, monkeypatch):
    """setup.py builds the digest of csrc/cpu/'s sources into the library it builds ahead of time, and moekern loads
    that library only while csrc/cpu/ holds those sources (else it builds them): an edit or a pull after
    `pip install --no-build-isolation -e .` cannot leave old kernels running."""
    import runpy
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.chdir(ROOT)
    assert runpy.run_path(str(ROOT / "setup.py"))["sources_sha256"]() == cpu.sources_sha256()
    library = tmp_path / "_cpu.so"
    library.write_bytes(b"\x7fELF\0...moekern-sources-sha256:" + cpu.sources_sha256().encode() + b"\0...")
    assert cpu.library_matches_sources(library)
    library.write_bytes(b"\x7fELF\0...moekern-sources-sha256:" + b"0" * 64 + b"\0...")
    assert not cpu.library_matches_sources(library)
    library.write_bytes(b"\x7fELF\0... built before the digest")
    assert not cpu.library_matches_sources(library)


@needs_kernels
def test_the_loaded_library_carries_the_digest_of_its_sources():
    """Either build (setup.py's, or the JIT one) compiles the digest in, so the check above reads a real library."""
    assert cpu.library_path().exists()
    assert cpu.library_matches_sources(cpu.library_path())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_gives_large_linears_the_decode_kernel(dtype, monkeypatch):
    """moekern.patch sends a few rows through the Linears it finds large enough (all of them here) to the dense
    kernel, gives the same logits, and unpatch takes that away again."""
    from moekern.modules import linear
    from moekern.patching import unpatch

    monkeypatch.setattr(linear, "LARGE_WEIGHT_BYTES", 0)
    model = tiny_model("mixtral").to(dtype)
    ids = torch.randint(3, 97, (3, 5))
    with torch.no_grad():
        expected = model(ids).logits
    patch(model)
    assert model.lm_head.forward.__func__ is linear.decode_linear_forward
    calls = []
    real = cpu.linear_dense
    monkeypatch.setattr(cpu, "linear_dense", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids[:, -1:]).logits, model(ids).logits  # 3 rows: the kernel; 15 rows: bf16 goes to torch
    assert calls
    with torch.no_grad():
        assert rel_err(got[1], expected) <= (FP32_BOUND if dtype == torch.float32 else 3e-2)
    unpatch(model)
    assert "forward" not in model.lm_head.__dict__
