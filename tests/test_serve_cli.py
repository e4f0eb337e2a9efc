"""`moekern serve` refuses, with one line and exit status 2, everything it can see is wrong before vLLM starts: no
server is ever started half-configured. (Serving itself is tested in tests/serving/, in vLLM's environment.)"""

import socket

import pytest
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.cli import main
from moekern.compression.slimming import QuantConfig, quantize_
from moekern.serving.server import cpu_mla_backend, flag_value


def serve(capsys, *argv):
    code = main(["serve", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return code, err


@pytest.fixture
def skip_model(tmp_path):
    model = tiny_model("mixtral")
    surgery.set_skip_beta(model, {0: 0.3})
    moekern.save(model, tmp_path / "skip")
    return tmp_path / "skip"


def test_a_folder_moekern_did_not_write(capsys, monkeypatch):
    monkeypatch.delenv("MOEKERN_SERVING_VENV", raising=False)
    code, err = serve(capsys, "shipped")
    assert code == 2 and "not a moekern checkpoint" in err and "vllm serve" in err


def test_a_port_in_use(capsys, skip_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve(capsys, skip_model, "--host", "127.0.0.1", f"--port={port}")
        assert code == 2 and f"port {port}" in err and "in use" in err


def test_a_family_vllm_has_no_class_for(capsys, tmp_path):
    model = tiny_model("gpt_oss")
    surgery.drop_experts(model, {0: [0, 1, 2]})  # a different count per layer: not a standard GPT-OSS
    moekern.save(model, tmp_path / "oss")
    code, err = serve(capsys, tmp_path / "oss", "--port", 1)
    assert code == 2 and "gpt_oss" in err and "no class" in err


def test_moekern_4bit_experts(capsys, tmp_path):
    model = tiny_model("mixtral")
    quantize_(model, QuantConfig("rtn", group_size=8))
    moekern.save(model, tmp_path / "q")
    code, err = serve(capsys, tmp_path / "q")
    assert code == 2 and "4-bit" in err and "save_quantized_folder" in err


def test_without_vllm_it_prints_the_install_line(capsys, monkeypatch, skip_model, tmp_path):
    monkeypatch.delenv("MOEKERN_SERVING_VENV", raising=False)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code, err = serve(capsys, skip_model, "--host", "127.0.0.1", "--port", port)
    assert code == 2 and "pip install -r" in err and "requirements-serving.txt" in err
    code, err = serve(capsys, skip_model, "--venv", tmp_path / "nowhere", "--host", "127.0.0.1", "--port", port)
    assert code == 2 and "no Python" in err


def test_vllm_flags_pass_through():
    args = ["--dtype", "float32", "--port", "8001", "--tensor-parallel-size=2", "--port=8002"]
    assert flag_value(args, "--port") == "8002" and flag_value(args, "--tensor-parallel-size") == "2"
    assert flag_value(args, "--host") is None


def test_a_float32_mla_model_on_vllms_cpu_build_gets_the_reference_cpu_mla():
    """vLLM's AMX latent-attention backend (picked wherever torch sees AMX) refuses float32 weights."""
    mla, fp32 = {"kv_lora_rank": 512, "dtype": "bfloat16"}, ["--dtype", "float32"]
    assert cpu_mla_backend(mla, fp32, cpu_build=True) == [*fp32, "--attention-backend", "CPU_MLA"]
    assert cpu_mla_backend({**mla, "dtype": "float32"}, [], cpu_build=True) == ["--attention-backend", "CPU_MLA"]
    chosen = [*fp32, "--attention-backend=AMX_MLA"]
    assert cpu_mla_backend(mla, chosen, cpu_build=True) == chosen  # the user's choice stands
    assert cpu_mla_backend(mla, ["--dtype", "bfloat16"], cpu_build=True) == ["--dtype", "bfloat16"]
    assert cpu_mla_backend(mla, [], cpu_build=True) == []  # bfloat16 from the config
    assert cpu_mla_backend(mla, fp32, cpu_build=False) == fp32  # a GPU build picks its own
    assert cpu_mla_backend({"dtype": "float32"}, fp32, cpu_build=True) == fp32  # no MLA
