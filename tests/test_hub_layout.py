"""Checkpoints on disk: each family's hub layout (the keys transformers' save_pretrained writes), moekern's own
model_type for results transformers cannot hold, registration with transformers' Auto classes, and folders of the
earlier in-memory layout that must keep loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, rel_err, tiny_model
from transformers import AutoModelForCausalLM

import moekern
from moekern import surgery
from moekern.errors import MoekernError
from moekern.hub_layout import state_for_disk, state_from_disk
from moekern.compression.slimming import QuantConfig, quantize_

OLD_LAYOUT = Path(__file__).parent / "data" / "old_layout"
ROOT = Path(__file__).parents[1]


def keys(folder) -> list[str]:
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_are_what_save_pretrained_writes(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "hf")
    moekern.save(model, tmp_path / "mk")
    assert keys(tmp_path / "mk") == keys(tmp_path / "hf")
    assert config(tmp_path / "mk")["model_type"] == family
    # a uniform Expert Drop and a removed block: still the family's architecture, and save_pretrained's keys
    moekern.patch(model)
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {layer: [0, 2, 3, 5] for layer in moe})
    surgery.remove_blocks(model, [moe[-1]])
    moekern.save(model, tmp_path / "trimmed")
    moekern.unpatch(model)
    model.save_pretrained(tmp_path / "trimmed-hf")
    assert keys(tmp_path / "trimmed") == keys(tmp_path / "trimmed-hf")


def test_the_shipped_model_is_written_as_it_ships(tmp_path, shipped):
    model, _ = shipped
    moekern.save(model, tmp_path / "out")
    assert keys(tmp_path / "out") == keys(moekern.shipped.MODEL_DIR)  # tied lm_head kept as model.embed_tokens


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss"])
def test_4bit_experts_per_expert_where_the_hub_splits_them(family):
    model = tiny_model(family)
    moekern.patch(model)
    surgery.drop_experts(model, {0: [1, 2, 4]})
    quantize_(model, QuantConfig("rtn", group_size=8, quantize_attention=True))
    experts = model.model.layers[0].mlp.experts
    state = state_for_disk(model)
    if family == "mixtral":
        prefix = "model.layers.0.block_sparse_moe.experts"
        assert torch.equal(state[f"{prefix}.2.w1.qweight"], experts.gate_up_proj_qweight[2, :, :24])  # gate
        assert torch.equal(state[f"{prefix}.2.w3.zeros"], experts.gate_up_proj_zeros[2, :, 24:])  # up
        assert torch.equal(state[f"{prefix}.0.w2.scales"], experts.down_proj_scales[0])
        assert not any("gate_up_proj" in k for k in state)
    elif family == "olmoe":
        assert torch.equal(state["model.layers.0.mlp.experts.1.up_proj.qweight"], experts.gate_up_proj_qweight[1, :, 24:])
    else:  # GPT-OSS's hub layout stacks its experts: so do the 4-bit ones
        assert torch.equal(state["model.layers.0.mlp.experts.gate_up_proj_qweight"], experts.gate_up_proj_qweight)
    assert state["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    back = state_from_disk(model, state)
    expected = model.state_dict()
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_awq_input_scales_and_single_group_round_trip():
    """AWQ input scales (shared by gate and up) and a group as wide as the input (size-1 dims) survive the layout."""
    model = tiny_model("qwen3_moe", moe_intermediate_size=8)
    quantize_(model, QuantConfig("rtn", group_size=8, quantize_attention=False))
    for module in model.modules():
        if hasattr(module, "gate_up_proj_qweight"):
            module.register_buffer("gate_up_proj_input_scale", torch.rand(module.num_experts, 32) + 0.5)
            module.register_buffer("down_proj_input_scale", torch.rand(module.num_experts, 8) + 0.5)
    state = state_for_disk(model)
    assert state["model.layers.1.mlp.experts.3.gate_proj.input_scale"].shape == (32,)
    assert state["model.layers.1.mlp.experts.3.down_proj.qweight"].shape == (1, 32)  # K / 8 = 1 row
    assert state["model.layers.1.mlp.experts.3.down_proj.scales"].shape == (1, 32)  # one group over I = 8
    back = state_from_disk(model, state)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    state["model.layers.1.mlp.experts.3.up_proj.input_scale"] = state["model.layers.1.mlp.experts.3.up_proj.input_scale"] * 2
    with pytest.raises(MoekernError, match="different input scales"):
        state_from_disk(model, state)


def nonstandard(model):
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {moe[0]: [0, 2, 3]})  # a different count in one layer
    surgery.set_skip_beta(model, {moe[-1]: 0.3})
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_nonstandard_results_get_moekern_names_and_load_through_auto(tmp_path, family):
    model = nonstandard(tiny_model(family))
    ids = torch.randint(3, 97, (2, 7))
    expected = logits(model, ids)
    moekern.save(model, tmp_path / "out")
    written = config(tmp_path / "out")
    assert written["model_type"] == f"moekern_{family}"
    assert written["architectures"] == [moekern.architectures.architecture(family)]
    assert written["moekern"]["skip_beta"].count(None) == len(written["moekern"]["skip_beta"]) - 1
    for loaded in (moekern.load(tmp_path / "out")[0], AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert loaded.config.model_type == family  # in memory: the family's own transformers class
        assert rel_err(logits(loaded, ids), expected) <= 1e-5


@pytest.mark.parametrize("edit", ["layer-drop", "masked", "4-bit", "grouped"])
def test_every_nonstandard_edit_is_named_and_auto_loads_it_right(tmp_path, edit):
    """Each edit that plain transformers used to load silently wrong (re-initialised experts or norms, routing to
    masked experts) is named, and AutoModelForCausalLM after `import moekern` gives the saved model's logits."""
    family = "deepseek_v3" if edit == "grouped" else "mixtral"
    model = tiny_model(family)
    moe = surgery.moe_layer_ids(model)
    if edit == "layer-drop":
        surgery.remove_moe_layers(model, [moe[0]])
    elif edit == "masked":
        surgery.drop_experts(model, {layer: [0, 1, 2, 3] for layer in moe}, mask_only=True)
    elif edit == "4-bit":
        quantize_(model, QuantConfig("rtn", group_size=8))
    else:  # the same count everywhere, but the router's expert groups need the original numbering
        surgery.drop_experts(model, {layer: [0, 1, 2, 3] for layer in moe})
    ids = torch.randint(3, 97, (2, 7))
    expected = logits(model, ids)
    moekern.save(model, tmp_path / "out")
    assert config(tmp_path / "out")["model_type"] == f"moekern_{family}"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert rel_err(logits(loaded, ids), expected) <= 1e-5


