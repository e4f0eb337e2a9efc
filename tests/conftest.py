"""Test-wide setup. TRITON_INTERPRET must be set before any Triton kernel module is imported: the kernels then run on
the CPU in Triton's interpreter, so CI checks them without a GPU. On a GPU machine, run with MOEKERN_TEST_GPU=1 to
leave the interpreter off and test the compiled kernels."""

import os

if os.environ.get("MOEKERN_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shipped():
    """The shipped model and tokenizer, loaded once (fp32)."""
    from moekern.shipped import load_model

    return load_model(torch.float32)


@pytest.fixture
def on_test_device():
    """CPU (interpreter) by default; the GPU with MOEKERN_TEST_GPU=1, where the same tests check compiled kernels."""
    if os.environ.get("MOEKERN_TEST_GPU") != "1":
        yield
        return
    torch.set_default_device("cuda")
    yield
    torch.set_default_device(None)


def _poison(*size, dtype, device=None):
    t = torch.empty(*size, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else -123457)


@pytest.fixture
def poisoned_kernel_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (or a wild integer), so an element they never write fails."""
    from moekern.ops import moe_gemm, routing

    monkeypatch.setattr(moe_gemm, "_alloc", _poison)
    monkeypatch.setattr(routing, "_alloc", _poison)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter keeps bf16 as raw uint16 bits (numpy has no bf16) and its tl.dot multiplies those bits;
    the kernels then take an fp32 dot for bf16. This mends the interpreter's dot to read bf16 operands as their
    values (exact products, fp32 sums, as the tensor cores compute them), so that the kernels' own bf16 tl.dot path
    runs in the tests."""
    if os.environ.get("MOEKERN_TEST_GPU") == "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from moekern.ops import moe_gemm

    original = interpreter.InterpreterBuilder.create_dot

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(moe_gemm, "INTERPRETER_BF16_DOT", True)
    yield
