"""Save, load and generate give identical tokens; broken checkpoints give clear errors and nothing half-written."""

import json

import pytest
import torch
from tiny_models import rel_err, tiny_model
from transformers import AutoModelForCausalLM

import moekern
from moekern import surgery
from moekern.errors import MoekernError


def compress_everything(model):
    surgery.drop_experts(model, {0: [0, 2, 3, 5], 2: [1, 2]})
    surgery.drop_experts(model, {3: [0, 1, 4]}, mask_only=True)
    surgery.set_skip_beta(model, {0: 0.3, 3: 0.6})
    surgery.remove_moe_layers(model, [4])
    surgery.remove_blocks(model, [1])


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False)


def test_save_load_generate_identical(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=6)
    compress_everything(model)
    ids = torch.randint(3, 97, (2, 6))
    expected = generate(model, ids)
    moekern.save(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moekern"]["dropped_blocks"] == [1]
    assert config["moekern"]["dropped_moe_layers"] == [4]
    assert config["moekern"]["kept_experts"] == [[0, 2, 3, 5], None, [1, 2], [0, 1, 4], None, None]
    assert config["moekern"]["skip_beta"] == [0.3, None, None, 0.6, None, None]
    assert config["moekern"]["quant"] is None and config["num_hidden_layers"] == 5

    loaded, _ = moekern.load(tmp_path / "out")
    assert torch.equal(generate(loaded, ids), expected)
    assert loaded.config.moekern == model.config.moekern
    assert not any(p.startswith(".out.") for p in (x.name for x in tmp_path.iterdir()))  # no temporary left


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_standard_architectures_load_with_plain_transformers(tmp_path, family):
    model = tiny_model(family)
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {layer: [1, 2, 4, 5] for layer in moe})  # the same count in every layer
    surgery.remove_blocks(model, [moe[-1]])
    moekern.save(model, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        assert rel_err(plain(ids).logits, model(ids).logits) <= 1e-5
    assert torch.equal(generate(plain, ids), generate(model, ids))


def test_grouped_router_keeps_its_groups(tmp_path):
    """DeepSeek-V3 routes within expert groups: a uniform drop is not a smaller standard model, moekern.load it."""
    model = tiny_model("deepseek_v3")
    surgery.drop_experts(model, {layer: [1, 2, 4, 5] for layer in surgery.moe_layer_ids(model)})
    moekern.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_routed_experts"] == 8
    loaded, _ = moekern.load(tmp_path / "out")
    ids = torch.randint(3, 97, (2, 6))
    assert torch.equal(generate(loaded, ids), generate(model, ids))


def test_tokenizer_and_overwrite(tmp_path, shipped):
    model, tokenizer = shipped
    target = tmp_path / "out"
    moekern.save(tiny_model("mixtral"), target)  # an earlier moekern save, replaced only with overwrite=True
    (target / "stale.txt").write_text("from an earlier save")
    moekern.save(model, target, tokenizer=tokenizer, overwrite=True)
    assert not (target / "stale.txt").exists()
    loaded, loaded_tokenizer = moekern.load(target)
    ids = tokenizer("The with statement", return_tensors="pt").input_ids
    assert torch.equal(generate(loaded, ids), generate(model, ids))
    assert loaded_tokenizer("The with statement").input_ids == ids[0].tolist()


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("olmoe")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_model", disk_full)
    with pytest.raises(OSError, match="No space"):
        moekern.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_missing_shards(tmp_path):
    model = tiny_model("mixtral")
    moekern.save(model, tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoekernError, match="corrupt or truncated"):
        moekern.load(tmp_path / "out")

    weights.write_bytes(data)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "out" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoekernError, match="missing"):
        moekern.load(tmp_path / "out")


def test_missing_folder_pickle_only_and_bad_config(tmp_path):
    with pytest.raises(MoekernError, match="does not exist"):
        moekern.load(tmp_path / "nowhere")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(MoekernError, match="never unpickles"):
        moekern.load(tmp_path / "pickled")
    (tmp_path / "pickled" / "config.json").write_text("{not json")
    with pytest.raises(MoekernError, match="not valid JSON"):
        moekern.load(tmp_path / "pickled")
