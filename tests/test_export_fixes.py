"""Two details other tools read: the router is listed in an AutoAWQ export's modules_to_not_convert (AutoAWQ's
loader turns every linear it is not told about into a 4-bit layer), and the rotary inv_freq stays fp32 when
moekern.load casts a model to a 16-bit dtype, as transformers keeps it."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import moekern
from moekern.compression.slimming import QuantConfig, quantize_
from moekern.quantized_folders import load_quantized_folder, save_quantized_folder


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_awq_export_lists_every_16bit_linear_and_the_routers(tmp_path, family):
    overrides = {"shared_expert_intermediate_size": 32} if family == "qwen2_moe" else {}
    model = tiny_model(family, **overrides)
    quantize_(model, QuantConfig("rtn", group_size=8))  # attention stays 16-bit
    save_quantized_folder(model, tmp_path / "awq", fmt="awq", round_scales=True)
    skip = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    with safe_open(str(tmp_path / "awq" / "model.safetensors"), "pt") as f:
        names = {k: f.get_slice(k).get_shape() for k in f.keys()}
    prefix = "block_sparse_moe" if family == "mixtral" else "mlp"
    routers = [f"model.layers.{i}.{prefix}.gate" for i in range(model.config.num_hidden_layers)
               if f"model.layers.{i}.{prefix}.gate.weight" in names]
    assert routers and set(routers) <= set(skip)
    # every 2-D 16-bit weight but the embedding is a module AutoAWQ must leave alone; no 4-bit module is listed
    linears = {k.removesuffix(".weight") for k, shape in names.items() if k.endswith(".weight") and len(shape) == 2}
    assert linears - {"model.embed_tokens"} <= set(skip)
    assert not {k.removesuffix(".qweight") for k in names if k.endswith(".qweight")} & set(skip)


def inv_freqs(model):
    return [b for name, b in model.named_buffers() if name.endswith("inv_freq")]


def test_load_keeps_the_rotary_frequencies_in_fp32(tmp_path, shipped):
    model, tokenizer = shipped
    moekern.save(model, tmp_path / "out")  # a moekern folder: moekern.load builds it (not transformers)
    ids = tokenizer("The with statement is used to wrap", return_tensors="pt").input_ids
    ours, _ = moekern.load(tmp_path / "out", dtype=torch.float16)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16).eval()
    assert {b.dtype for b in inv_freqs(ours)} == {b.dtype for b in inv_freqs(theirs)} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_a_published_folder_keeps_the_rotary_frequencies_in_fp32(tmp_path):
    model = tiny_model("olmoe")
    quantize_(model, QuantConfig("rtn", group_size=8))
    save_quantized_folder(model, tmp_path / "awq", fmt="awq", round_scales=True)
    loaded, _ = load_quantized_folder(tmp_path / "awq", dtype=torch.float16)
    assert {b.dtype for b in inv_freqs(loaded)} == {torch.float32}
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
