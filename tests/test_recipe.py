"""Recipes: the string and the dataclass convert both ways, every mistake is caught before any work with a message,
compress() leaves the caller's model alone, applies the steps in the asked order and records the recipe; and the
`moekern compress` command on the shipped model writes a checkpoint that moekern.load reloads, and the report."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.compression.trimming.depth_drop import layer_drop
from moekern.compression.recipe import (BlockDrop, EnumPrune, ExpertDrop, LayerDrop, Prune, Quantize, Recipe, Skip,
                                     check_recipe, run_recipe)
from moekern.compression.trimming.stats import measure
from moekern.errors import MoekernError


@pytest.mark.parametrize("text,canonical", [
    ("rtn4", "rtn4"),
    ("AWQ4:g128", "awq4"),
    ("gptq4:g64+expert-drop=2", "gptq4:g64+expert-drop=2"),
    ("rtn4:g32+layer-drop=2:iterative+skip=q0.3", "rtn4:g32+layer-drop=2:iterative+skip=q0.3"),
    ("wanda=0.5+block-drop=4:oneshot", "wanda=0.5+block-drop=4"),
    ("sparsegpt=2:4 + expert-drop=1:layerwise + enum-prune=6", "sparsegpt=2:4+expert-drop=1:layerwise+enum-prune=6"),
    ("expert-drop=2:global+skip=q0.5", "expert-drop=2+skip"),
    ("block-drop=1:iterative", "block-drop=1:iterative"),
    ("rtn4:attn+skip", "rtn4:attn+skip"),
    ("gptq4:attn:autogptq:g64", "gptq4:g64:autogptq:attn"),
    ("rtn4:head:attn", "rtn4:attn:head"),
])
def test_parse_and_format_round_trip(text, canonical):
    recipe = Recipe.parse(text)
    assert str(recipe) == canonical
    assert Recipe.parse(str(recipe)) == recipe


def test_dataclass_round_trip():
    recipe = Recipe((Quantize("awq", group_size=64), ExpertDrop(2, "layerwise"), LayerDrop(3, iterative=True),
                     BlockDrop(1), EnumPrune(5), Skip(0.25)))
    assert str(recipe) == "awq4:g64+expert-drop=2:layerwise+layer-drop=3:iterative+block-drop=1+enum-prune=5+skip=q0.25"
    assert Recipe.parse(str(recipe)) == recipe
    assert Recipe.parse("sparsegpt=4:8").steps == (Prune("sparsegpt", None, 4, 8),)
    assert Recipe.parse("wanda=0.6").steps == (Prune("wanda", 0.6),)


def test_order_puts_slimming_first_or_last():
    recipe = Recipe.parse("layer-drop=1+rtn4+skip")
    assert [str(s) for s in recipe.ordered("ST")] == ["rtn4", "layer-drop=1", "skip"]
    assert [str(s) for s in recipe.ordered("TS")] == ["layer-drop=1", "skip", "rtn4"]
    with pytest.raises(MoekernError, match="order must be"):
        recipe.ordered("XY")


@pytest.mark.parametrize("text,message", [
    ("", "empty recipe"),
    ("layer-drop=2++skip", "empty step"),
    ("prune-everything", "unknown recipe step 'prune-everything'"),
    ("rtn8", "4 bits"),
    ("rtn", "write rtn4"),
    ("awq4:g100", ":g128, :g64 or :g32"),
    ("wanda=1.5", "between 0 and 1"),
    ("wanda=lots", "'lots' is not a number"),
    ("wanda", "give a sparsity"),
    ("sparsegpt=4:2", "0 < N < M"),
    ("expert-drop=two", "whole number"),
    ("expert-drop=0", "whole number >= 1"),
    ("expert-drop=1.5", "whole number"),
    ("expert-drop=2:sideways", "takes :global or :layerwise"),
    ("layer-drop", "give a count"),
    ("enum-prune=4:exact", "takes no option"),
    ("skip=0.3", "skip=q"),
    ("skip=q1.5", "between 0 and 1"),
    ("skip=qx", "not a number"),
    ("rtn4+awq4", "at most one Expert Slimming step"),
    ("skip+skip", "'skip' may appear once"),
])
def test_malformed_recipes_are_rejected(text, message):
    with pytest.raises(MoekernError, match=message):
        Recipe.parse(text)


@pytest.mark.parametrize("text,message", [
    ("block-drop=3", "would leave no decoder layer"),
    ("layer-drop=4", "only 3 MoE layers"),
    ("expert-drop=5", "keep at least top_k=2"),
    ("expert-drop=5:layerwise", "allow fewer experts than top_k"),
    ("enum-prune=1", "fewer than top_k=2"),
    ("enum-prune=6", "keep fewer than the 6 experts"),
    ("block-drop=2+layer-drop=2", "only 1 MoE layers"),  # at worst the blocks dropped were MoE layers
    ("layer-drop=3+skip", "no MoE layer is left"),
    ("expert-drop=1+expert-drop=1:layerwise", "drop fewer"),  # after a global drop, layers may be at top_k
    ("rtn4:g64", "group"),  # the tiny model's widths are not multiples of 64
])
def test_recipes_that_cannot_run_on_the_model_are_rejected_before_any_work(text, message):
    model = tiny_model("mixtral")  # 3 layers, 6 experts, top-2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MoekernError, match=message):
        moekern.compress(model, text, calibration=torch.randint(3, 97, (2, 8)), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model.config, "moekern", None)


def test_allow_fewer_lets_experts_go_below_top_k():
    model = tiny_model("mixtral")
    check_recipe(Recipe.parse("expert-drop=5+enum-prune=1"), model, allow_fewer=True)
    out = moekern.compress(model, "expert-drop=4:layerwise", calibration=torch.randint(3, 97, (2, 8)),
                           allow_fewer=True)
    assert [len(k) for k in surgery.decisions(out)["kept_experts"]] == [2, 2, 2]


def test_slimming_says_when_moekern_quant_is_missing(monkeypatch):
    # importing the slimming methods now raises ImportError
    monkeypatch.setitem(sys.modules, "moekern.compression.slimming", None)
    with pytest.raises(MoekernError, match="not available in this build"):
        moekern.compress(tiny_model("mixtral"), "awq4+layer-drop=1", calibration=torch.randint(3, 97, (2, 8)))


def test_compress_copies_the_model_and_records_the_recipe():
    model = tiny_model("mixtral", num_hidden_layers=4)
    ids = torch.randint(3, 97, (3, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = moekern.compress(model, "layer-drop=2", calibration=ids)
    assert out is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model.config, "moekern", None)
    d = surgery.decisions(out)
    assert d["recipe"] == "layer-drop=2" and d["recipe_order"] == "ST"
    direct = tiny_model("mixtral", num_hidden_layers=4)
    assert d["dropped_moe_layers"] == layer_drop(direct, measure(direct, ids), 2)
    same = moekern.compress(model, Recipe((LayerDrop(1),)), calibration=ids, inplace=True)
    assert same is model and len(surgery.decisions(model)["dropped_moe_layers"]) == 1  # inplace: the caller's model


def test_slimming_and_trimming_in_both_orders():
    model = tiny_model("mixtral", intermediate_size=32)
    ids = torch.randint(3, 97, (3, 10))
    for order in ("ST", "TS"):
        result = run_recipe(model, "rtn4:g32+layer-drop=1", ids, order=order)
        assert [s["step"] for s in result.steps] == (["rtn4:g32", "layer-drop=1"] if order == "ST"
                                                     else ["layer-drop=1", "rtn4:g32"])
        d = surgery.decisions(result.model)
        assert d["quant"]["group_size"] == 32 and len(d["dropped_moe_layers"]) == 1 and d["recipe_order"] == order
        assert result.after["state_bytes"] < result.before["state_bytes"]
        with torch.no_grad():
            assert torch.isfinite(result.model(ids).logits).all()


def test_attn_quantizes_the_attention_projections_too(tmp_path):
    from moekern.modules.quant import QuantizedExperts, QuantizedLinear

    model = tiny_model("mixtral", intermediate_size=32)
    ids = torch.randint(3, 97, (2, 6))
    experts_only = moekern.compress(model, "rtn4:g32")
    with_attention = moekern.compress(model, "rtn4:g32:attn")
    for out in (experts_only, with_attention):
        assert any(isinstance(m, QuantizedExperts) for m in out.modules())
    attention = [m for name, m in with_attention.named_modules() if ".self_attn." in name]
    assert attention and all(isinstance(m, QuantizedLinear) for m in attention if isinstance(m, (QuantizedLinear,
                                                                                                 torch.nn.Linear)))
    assert sum(isinstance(m, QuantizedLinear) for m in attention) == 4 * model.config.num_hidden_layers
    assert not any(isinstance(m, QuantizedLinear) for name, m in experts_only.named_modules() if ".self_attn." in name)
    assert surgery.decisions(with_attention)["recipe"] == "rtn4:g32:attn"
    with torch.no_grad():
        expected = with_attention(ids).logits
    moekern.save(with_attention, tmp_path / "out")
    loaded, _ = moekern.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 4 * model.config.num_hidden_layers


@pytest.mark.parametrize("tied", [False, True])
def test_head_quantizes_the_lm_head_too(tmp_path, tied):
    """:head puts a 4-bit lm_head (RTN) in place; a tied one gets its own 4-bit copy, the embedding stays as it was,
    and the saved model reloads with the same logits."""
    from moekern.compression.slimming.rtn import fake_quantize
    from moekern.modules.quant import QuantizedLinear

    model = tiny_model("mixtral", intermediate_size=32, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    embedding = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    ids = torch.randint(3, 97, (2, 6))
    out = moekern.compress(model, "rtn4:g32:head")
    assert isinstance(out.lm_head, QuantizedLinear) and isinstance(model.lm_head, torch.nn.Linear)  # a copy
    assert torch.equal(out.model.embed_tokens.weight, embedding) and not out.config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied  # the source model is left as it was
    hidden = torch.randn(3, head.shape[1])
    with torch.no_grad():  # what the 4-bit lm_head computes: RTN's dequantized weight (the CPU kernel rounds its
        # activations to int8 per block of 32: about 0.5% of the output's norm)
        want = hidden @ fake_quantize(head, 32).T
        assert (out.lm_head(hidden) - want).norm() <= 0.02 * want.norm()
        expected = out(ids).logits
    assert surgery.decisions(out)["recipe"] == "rtn4:g32:head"
    moekern.save(out, tmp_path / "out")
    loaded, _ = moekern.load(tmp_path / "out")
    assert isinstance(loaded.lm_head, QuantizedLinear) and torch.equal(loaded.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_a_recipe_without_calibration_data_says_how_to_give_it():
    with pytest.raises(MoekernError, match="needs calibration data"):
        moekern.compress(tiny_model("mixtral"), "layer-drop=1")


def moekern_cli(*args):
    return subprocess.run([sys.executable, "-m", "moekern", *args], capture_output=True, text=True, timeout=600)


def test_cli_compress_writes_a_checkpoint_and_the_report(tmp_path):
    out = tmp_path / "trimmed"
    result = moekern_cli("compress", "shipped", "--recipe", "layer-drop=2+expert-drop=1+skip", "--out", str(out),
                         "--samples", "4", "--seq-len", "64", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "compress_report.md", "compress_report.json",
                 "similarity.png", "dropped.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "compress_report.json").read_text())
    assert report["recipe"] == "layer-drop=2+expert-drop=1+skip" and report["calibration_shape"] == [4, 64]
    assert report["after"]["parameters"] < report["before"]["parameters"]
    model, tokenizer = moekern.load(out)
    d = surgery.decisions(model)
    assert d["recipe"] == report["recipe"] and d["dropped_moe_layers"] == report["decisions"]["dropped_moe_layers"]
    assert len(d["dropped_moe_layers"]) == 2 and sum(k is not None for k in d["kept_experts"]) >= 1
    assert sum(p.numel() for p in model.parameters()) == report["after"]["parameters"]
    ids = tokenizer("The with statement", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("args,message", [
    (["--recipe", "layer-drop=x"], "whole number"),
    (["--recipe", "block-drop=8"], "would leave no decoder layer"),
    (["--recipe", "layer-drop=1", "--calib", "/no/such/corpus.jsonl"], "does not exist"),
])
def test_cli_compress_mistakes_exit_2_without_a_traceback(tmp_path, args, message):
    result = moekern_cli("compress", "shipped", "--out", str(tmp_path / "x"), "--device", "cpu", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
