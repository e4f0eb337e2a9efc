"""Damaged weights: empty, truncated or corrupt shards get a clear error in any folder (the plain Hugging Face path
through transformers included), NaN/inf weights are refused at load, non-finite calibration statistics and
non-finite compression results are refused, and a non-finite perplexity is an error, not a number."""

import json
import struct

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

import moekern
from moekern import checkpoint
from moekern.cli import main
from moekern.errors import MoekernError
from moekern.shipped import MODEL_DIR


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain Hugging Face folder (save_pretrained, no moekern decisions) with the shipped tokenizer."""
    folder = tmp_path_factory.mktemp("plain") / "model"
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=4096, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(folder)
    return folder


def copy_of(folder, tmp_path):
    out = tmp_path / folder.name
    out.mkdir()
    for file in folder.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


def spoil_largest_tensor(weights, size: int) -> str:
    """Overwrite `size` bytes inside the largest tensor of a safetensors file with 0xFF (NaN in every float
    format); returns the tensor's name."""
    data = bytearray(weights.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    start = 8 + length + header[name]["data_offsets"][0] + 16
    data[start:start + size] = b"\xff" * size
    weights.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("damage,words", [
    (lambda data: data[: len(data) // 2], ["corrupt or truncated", "its header needs"]),
    (lambda data: b"", ["corrupt or truncated", "empty: 0 bytes"]),
    (lambda data: struct.pack("<Q", 50) + b"{not json" + data[17:], ["corrupt or truncated", "not JSON"]),
    (lambda data: struct.pack("<Q", 1 << 40) + data[8:], ["corrupt or truncated", "header claims"]),
    (lambda data: data + b"\0" * 10, ["corrupt or truncated", "10 bytes after its last tensor"]),
])
def test_damaged_shards_of_a_plain_folder_say_which_file(plain, tmp_path, damage, words):
    folder = copy_of(plain, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for load in (moekern.load, checkpoint.load_pretrained):
        with pytest.raises(MoekernError) as caught:
            load(folder)
        assert all(w in str(caught.value) for w in words + ["model.safetensors"]), str(caught.value)


def test_a_shard_index_that_is_broken_or_names_a_missing_shard(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    (folder / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(MoekernError, match="not a valid shard index"):
        moekern.load(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(MoekernError, match="'model-2.safetensors' listed in model.safetensors.index.json is missing"):
        moekern.load(folder)


def test_nan_bytes_inside_the_weights_are_refused_at_load(plain, tmp_path, capsys):
    folder = copy_of(plain, tmp_path)
    name = spoil_largest_tensor(folder / "model.safetensors", 4096)  # 1024 float32 NaN
    with pytest.raises(MoekernError, match=f"tensor '{name}' holds 1,024 non-finite values"):
        moekern.load(folder)  # through transformers
    assert main(["compress", str(folder), "--recipe", "rtn4:g32", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "out").exists()

    saved = tmp_path / "saved"
    moekern.save(tiny_model("mixtral"), saved)  # moekern's own path: checked as each shard is read
    name = spoil_largest_tensor(saved / "model.safetensors", 64)
    with pytest.raises(MoekernError, match=rf"weight shard .*model.safetensors.*: tensor '{name}' holds 16 non-finite"):
        moekern.load(saved)


def test_compress_refuses_a_non_finite_result():
    model = tiny_model("mixtral", intermediate_size=32)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")  # RTN leaves attention as it is
    with pytest.raises(MoekernError, match=r"compressed by rtn4:g32: tensor 'model.layers.1.self_attn.q_proj.weight'"):
        moekern.compress(model, "rtn4:g32")


def test_non_finite_calibration_statistics_are_refused():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    ids = torch.randint(3, 97, (2, 12))
    with pytest.raises(MoekernError, match="calibration statistics of layer 1 are not finite"):
        moekern.compress(model, "layer-drop=1", ids)


def test_info_calls_a_non_finite_perplexity_an_error(plain, tmp_path, capsys):
    folder = copy_of(plain, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # finite weights whose logits overflow float32
        model.lm_head.weight.fill_(3e38)
        model.model.norm.weight.fill_(1e3)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder)
    assert main(["info", str(folder), "--device", "cpu", "--ppl-tokens", "128", "--seq-len", "64",
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "perplexity" in err and "non-finite logits" in err and "Traceback" not in err
