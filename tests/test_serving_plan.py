"""What moekern's vLLM classes build per layer (moekern.serving.plan), checked without vLLM: the plans read from a
saved folder, and moekern's routing as vLLM's fused MoE uses it (every slot computed, over the stored experts) gives
the MoE output of moekern's own block."""

import pytest
import torch
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.architectures import base_config
from moekern.errors import MoekernError
from moekern.models import family_of
from moekern.ops import reference
from moekern.serving.plan import MoekernRouting, layer_plans, stored_expert_counts

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def compressed(family):
    """Every per-layer edit at once: a compact drop, one below top_k, masked experts, skip, a removed MoE and a
    removed block."""
    layers = {"qwen3_moe": 10, "qwen2_moe": 7}.get(family, 6)  # at least five MoE layers
    model = tiny_model(family, num_hidden_layers=layers, layer_types=["full_attention"] * layers)
    moekern.patch(model)
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {moe[0]: [0, 2, 3, 5], moe[1]: [4]})
    surgery.drop_experts(model, {moe[2]: [1, 2, 3, 5]}, mask_only=True)
    surgery.set_skip_beta(model, {moe[0]: 0.5, moe[2]: 0.3, moe[3]: 0.9})
    surgery.remove_moe_layers(model, [moe[3]])
    surgery.remove_blocks(model, [moe[4]])
    return model


def plans_of(folder):
    from transformers import AutoConfig

    config = base_config(AutoConfig.from_pretrained(folder))
    return config, layer_plans(config, stored_expert_counts(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_style_routing_gives_moekerns_moe_output(tmp_path, family):
    model = compressed(family)
    moekern.save(model, tmp_path / "out")
    config, plans = plans_of(tmp_path / "out")
    d = model.config.moekern
    assert [p.original for p in plans] == surgery.original_layer_ids(model)
    assert {p.original for p in plans if p.removed} == set(d["dropped_moe_layers"])
    checked = 0
    for plan in plans:
        if not plan.moe or plan.removed:
            continue
        block = surgery.moe_block(model, plan.original)  # an untouched layer becomes a MoEBlock, same output
        assert list(plan.alive) == (d["kept_experts"][plan.original] or list(range(d["original_num_experts"])))
        assert len(plan.rows) == block.experts.num_experts and plan.skip_beta == block.skip_beta
        x = torch.randn(13, model.config.hidden_size)
        router = getattr(block, block.family.router_attr)
        stored_logits = block.family.router_logits(router, x)  # what vLLM's gate gives: one logit per stored expert
        bias = block.family.correction_bias(router)
        routing = MoekernRouting(plan, config, correction_bias=bias)
        weights, rows = routing(x, stored_logits, plan.top_k, True)
        assert rows.dtype == torch.int32 and weights.shape == rows.shape == (13, plan.top_k)
        assert all(len(set(r)) == plan.top_k for r in rows.tolist())  # vLLM wants distinct experts per token
        w_gu, w_d = block.experts.gate_up_proj, block.experts.down_proj
        act = reference.Activation()
        scaling = block.spec.scaling  # vLLM applies DeepSeek's routed scaling to the routed output
        ours = reference.moe_experts(x, rows.long(), weights, w_gu, w_d, act=act) * scaling
        ids, expected_weights = _moekern_routing(block, x)
        expected = reference.moe_experts(x, ids, expected_weights, w_gu, w_d, act=act)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 2


def _moekern_routing(block, x):
    from moekern.modules.experts import route

    router = getattr(block, block.family.router_attr)
    logits = block.family.router_logits(router, x)
    bias = block.family.correction_bias(router)
    if block.compact():
        full = logits.new_full((x.shape[0], block.num_original_experts), float("-inf"))
        logits = full.index_copy_(1, block.kept_experts, logits)
        if bias is not None:
            bias = bias.new_zeros(block.num_original_experts).index_copy_(0, block.kept_experts, bias)
    weights, ids = route(logits, block.spec, block.alive, bias, block.skip_beta)
    rows = block.expert_row[ids.clamp(min=0)].masked_fill(ids == reference.NO_EXPERT, reference.NO_EXPERT)
    return rows, weights


def test_native_routing_only_where_vllms_router_agrees(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=4, layer_types=["full_attention"] * 4)
    surgery.drop_experts(model, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    surgery.set_skip_beta(model, {2: 0.5})
    surgery.drop_experts(model, {3: [1, 2, 3]}, mask_only=True)
    moekern.save(model, tmp_path / "out")
    _, plans = plans_of(tmp_path / "out")
    assert [p.native_routing for p in plans] == [True, True, False, False]
    assert [len(p.rows) for p in plans] == [3, 4, 6, 6] and plans[3].alive == (1, 2, 3)

    grouped = tiny_model("deepseek_v3")
    surgery.drop_experts(grouped, {layer: [0, 1, 2, 3, 4, 5] for layer in surgery.moe_layer_ids(grouped)})
    moekern.save(grouped, tmp_path / "grouped")
    _, plans = plans_of(tmp_path / "grouped")
    assert [p.native_routing for p in plans if p.moe] == [False, False]  # groups are over the original experts


def test_a_checkpoint_whose_experts_do_not_match_its_decisions_is_refused(tmp_path):
    model = tiny_model("olmoe")
    surgery.drop_experts(model, {0: [0, 1, 2]})
    moekern.save(model, tmp_path / "out")
    config, _ = plans_of(tmp_path / "out")
    with pytest.raises(MoekernError, match="stores 5 experts"):
        layer_plans(config, {0: 5, 1: 6, 2: 6})
    assert family_of(config).name == "olmoe"
