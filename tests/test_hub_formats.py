"""Whole AutoAWQ / GPTQ checkpoint folders of MoE models (moekern.quantized_folders): folders written here by the
published formats' rules (packed bit by bit in this file, transformers 4 per-expert names) load into moekern's 4-bit modules
with the exact codes and grid, and give the RTN model's logits; moekern's exporter writes the same tensors; bad
folders are refused with the reason."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import moekern
from moekern.errors import MoekernError
from moekern.modules.quant import QuantizedExperts, QuantizedLinear
from moekern.compression.slimming import QuantConfig, quantize_
from moekern.formats import layout
from moekern.quantized_folders import is_quantized_folder, load_quantized_folder, save_quantized_folder

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds output column 8c + AWQ_ORDER[i]
GROUP = 8


def to_int32(t: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits (how the checkpoints store them)."""
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


def awq_linear(q, zeros, scales) -> dict:
    """AutoAWQ GEMM (WQLinear_GEMM.from_linear): W^T [in, out] packed along out, 8 nibbles a word in AWQ_ORDER."""
    n, k = q.shape
    intweight = q.T.to(torch.int64)
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    qzeros = torch.zeros(k // GROUP, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (4 * i)
    return {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros), "scales": scales.to(torch.float16)}


def gptq_linear(q, zeros, scales, version=1) -> dict:
    """GPTQ (AutoGPTQ QuantLinear.pack): W packed along in, 8 rows of in a word in order; zeros along out, v1 minus 1."""
    n, k = q.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= q[:, 8 * row + j].to(torch.int64) << (4 * j)
    stored = zeros.to(torch.int64) - (1 if version == 1 else 0)
    stored = stored & 0xF
    qzeros = torch.zeros(k // GROUP, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= stored[:, 8 * col + j] << (4 * j)
    return {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros), "scales": scales.to(torch.float16),
            "g_idx": (torch.arange(k) // GROUP).to(torch.int32)}


def codes(qweight, zeros, scales, cols=slice(None)):
    """(q [N, K], zeros [K/G, N], scales) of moekern's layout, restricted to output columns `cols`."""
    return layout.unpack(qweight)[cols], zeros[:, cols], scales[:, cols]


def rtn_model(family):
    overrides = {"shared_expert_intermediate_size": 32} if family == "qwen2_moe" else {}
    model = tiny_model(family, **overrides)
    quantize_(model, QuantConfig("rtn", group_size=GROUP, quantize_attention=True))
    with torch.no_grad():  # the formats store fp16 scales: make the RTN grid one fp16 holds exactly
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name.endswith("scales"):
                    buffer.copy_(buffer.half().float())
    return model


def published_tensors(model, fmt: str, version: int = 1) -> dict:
    """The checkpoint tensors of `model` by the published rules and transformers 4 names, built here."""
    mixtral = model.config.model_type == "mixtral"
    block, names = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    pack = awq_linear if fmt == "awq" else lambda q, z, s: gptq_linear(q, z, s, version)

    def v4(name):
        return name.replace(".mlp.", f".{block}.")

    out, done = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            inter = module.gate_up_proj_qweight.shape[-1] // 2
            for e in range(module.num_experts):
                gu = (module.gate_up_proj_qweight[e], module.gate_up_proj_zeros[e], module.gate_up_proj_scales[e])
                dn = (module.down_proj_qweight[e], module.down_proj_zeros[e], module.down_proj_scales[e])
                for name, args in ((names[0], codes(*gu, slice(0, inter))), (names[1], codes(*gu, slice(inter, None))),
                                   (names[2], codes(*dn))):
                    for part, tensor in pack(*args).items():
                        out[f"{v4(path)}.{e}.{name}.{part}"] = tensor
            done.update(f"{path}.{b}" for b, _ in module.named_buffers())
        elif isinstance(module, QuantizedLinear):
            for part, tensor in pack(*codes(module.qweight, module.zeros, module.scales)).items():
                out[f"{v4(path)}.{part}"] = tensor
            if getattr(module, "bias", None) is not None:
                out[f"{v4(path)}.bias"] = module.bias.clone()
            done.update(f"{path}.{b}" for b, _ in module.named_buffers())
    for key, tensor in model.state_dict().items():
        if key not in done:
            out[v4(key)] = tensor.clone()
    return out


def quantization_config(fmt: str, version: int = 1) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}


def write_folder(path, model, tensors: dict, qc: dict, shards: int = 1):
    path.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("moekern", None)
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def assert_same_4bit_model(loaded, model, ids):
    pairs = 0
    original = dict(model.named_modules())
    for path, module in loaded.named_modules():
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            twin = original[path]
            assert type(twin) is type(module), path
            for name, buffer in twin.named_buffers():
                assert torch.equal(getattr(module, name), buffer), f"{path}.{name}"
            pairs += 1
    assert pairs == sum(isinstance(m, (QuantizedExperts, QuantizedLinear)) for m in model.modules())
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("family, fmt, version, shards", [
    ("mixtral", "awq", 1, 2), ("mixtral", "gptq", 1, 1), ("qwen2_moe", "awq", 1, 1), ("qwen2_moe", "gptq", 2, 3),
])
def test_a_published_folder_loads_into_the_same_4bit_model(tmp_path, family, fmt, version, shards):
    model = rtn_model(family)
    folder = write_folder(tmp_path / "hub", model, published_tensors(model, fmt, version),
                          quantization_config(fmt, version), shards)
    assert is_quantized_folder(folder)
    loaded, tokenizer = load_quantized_folder(folder, dtype=torch.float32)
    assert tokenizer is None
    assert not hasattr(loaded.config, "quantization_config")
    assert loaded.config.moekern["quant"]["method"] == fmt and loaded.config.moekern["quant"]["group_size"] == GROUP
    ids = torch.randint(3, 97, (2, 9))
    assert_same_4bit_model(loaded, model, ids)
    if fmt == "gptq":  # the user's entry point: moekern.load finds the published format itself
        assert_same_4bit_model(moekern.load(folder, dtype=torch.float32)[0], model, ids)
    if family == "mixtral" and fmt == "awq":  # and moekern's own checkpoint of it round-trips
        moekern.save(loaded, tmp_path / "moekern")
        again, _ = moekern.load(tmp_path / "moekern")
        assert_same_4bit_model(again, model, ids)


@pytest.mark.parametrize("family, fmt, checkpoint_format", [
    ("mixtral", "awq", "gptq"), ("qwen2_moe", "gptq", "gptq"), ("qwen2_moe", "gptq", "gptq_v2"),
])
def test_export_writes_the_published_tensors_and_reads_back_exactly(tmp_path, family, fmt, checkpoint_format):
    model = rtn_model(family)
    version = 2 if checkpoint_format == "gptq_v2" else 1
    folder = save_quantized_folder(model, tmp_path / "out", fmt=fmt, checkpoint_format=checkpoint_format,
                                   allow_zero_v1=True, max_shard_bytes=20_000)
    assert (folder / "model.safetensors.index.json").exists()
    written = {}
    for shard in folder.glob("*.safetensors"):
        written.update(load_file(shard))
    expected = published_tensors(model, fmt, version)
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    config = json.loads((folder / "config.json").read_text())
    assert "moekern" not in config
    assert config["quantization_config"]["quant_method"] == fmt and config["quantization_config"]["bits"] == 4
    loaded, _ = load_quantized_folder(folder, dtype=torch.float32)
    assert_same_4bit_model(loaded, model, torch.randint(3, 97, (2, 7)))


def test_export_refuses_what_the_formats_cannot_hold(tmp_path):
    model = tiny_model("mixtral")
    quantize_(model, QuantConfig("rtn", group_size=GROUP))
    with pytest.raises(MoekernError, match="float16"):  # fp32 scales
        save_quantized_folder(model, tmp_path / "a", fmt="awq")
    save_quantized_folder(model, tmp_path / "b", fmt="awq", round_scales=True)
    awq = rtn_model("mixtral")  # as AWQ leaves routed experts: a per-expert input scale of gate_up
    experts = awq.model.layers[0].mlp.experts
    experts.register_buffer("gate_up_proj_input_scale", torch.ones(experts.num_experts, 32))
    with pytest.raises(MoekernError, match="input scales"):
        save_quantized_folder(awq, tmp_path / "c", fmt="awq", round_scales=True)
    with pytest.raises(MoekernError, match="not quantized"):
        save_quantized_folder(tiny_model("mixtral"), tmp_path / "d")


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    model = rtn_model("mixtral")
    tensors = published_tensors(model, "gptq", 1)
    root = tmp_path_factory.mktemp("hub")
    return model, tensors, root


def test_bad_folders_are_refused_with_the_reason(good_folder):
    model, tensors, root = good_folder
    key = "model.layers.1.block_sparse_moe.experts.3.w2.qweight"

    def attempt(name, tensors=tensors, qc=None, shards=1, change=None):
        folder = write_folder(root / name, model, tensors, qc or quantization_config("gptq"), shards)
        if change:
            change(folder)
        return lambda: load_quantized_folder(folder, dtype=torch.float32)

    cases = [
        (attempt("missing-shard", shards=2, change=lambda f: (f / "model-00002-of-00002.safetensors").unlink()),
         "missing"),
        (attempt("missing-tensor", tensors={k: v for k, v in tensors.items() if k != key}), key),
        (attempt("wrong-shape", tensors={**tensors, key: tensors[key][:-1]}), "has shape"),
        (attempt("bits", qc={**quantization_config("gptq"), "bits": 8}), "bits=8"),
        (attempt("method", qc={"quant_method": "fp8", "bits": 4, "group_size": GROUP}), "not supported"),
        (attempt("awq-version", qc={**quantization_config("awq"), "version": "gemv"}), "gemm"),
        (attempt("gptq-format", qc={**quantization_config("gptq"), "checkpoint_format": "marlin"}), "marlin"),
        (attempt("extra-tensor", tensors={**tensors, "model.layers.0.mlp.mystery.weight": torch.zeros(2)}),
         "no place"),
    ]
    permuted = dict(tensors)
    g_idx = permuted[key.replace("qweight", "g_idx")]
    permuted[key.replace("qweight", "g_idx")] = g_idx[torch.randperm(g_idx.numel(), generator=torch.Generator()
                                                                     .manual_seed(0))].contiguous()
    cases.append((attempt("act-order", tensors=permuted, qc={**quantization_config("gptq"), "desc_act": True}),
                  "permutes the groups"))
    for load, message in cases:
        with pytest.raises(MoekernError, match=message):
            load()
