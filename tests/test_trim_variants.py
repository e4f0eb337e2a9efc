"""The papers' Expert Trimming variants against computations written here from the authors' code: Expert Drop by
Eq. 11 without a floor (He et al.'s global_pruning: one torch.topk over every layer's scores), the top-k routing
score (their DeepseekExpertDropWrapper), enumeration pruning on every token with Lu et al.'s loss (their
PrunableMixtralSparseMoeBlockWrapper.enumerate); the memory check of enumeration; the paper's calibration sources in
their published formats; all of it from the command line."""

import gzip
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from moekern import surgery
from moekern.cli import main
from moekern.compression.trimming import enum_prune as enum_module
from moekern.compression.calibration import read_documents
from moekern.compression.recipe import Recipe, run_recipe
from moekern.compression.trimming.stats import measure
from moekern.errors import MoekernError


def calibration(n=4, length=12, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def router_probabilities(model, ids):
    """Per MoE layer, the softmax over all experts of every token [T, E], from the router weights by hand on the MoE
    inputs of an ordinary forward."""
    seen, handles = {}, []
    for index, layer in enumerate(surgery.decoder_layers(model)):
        if not surgery.is_moe_block(layer.mlp):
            continue

        def grab(module, args, index=index):
            seen[index] = args[0].reshape(-1, args[0].shape[-1]).detach()

        handles.append(layer.mlp.register_forward_pre_hook(grab))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {i: torch.softmax(x.double() @ surgery.decoder_layers(model)[i].mlp.gate.weight.detach().double().T, -1)
            for i, x in seen.items()}


@pytest.mark.parametrize("text,expected", [
    ("gptq4:g64:act:sym", "gptq4:g64:act:sym"), ("GPTQ4:SYM:ACT", "gptq4:act:sym"), ("awq4:autoawq", "awq4:autoawq"),
    ("gptq4:autogptq", "gptq4:autogptq"), ("wanda=0.5:shared", "wanda=0.5:shared"),
    ("sparsegpt=2:4:shared", "sparsegpt=2:4:shared"), ("expert-drop=2:topk:nofloor", "expert-drop=2:nofloor:topk"),
    ("expert-drop=3:layerwise:nofloor", "expert-drop=3:layerwise:nofloor"), ("enum-prune=6:all", "enum-prune=6:all"),
])
def test_the_options_parse_to_their_canonical_form(text, expected):
    assert str(Recipe.parse(text)) == expected and str(Recipe.parse(expected)) == expected


@pytest.mark.parametrize("text,message", [
    ("awq4:act", "awq4 takes :g128, :g64, :g32, :autoawq, not :act"),
    ("gptq4:autogptq:sym", "already means act-order"),
    ("expert-drop=2:global:layerwise", "choose one of :global or :layerwise"),
    ("expert-drop=2:topk:topk", "repeated"),
    ("enum-prune=4:every", "takes no option other than :all"),
    ("wanda=0.5:everything", "then optionally :shared"),
    ("rtn4:sym", "rtn4 takes :g128, :g64, :g32, not :sym"),
])
def test_unknown_options_are_rejected(text, message):
    with pytest.raises(MoekernError, match=message):
        Recipe.parse(text)


def test_global_expert_drop_without_floor_is_equation_11():
    model = tiny_model("mixtral")  # 3 layers x 6 experts, top-2
    with torch.no_grad():  # layer 1 routes uniformly (every score 1/6), the others peakily
        surgery.decoder_layers(model)[1].mlp.gate.weight.zero_()
        for i in (0, 2):
            surgery.decoder_layers(model)[i].mlp.gate.weight.mul_(3.0)
    ids = calibration(6, 16)
    probs = router_probabilities(model, ids)
    scores = torch.cat([probs[i].mean(0) for i in range(3)])  # the authors' global_scores
    dropped = set(torch.topk(scores, 5 * 3, largest=False).indices.tolist())
    expected = {i: [e for e in range(6) if 6 * i + e not in dropped] for i in range(3)}
    assert expected[1] == []  # the uniform layer loses every expert
    assert min(len(kept) for i, kept in expected.items() if i != 1) < 2  # and a peaky one falls below top_k

    result = run_recipe(model, "expert-drop=5:nofloor", ids)
    d = surgery.decisions(result.model)
    assert result.steps[0]["kept_experts"] == expected
    assert d["dropped_moe_layers"] == [1]  # no expert left: its norm and MoE go, as Layer Drop
    assert [d["kept_experts"][i] for i in (0, 2)] == [expected[0], expected[2]]
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()
    with pytest.raises(MoekernError, match="top_k"):  # with the floor this count cannot be dropped
        run_recipe(model, "expert-drop=5", ids)
    with pytest.raises(MoekernError, match="every expert"):
        run_recipe(model, "expert-drop=6:nofloor", ids)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_topk_score_is_the_mean_of_the_top_k_routing_weights(family):
    model = tiny_model(family)
    ids = calibration()
    stats = measure(model, ids)
    probs = router_probabilities(model, ids)
    top_k = model.config.num_experts_per_tok
    renormalize = family == "mixtral" or model.config.norm_topk_prob
    for i in stats.moe_layers():
        weights, index = probs[i].topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        expected = torch.zeros_like(probs[i]).scatter(1, index, weights).mean(0)
        assert torch.allclose(stats.layers[i].expert_topk_scores.double(), expected, atol=1e-6)
    layer = stats.moe_layers()[0]
    kept = run_recipe(model, "expert-drop=2:layerwise:topk", ids).steps[0]["kept_experts"][layer]
    order = stats.layers[layer].expert_topk_scores.argsort(descending=True)[:4].sort().values.tolist()
    assert kept == order


def lu_et_al_losses(model, ids, layer_index, keep, batch_size):
    """PrunableMixtralSparseMoeBlockWrapper.enumerate for one layer: per calibration batch, the block's input X and
    output Z of the unpruned model; for each dropped set, the block with those logits at -inf (softmax, top-k,
    renormalised), the experts run by hand; loss = sum over batches of ||Z - Z'||_F."""
    layer = surgery.decoder_layers(model)[layer_index]
    block = layer.mlp
    cache = []
    handle = block.register_forward_hook(
        lambda m, args, out: cache.append((args[0].reshape(-1, args[0].shape[-1]).double(),
                                           (out[0] if isinstance(out, tuple) else out).reshape(-1, 32).double())))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size], use_cache=False)
    handle.remove()
    w_gu, w_d = block.experts.gate_up_proj.detach().double(), block.experts.down_proj.detach().double()
    inter, experts = w_d.shape[-1], w_gu.shape[0]
    losses = {}
    for dropped in itertools.combinations(range(experts), experts - keep):
        loss = 0.0
        for x, z in cache:
            logits = x @ block.gate.weight.detach().double().T
            logits[:, list(dropped)] = float("-inf")
            weights, chosen = torch.softmax(logits, dim=1).topk(model.config.num_experts_per_tok, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out = torch.zeros_like(z)
            for slot in range(chosen.shape[1]):
                for e in chosen[:, slot].unique().tolist():
                    rows = chosen[:, slot] == e
                    h = x[rows] @ w_gu[e].T
                    out[rows] += weights[rows, slot, None] * ((F.silu(h[:, :inter]) * h[:, inter:]) @ w_d[e].T)
            loss += float(torch.linalg.norm(z - out))
        losses[tuple(e for e in range(experts) if e not in dropped)] = loss
    return losses


def test_enumeration_on_all_tokens_is_lu_et_als():
    model = tiny_model("mixtral")
    ids = calibration(5, 16)  # batches of 2, 2 and 1 sequences
    result = run_recipe(model, "enum-prune=4:all", ids, batch_size=2)
    found = result.steps[0]["enum_prune"]
    for layer in range(3):
        losses = lu_et_al_losses(model, ids, layer, 4, batch_size=2)
        best = min(losses, key=losses.get)
        assert found[layer]["kept"] == list(best) and found[layer]["search"] == "exact, all tokens"
        assert found[layer]["error"] == pytest.approx(losses[best], rel=1e-5)
    assert result.stats.layers[0].moe_inputs is None  # no token was stored: the losses were summed per batch
    assert len(result.stats.layers[0].subset_losses[0]) == math.comb(6, 4)


def test_enumeration_that_cannot_fit_in_memory_is_refused_before_work(monkeypatch):
    assert enum_module.enumeration_bytes(8, 6) == math.comb(8, 6) * (64 + 8 * 6 + 8 + 8) + 4 * (1 << 26)
    model = tiny_model("mixtral")
    ids = calibration()
    monkeypatch.setattr(enum_module, "available_memory", lambda: 10_000_000)
    calls = []
    monkeypatch.setattr("moekern.compression.trimming.stats.measure", lambda *a, **k: calls.append(1))
    with pytest.raises(MoekernError, match=r"C\(6, 4\) = 15 subsets per layer.*memory"):
        run_recipe(model, "enum-prune=4:all", ids)
    assert not calls  # refused before any calibration pass
    monkeypatch.undo()
    big = tiny_model("qwen3_moe", num_experts=64, num_experts_per_tok=8)  # 64 experts: C(64, 48) ~ 4.9e14
    with pytest.raises(MoekernError, match=r"C\(64, 48\) = 4.89e\+14 subsets.*use enum-prune=48"):
        run_recipe(big, "enum-prune=48:all", ids)


# ----------------------------------------------------------------------------------------------------------------------
# The paper's calibration sources, in the formats they are published in
# ----------------------------------------------------------------------------------------------------------------------
def test_c4_pile_and_alpaca_are_read_as_published(tmp_path):
    import zstandard

    c4 = [{"text": f"C4 document {i}.", "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}
          for i in range(3)]
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in c4))
    pile = [{"text": f"Pile document {i}\nwith two lines.", "meta": {"pile_set_name": "Pile-CC"}} for i in range(4)]
    (tmp_path / "val.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in pile).encode()))
    alpaca = [{"instruction": "Give a synonym.", "input": "happy", "output": "glad"},
              {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca, indent=4))

    assert read_documents(f"c4:{tmp_path / 'c4-train.00000-of-01024.json.gz'}") == [r["text"] for r in c4]
    assert read_documents(f"pile:{tmp_path / 'val.jsonl.zst'}") == [r["text"] for r in pile]
    expected = ["Instruction:\nGive a synonym.\nInput:\nhappy\nOutput:\nglad",  # AutoGPTQ's default template
                "Instruction:\nName a colour.\nOutput:\nBlue."]
    assert read_documents(f"alpaca:{tmp_path / 'alpaca_data.json'}") == expected
    assert read_documents(tmp_path / "alpaca_data.json") == expected  # recognised without the name too
    with pytest.raises(MoekernError, match="not alpaca as published"):
        read_documents(f"alpaca:{tmp_path / 'val.jsonl.zst'}")
    (tmp_path / "notes.txt").write_text("plain text is not the Pile's format")
    with pytest.raises(MoekernError, match="unknown format"):
        read_documents(f"pile:{tmp_path / 'notes.txt'}")


# ----------------------------------------------------------------------------------------------------------------------
# From the command line
# ----------------------------------------------------------------------------------------------------------------------
def test_the_options_run_from_the_command_line(tmp_path):
    calib = tmp_path / "alpaca_data.json"
    calib.write_text(json.dumps([{"instruction": f"Say {i} things about Python.", "input": "",
                                  "output": "It has modules, classes and functions. " * 20} for i in range(40)]))
    out = tmp_path / "out"
    assert main(["compress", "shipped", "--recipe", "gptq4:autogptq+expert-drop=2:nofloor:topk", "--samples", "2",
                 "--seq-len", "32", "--quant-calib", f"alpaca:{calib}", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["gptq4:autogptq", "expert-drop=2:nofloor:topk"]
    assert report["decisions"]["quant"]["scheme"] == "autogptq"
    assert json.loads((out / "config.json").read_text())["moekern"]["recipe"] == "gptq4:autogptq+expert-drop=2:nofloor:topk"


def test_bad_options_and_oversized_enumerations_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["compress", "shipped", "--recipe", "awq4:sym", "--out", str(tmp_path / "x")]) == 2
    assert "awq4 takes" in capsys.readouterr().err
    monkeypatch.setattr(enum_module, "available_memory", lambda: 1000)
    assert main(["compress", "shipped", "--recipe", "enum-prune=6:all", "--samples", "2", "--seq-len", "32",
                 "--device", "cpu", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "C(8, 6) = 28 subsets per layer" in err and "Traceback" not in err
