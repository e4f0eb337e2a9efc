"""The trimming methods against independent computations on tiny models: the statistics recomputed by hand from
forward hooks on an ordinary forward pass, planted redundant layers found, enumeration checked by brute force through
the model's own (masked) MoE block, beta the median ratio."""

import copy
import itertools

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from moekern import surgery
from moekern.compression.trimming.depth_drop import block_drop, layer_drop
from moekern.compression.trimming.enum_prune import enum_prune
from moekern.compression.trimming.expert_drop import choose_kept_experts, expert_drop
from moekern.compression.trimming.skip import dynamic_skip, skip_thresholds
from moekern.compression.trimming.stats import LayerStats, TrimStats, measure
from moekern.errors import MoekernError

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]


def calibration(n=4, length=12, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def captured_forward(model, ids):
    """An ordinary forward pass with hooks: per layer, the block input/output, the post-attention residual and the
    MoE input/output, all [T, H]."""
    seen, handles = {}, []
    for index, layer in enumerate(surgery.decoder_layers(model)):
        rec = seen.setdefault(index, {})

        def block_in(m, args, kwargs, rec=rec):
            rec["block_in"] = (kwargs.get("hidden_states", args[0] if args else None)).flatten(0, 1)

        def block_out(m, args, out, rec=rec):
            rec["block_out"] = (out[0] if isinstance(out, tuple) else out).flatten(0, 1)

        def residual(m, args, rec=rec):
            rec["residual"] = args[0].flatten(0, 1)

        def moe(m, args, out, rec=rec):
            rec["moe_in"] = args[0].flatten(0, 1)
            rec["moe_out"] = (out[0] if isinstance(out, tuple) else out).flatten(0, 1)

        handles += [layer.register_forward_pre_hook(block_in, with_kwargs=True),
                    layer.register_forward_hook(block_out),
                    layer.post_attention_layernorm.register_forward_pre_hook(residual),
                    layer.mlp.register_forward_hook(moe)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def mean_cos(a, b):
    a, b = a.double(), b.double()
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


def hand_scores(model, layer, x):
    """Mean routing score of each expert, from the router weights by hand."""
    router = getattr(layer.mlp, "router", None) or layer.mlp.gate
    logits = x.double() @ router.weight.detach().double().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.detach().double()
    if model.config.model_type == "deepseek_v3":
        return torch.sigmoid(logits).mean(0)
    return torch.softmax(logits, dim=-1).mean(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_match_a_hand_computation(family):
    model = tiny_model(family)  # GPT-OSS: sliding then full attention, each layer calibrated with its own mask
    ids = calibration()
    stats = measure(model, ids, batch_size=3)  # two uneven batches
    seen = captured_forward(model, ids)
    assert stats.tokens == ids.numel()
    for index, layer in enumerate(surgery.decoder_layers(model)):
        got, rec = stats.layers[index], seen[index]
        assert got.block_similarity == pytest.approx(mean_cos(rec["block_in"], rec["block_out"]), abs=1e-5)
        assert got.moe == surgery.is_moe_block(layer.mlp)
        if not got.moe:
            continue
        x, y, residual = rec["moe_in"], rec["moe_out"], rec["residual"]
        assert got.s_m == pytest.approx(mean_cos(x, y), abs=1e-5)
        assert got.s_nm == pytest.approx(mean_cos(residual, residual + y), abs=1e-5)
        assert torch.allclose(got.expert_scores.double(), hand_scores(model, layer, x), atol=1e-5)
        assert got.moe_inputs.shape == x.shape  # fewer tokens than the cap: all of them, in some order
        order = torch.cdist(got.moe_inputs, x).argmin(dim=1)
        assert sorted(order.tolist()) == list(range(x.shape[0]))
        assert torch.allclose(got.moe_outputs, y[order], atol=1e-5)


def test_token_sample_is_bounded_and_reproducible():
    model = tiny_model("mixtral")
    a = measure(model, calibration(6, 16), max_tokens=20, max_ratios=30, seed=1)
    b = measure(model, calibration(6, 16), max_tokens=20, max_ratios=30, seed=1)
    for i in a.moe_layers():
        assert a.layers[i].moe_inputs.shape == (20, 32) and a.layers[i].weight_ratios.shape == (30,)
        assert torch.equal(a.layers[i].moe_inputs, b.layers[i].moe_inputs)


def test_beta_is_the_median_ratio_of_second_to_first_weight():
    model = tiny_model("mixtral")
    ids = calibration()
    stats = measure(model, ids)
    seen = captured_forward(model, ids)
    betas = skip_thresholds(stats)
    for index, layer in enumerate(surgery.decoder_layers(model)):
        probs = torch.softmax(seen[index]["moe_in"].double() @ layer.mlp.gate.weight.detach().double().T, dim=-1)
        top = probs.topk(2, dim=-1).values
        ratios = (top[:, 1] / top[:, 0]).detach().numpy()
        assert betas[index] == pytest.approx(float(np.median(ratios)), abs=1e-6)
        assert skip_thresholds(stats, 0.3)[index] == pytest.approx(float(np.quantile(ratios, 0.3)), abs=1e-6)
    assert dynamic_skip(model, stats) == betas
    assert surgery.decisions(model)["skip_beta"] == [betas[i] for i in range(3)]
    assert surgery.moe_block(model, 1).skip_beta == betas[1]


def test_top3_ratios_are_each_non_top_weight_over_the_top_one():
    model = tiny_model("deepseek_v3")  # top-3, sigmoid, groups
    stats = measure(model, calibration())
    for i in stats.moe_layers():
        ratios = stats.layers[i].weight_ratios
        assert ratios.numel() == 2 * stats.tokens and bool(((ratios > 0) & (ratios <= 1)).all())


def plant_identity_block(model, index):
    """Make decoder layer `index` return its input: attention and experts add nothing."""
    layer = surgery.decoder_layers(model)[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()


def plant_idle_moe(model, index, scale=0.0):
    with torch.no_grad():
        surgery.decoder_layers(model)[index].mlp.experts.down_proj.mul_(scale)


@pytest.mark.parametrize("iterative", [False, True])
def test_block_drop_finds_the_planted_identity_blocks(iterative):
    model = tiny_model("mixtral", num_hidden_layers=5)
    plant_identity_block(model, 1)
    plant_identity_block(model, 3)
    stats = measure(model, calibration())
    assert stats.layers[1].block_similarity == pytest.approx(1.0, abs=1e-6)
    assert block_drop(model, stats, 2, iterative=iterative) == [1, 3]
    assert surgery.decisions(model)["dropped_blocks"] == [1, 3] and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("iterative", [False, True])
def test_layer_drop_finds_the_planted_idle_moe_layers(iterative):
    model = tiny_model("qwen2_moe")  # layer 1 is dense: never a Layer Drop candidate
    for layer in (0, 3):
        plant_idle_moe(model, layer)
        with torch.no_grad():
            surgery.decoder_layers(model)[layer].mlp.shared_expert.down_proj.weight.zero_()
    stats = measure(model, calibration())
    assert stats.layers[3].s_nm == pytest.approx(1.0, abs=1e-6) and 1 not in stats.moe_layers()
    assert layer_drop(model, stats, 2, iterative=iterative) == [0, 3]
    assert surgery.decisions(model)["dropped_moe_layers"] == [0, 3]
    assert surgery.moe_layer_ids(model) == [2]


def test_iterative_drop_measures_again_after_each_removal(monkeypatch):
    model = tiny_model("mixtral", num_hidden_layers=4)
    stats = measure(model, calibration())
    calls = []
    original = TrimStats.remeasure

    def counting(self, model, **kw):
        calls.append(kw)
        return original(self, model, **kw)

    monkeypatch.setattr(TrimStats, "remeasure", counting)
    block_drop(model, stats, 3, iterative=True)
    assert len(calls) == 2 and all(kw == {"record_tokens": False} for kw in calls)


def fake_stats(scores: list[list[float]]) -> TrimStats:
    layers = {i: LayerStats(i, 0.5, moe=True, expert_scores=torch.tensor(s), alive=torch.ones(len(s), dtype=torch.bool))
              for i, s in enumerate(scores)}
    return TrimStats(layers, 1, torch.zeros(1, 1, dtype=torch.long))


def test_expert_drop_layerwise_and_global_choices():
    stats = fake_stats([[0.01, 0.02, 0.03, 0.04, 0.9], [0.3, 0.25, 0.2, 0.15, 0.1]])
    # layer-wise: the 2 lowest of each layer
    assert choose_kept_experts(stats, 2, "layerwise") == {0: [2, 3, 4], 1: [0, 1, 2]}
    # global: the 4 lowest scores are all in layer 0, but it keeps top_k=2: the 4th drop comes from layer 1
    assert choose_kept_experts(stats, 2, "global", top_k=2) == {0: [3, 4], 1: [0, 1, 2, 3]}
    assert choose_kept_experts(stats, 2, "global", top_k=2, allow_fewer=True) == {0: [4], 1: [0, 1, 2, 3, 4]}
    assert choose_kept_experts(stats, 3, "global", top_k=2) == {0: [3, 4], 1: [0, 1]}
    with pytest.raises(MoekernError, match="allow-fewer-experts"):
        choose_kept_experts(stats, 4, "global", top_k=2)
    with pytest.raises(MoekernError, match="allow-fewer-experts"):
        choose_kept_experts(stats, 4, "layerwise", top_k=2)
    assert choose_kept_experts(stats, 4, "layerwise", top_k=2, allow_fewer=True) == {0: [4], 1: [0]}


def test_expert_drop_on_a_model_follows_the_measured_scores():
    model = tiny_model("mixtral")
    ids = calibration()
    stats = measure(model, ids)
    kept = expert_drop(model, stats, 2, mode="layerwise")
    for index, layer in enumerate(surgery.decoder_layers(model)):
        order = stats.layers[index].expert_scores.argsort(descending=True)[:4].sort().values.tolist()
        assert kept[index] == order
        assert layer.mlp.experts.gate_up_proj.shape[0] == 4  # weights freed
    assert surgery.decisions(model)["kept_experts"] == [kept[0], kept[1], kept[2]]
    # measured again, the dropped experts score 0 and are not alive
    again = measure(model, ids)
    assert again.layers[0].alive.sum() == 4 and again.layers[0].expert_scores[~again.layers[0].alive].abs().max() == 0
    global_kept = expert_drop(model, again, 1, mode="global")
    assert sum(len(v) for v in global_kept.values()) == 12 - 3 and min(len(v) for v in global_kept.values()) >= 2


def brute_force_errors(model, stats, layer, keep):
    """Reconstruction error of every subset, through the model's own MoE block with the other experts masked."""
    recorded = stats.layers[layer]
    errors = {}
    for subset in itertools.combinations(recorded.alive.nonzero().flatten().tolist(), keep):
        trial = copy.deepcopy(model)
        surgery.drop_experts(trial, {layer: list(subset)}, mask_only=True)
        with torch.no_grad():
            out = surgery.moe_block(trial, layer)(recorded.moe_inputs[None])
        out = (out[0] if isinstance(out, tuple) else out)[0]
        errors[subset] = float((out - recorded.moe_outputs).norm())
    return errors


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_exact_enumeration_equals_brute_force(family):
    model = tiny_model(family)
    stats = measure(model, calibration())
    oracle = {i: brute_force_errors(model, stats, i, 4) for i in stats.moe_layers()[:2]}
    found = enum_prune(model, stats, 4)
    for i, errors in oracle.items():
        best = min(errors, key=errors.get)
        assert found[i]["search"] == "exact" and found[i]["kept"] == list(best)
        assert found[i]["error"] == pytest.approx(errors[best], rel=1e-4)
    assert surgery.decisions(model)["kept_experts"][0] == found[0]["kept"]


def test_greedy_fallback_with_many_experts():
    model = tiny_model("mixtral", num_local_experts=16, num_hidden_layers=1)
    stats = measure(model, calibration())
    found = enum_prune(copy.deepcopy(model), stats, 6)  # C(16, 6) = 8008 > 5000 subsets
    assert found[0]["search"] == "greedy" and len(found[0]["kept"]) == 6
    # the same greedy removal, computed through the real block with masks
    current = list(range(16))
    while len(current) > 6:
        trials = {}
        for out in current:
            subset = [e for e in current if e != out]
            trial = copy.deepcopy(model)
            surgery.drop_experts(trial, {0: subset}, mask_only=True)
            with torch.no_grad():
                y = surgery.moe_block(trial, 0)(stats.layers[0].moe_inputs[None])[0]
            trials[out] = float((y - stats.layers[0].moe_outputs).norm())
        current.remove(min(current, key=lambda e: (trials[e], e)))
    assert found[0]["kept"] == current


def test_greedy_is_never_better_than_exact():
    model = tiny_model("mixtral", num_hidden_layers=1)
    stats = measure(model, calibration())
    exact = enum_prune(copy.deepcopy(model), stats, 3)[0]
    greedy = enum_prune(copy.deepcopy(model), stats, 3, max_subsets=1)[0]
    assert greedy["search"] == "greedy" and greedy["error"] >= exact["error"] - 1e-6


def test_enum_prune_keeps_top_k_unless_allowed():
    model = tiny_model("mixtral", num_hidden_layers=1)
    stats = measure(model, calibration())
    with pytest.raises(MoekernError, match="top_k=2"):
        enum_prune(model, stats, 1)
    assert len(enum_prune(model, stats, 1, allow_fewer=True)[0]["kept"]) == 1