def test_a_moekern_type_is_checked_as_its_family(tmp_path):
    """The schema check reads a moekern_* config as its family's: an expert count that does not fit the decisions
    is named by the family's own field (Qwen3-MoE stores num_experts as num_local_experts), not refused as an
    unknown model type."""
    moekern.save(nonstandard(tiny_model("qwen3_moe")), tmp_path / "out")
    written = config(tmp_path / "out")
    assert written["model_type"] == "moekern_qwen3_moe"
    written["num_experts"] = written.get("num_experts", written.get("num_local_experts")) - 1
    written.pop("num_local_experts", None)
    (tmp_path / "out" / "config.json").write_text(json.dumps(written))
    with pytest.raises(MoekernError, match="does not fit num_experts"):
        moekern.load(tmp_path / "out")


def test_auto_model_from_pretrained_takes_dtype_and_refuses_what_moekern_load_cannot_do(tmp_path):
    model = nonstandard(tiny_model("olmoe"))
    moekern.save(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(MoekernError, match="does not take"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", quantization_config={"load_in_8bit": True})
    with pytest.raises(MoekernError, match="not from its config"):
        AutoModelForCausalLM.from_config(moekern.hf_classes.CONFIGS["olmoe"]())


def test_without_moekern_transformers_refuses_a_moekern_checkpoint(tmp_path):
    """The silent wrong load of before (a skip model loading as plain Mixtral) is now an error naming the type."""
    moekern.save(nonstandard(tiny_model("mixtral")), tmp_path / "out")
    script = ("import sys; from transformers import AutoModelForCausalLM\n"
              "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "except ValueError as exc:\n    print('REFUSED', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert "REFUSED" in done.stdout and "moekern_mixtral" in done.stdout, done.stdout + done.stderr


def test_import_moekern_stays_light_and_registers_on_first_use():
    script = ("import sys, moekern\n"
              "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
              "from transformers import AutoConfig\n"
              "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
              "print('moekern_qwen3_moe' in CONFIG_MAPPING)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.stdout.strip() == "True", done.stderr


def test_import_moekern_after_transformers_registers_at_once():
    """The other order: transformers' Auto classes are loaded before moekern, so no import hook is left waiting."""
    script = ("import sys\n"
              "from transformers import AutoModelForCausalLM\n"
              "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
              "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
              "import moekern\n"
              "from moekern.architectures import _HOOK\n"
              "config = CONFIG_MAPPING['moekern_mixtral']\n"
              "print(MODEL_FOR_CAUSAL_LM_MAPPING[config].__name__, _HOOK in sys.meta_path)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.stdout.strip() == "MoekernMixtralForCausalLM False", done.stderr


@pytest.mark.parametrize("name", ["mixtral-trimmed", "olmoe-rtn4"])
def test_folders_in_the_earlier_layout_still_load(name):
    recorded = json.loads((OLD_LAYOUT / "expected.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in "".join(keys(OLD_LAYOUT / name))  # written in-memory style
    model, _ = moekern.load(OLD_LAYOUT / name)
    with torch.no_grad():
        out = model.generate(torch.tensor(recorded["prompt"]), max_new_tokens=8, do_sample=False)
    assert out.tolist() == recorded["generated"][name]
