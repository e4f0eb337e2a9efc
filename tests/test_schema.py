"""config.json["moekern"] is checked against its schema (moekern.schema) before any weight is read: each broken
field gets an error that names it and its value, never a traceback from deep inside the replay."""

import copy
import json

import pytest
from tiny_models import tiny_model

import moekern
from moekern import checkpoint, surgery
from moekern.cli import main
from moekern.errors import MoekernError
from moekern.schema import validate_decisions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Mixtral (6 layers, 6 experts) with every kind of decision, saved."""
    model = tiny_model("mixtral", num_hidden_layers=6)
    surgery.drop_experts(model, {0: [0, 2, 3, 5]})
    surgery.set_skip_beta(model, {3: 0.4})
    surgery.remove_moe_layers(model, [4])
    surgery.remove_blocks(model, [1])
    folder = tmp_path_factory.mktemp("schema") / "model"
    moekern.save(model, folder)
    return folder, json.loads((folder / "config.json").read_text())


def edited(config: dict, **changes) -> dict:
    config = copy.deepcopy(config)
    for key, value in changes.items():
        if key == "moekern":
            config["moekern"] = value
        else:
            config["moekern"][key] = value
    return config


CASES = [
    (dict(moekern="nonsense"), ['"moekern" must be an object', '"nonsense"']),
    (dict(moekern={}), ["lacks the fields", "original_num_hidden_layers"]),
    (dict(moekern=None), ['"moekern" must be an object', "null"]),
    (dict(moekern=[1, 2]), ['"moekern" must be an object', "[1, 2]"]),
    (dict(dropped_blocks=[1, 1]), ["moekern.dropped_blocks = [1, 1]", "twice"]),
    (dict(dropped_blocks=[1, 99]), ["moekern.dropped_blocks = [1, 99]", "layer 99", "outside 0..5"]),
    (dict(dropped_blocks=[1, 2]), ["moekern.dropped_blocks = [1, 2]", "num_hidden_layers is 5"]),
    (dict(dropped_blocks="1"), ["moekern.dropped_blocks = \"1\"", "list of layer ids"]),
    (dict(dropped_moe_layers=[1]), ["moekern.dropped_moe_layers = [1]", "dropped_blocks removed"]),
    (dict(kept_experts=[[0, 2, 3, 5], None, None]), ["moekern.kept_experts", "6 entries"]),
    (dict(kept_experts=[[0, 2, 3, 9], None, None, None, None, None]), ["kept_experts[0] = [0, 2, 3, 9]", "expert 9"]),
    (dict(kept_experts=[[0.5, 2], None, None, None, None, None]), ["kept_experts[0] = [0.5, 2]", "expert ids"]),
    (dict(kept_experts=[[], None, None, None, None, None]), ["kept_experts[0] = []", "non-empty"]),
    (dict(kept_experts=[[0, 2, 3, 5], [1], None, None, None, None]), ["kept_experts[1] = [1]", "was removed"]),
    (dict(original_num_experts=99), ["moekern.original_num_experts = 99", "num_local_experts = 6"]),
    (dict(original_num_experts=4), ["original_num_experts = 4", "expert 5"]),
    (dict(original_num_experts="6"), ["moekern.original_num_experts = \"6\"", "whole number"]),
    (dict(original_num_hidden_layers=True), ["moekern.original_num_hidden_layers = true", "whole number"]),
    (dict(skip_beta=[None, None, None, 1.5, None, None]), ["skip_beta[3] = 1.5", "[0, 1]"]),
    (dict(skip_beta=[None, None, None, None, 0.2, None]), ["skip_beta[4] = 0.2", "was removed"]),
    (dict(quant={"method": "rtn", "bits": 8, "group_size": 32}), ["moekern.quant.bits = 8", "must be 4"]),
    (dict(quant="rtn"), ["moekern.quant = \"rtn\"", "object"]),
    (dict(recipe_order="XY"), ["moekern.recipe_order = \"XY\""]),
]


@pytest.mark.parametrize("changes,words", CASES, ids=[str(c[0])[:40] for c in CASES])
def test_a_broken_field_is_named_before_any_weight_is_read(saved, tmp_path, monkeypatch, changes, words):
    folder, config = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "config.json").write_text(json.dumps(edited(config, **changes)))

    def no_reading(path):
        raise AssertionError("weights were read before config.json was checked")

    monkeypatch.setattr(checkpoint, "read_weights", no_reading)
    with pytest.raises(MoekernError) as caught:
        moekern.load(broken)
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert "config.json" in message


def test_the_saved_decisions_are_valid_and_load(saved):
    folder, config = saved
    validate_decisions(config["moekern"], config)
    model, _ = moekern.load(folder)
    assert surgery.decisions(model)["dropped_blocks"] == [1]


def test_a_uniform_expert_drop_stores_fewer_experts(tmp_path):
    """The one case where the config's expert count differs from original_num_experts: every MoE layer kept the same
    number of experts; that number must then be every entry's length."""
    model = tiny_model("mixtral")
    surgery.drop_experts(model, {i: [0, 1, 4, 5] for i in range(3)})
    moekern.save(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 4
    validate_decisions(config["moekern"], config)
    bad = edited(config, kept_experts=[[0, 1, 4, 5], [0, 1, 4], [0, 1, 4, 5]])
    with pytest.raises(MoekernError, match="original_num_experts = 6 does not fit num_local_experts = 4"):
        validate_decisions(bad["moekern"], bad)


def test_the_cli_says_it_in_one_line(saved, tmp_path, capsys):
    folder, config = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "config.json").write_text(json.dumps(edited(config, dropped_blocks=[1, 1])))
    assert main(["info", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dropped_blocks = [1, 1]" in err and len(err.strip().splitlines()) == 1
