"""Dropped experts, skipped slots, removed MoE layers and removed blocks, each against an independent computation."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import rel_err, tiny_model

from moekern import surgery
from moekern.errors import MoekernError

FP32_BOUND = 1e-5


def mixtral_block_by_hand(block_weights, x, kept, top_k, beta=None):
    """Mixtral's MoE restricted to `kept` experts, one token at a time: softmax over the survivors, top-k,
    renormalise; with beta, slots below beta * top weight are dropped and the rest renormalised to 1."""
    router, w13, w2 = block_weights
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(router[kept] @ x[t], dim=0)
        k = min(top_k, len(kept))
        top, idx = probs.topk(k)
        w = top / top.sum()
        if beta is not None:
            keep = w >= beta * w.max()
            w, idx = w[keep] / w[keep].sum(), idx[keep]
        for weight, i in zip(w, idx, strict=True):
            gate, up = (w13[kept[i]] @ x[t]).chunk(2)
            out[t] += weight * (w2[kept[i]] @ (F.silu(gate) * up))
    return out


def weights_of(layer):
    mlp = layer.mlp
    return mlp.gate.weight.detach().clone(), mlp.experts.gate_up_proj.detach().clone(), mlp.experts.down_proj.detach().clone()


@pytest.mark.parametrize("kept", [[0, 2, 3, 5], [1, 4], [3]], ids=["four", "exactly_top_k", "fewer_than_top_k"])
@pytest.mark.parametrize("mask_only", [False, True])
def test_drop_experts_matches_the_survivors_router(kept, mask_only):
    model = tiny_model("mixtral")
    layer = model.model.layers[1]
    original = weights_of(layer)
    x = torch.randn(7, 32)
    surgery.drop_experts(model, {1: kept}, mask_only=mask_only)
    with torch.no_grad():
        got = layer.mlp(x[None])[0]
    assert rel_err(got, mixtral_block_by_hand(original, x, kept, top_k=2)) <= FP32_BOUND
    stored = layer.mlp.experts.gate_up_proj.shape[0]
    assert stored == (6 if mask_only else len(kept))  # compact storage really shrinks
    assert layer.mlp.gate.weight.shape[0] == stored
    assert model.config.moekern["kept_experts"] == [None, kept, None]


def test_compact_and_mask_only_give_the_same_model_output():
    ids = torch.randint(3, 97, (2, 9))
    outputs = []
    for mask_only in (False, True):
        model = tiny_model("qwen2_moe")  # shared expert, a dense layer and no renormalisation
        surgery.drop_experts(model, {0: [0, 1, 5], 2: [2, 3], 3: [1, 2, 3, 4]}, mask_only=mask_only)
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert rel_err(outputs[0], outputs[1]) <= FP32_BOUND


def test_uniform_expert_drop_equals_a_smaller_transformers_model():
    """Dropping the same number of experts everywhere is a standard architecture: build it with transformers."""
    model = tiny_model("mixtral")
    kept = {0: [0, 1, 2, 5], 1: [1, 2, 3, 4], 2: [0, 3, 4, 5]}
    small = tiny_model("mixtral", num_local_experts=4)
    state = {}
    for name, tensor in model.state_dict().items():
        layer = next((i for i in kept if f"layers.{i}.mlp." in name), None)
        state[name] = tensor[kept[layer]] if layer is not None and ("experts" in name or "gate" in name) else tensor
    small.load_state_dict(state)
    surgery.drop_experts(model, kept)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, small(ids).logits) <= FP32_BOUND


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0], ids=["off", "median_like", "every_token_skips"])
def test_skip_matches_by_hand(beta):
    model = tiny_model("mixtral")
    layer = model.model.layers[0]
    original = weights_of(layer)
    x = torch.randn(9, 32)
    surgery.set_skip_beta(model, {0: beta})
    with torch.no_grad():
        got = layer.mlp(x[None])[0]
    assert rel_err(got, mixtral_block_by_hand(original, x, list(range(6)), top_k=2, beta=beta)) <= FP32_BOUND


def test_skip_with_dropped_experts_and_top_k_of_three():
    model = tiny_model("deepseek_v3")  # sigmoid, groups, correction bias, shared experts, k=3
    ids = torch.randint(3, 97, (1, 12))
    surgery.drop_experts(model, {1: [0, 1, 2, 5, 6], 2: [1, 3, 4, 7]})
    surgery.set_skip_beta(model, {1: 0.5, 2: 1.0})
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    block = model.model.layers[2].mlp
    x = torch.randn(5, 32)
    from moekern.ops.reference import route

    logits = torch.full((5, 8), float("-inf")).index_copy_(1, block.kept_experts, x @ block.gate.weight.T)
    bias = torch.zeros(8).index_copy_(0, block.kept_experts, block.gate.e_score_correction_bias)
    weights, chosen = route(logits, block.spec, block.alive, bias, skip_beta=1.0)
    assert ((chosen >= 0).sum(-1) == 1).all(), "beta = 1 leaves one slot per token"
    assert torch.allclose(weights.sum(-1), torch.full((5,), block.spec.scaling))  # renormalised x routed scaling


def test_remove_moe_layer_passes_the_residual_through():
    model = tiny_model("olmoe")
    surgery.remove_moe_layers(model, [1])
    layer = model.model.layers[1]
    seen = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=out[0]))
    layer.register_forward_hook(lambda m, args, out: seen.update(y=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 8)))
    assert rel_err(seen["y"], seen["x"] + seen["attn"]) <= FP32_BOUND
    assert not any("layers.1.mlp" in n or "layers.1.post_attention" in n for n in model.state_dict())
    assert model.config.moekern["dropped_moe_layers"] == [1]


@pytest.mark.parametrize("family,drop", [("mixtral", [1]), ("qwen3_moe", [0]), ("qwen2_moe", [1, 2]),
                                         ("deepseek_v3", [0]), ("gpt_oss", [0])])
def test_remove_blocks_equals_a_model_built_without_them(family, drop):
    """The model with blocks removed equals a fresh transformers model of the kept layers, in prefill and in
    cached generation; config fields (layer_types, dense layers) are renumbered so that this holds."""
    model = tiny_model(family)
    n = model.config.num_hidden_layers
    kept = [i for i in range(n) if i not in drop]
    surgery.remove_blocks(model, drop)
    assert model.config.num_hidden_layers == len(kept)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(kept)))

    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    fresh.load_state_dict(model.state_dict())  # shapes (dense vs MoE per layer) must agree with the new config
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        assert rel_err(model(ids).logits, fresh(ids).logits) <= FP32_BOUND
        a = model.generate(ids, max_new_tokens=5, do_sample=False)
        b = fresh.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert model.config.moekern["dropped_blocks"] == drop


def test_bad_requests_are_refused_with_clear_errors():
    model = tiny_model("mixtral")
    with pytest.raises(MoekernError, match="leave no decoder layer"):
        surgery.remove_blocks(model, [0, 1, 2])
    with pytest.raises(MoekernError, match="does not exist"):
        surgery.remove_blocks(model, [7])
    with pytest.raises(MoekernError, match="Layer Drop"):
        surgery.drop_experts(model, {0: []})
    with pytest.raises(MoekernError, match="distinct experts"):
        surgery.drop_experts(model, {0: [1, 1]})
    with pytest.raises(MoekernError, match=r"\[0, 1\]"):
        surgery.set_skip_beta(model, {0: 1.5})
    surgery.remove_blocks(model, [1])
    with pytest.raises(MoekernError, match="removed by Block Drop"):
        surgery.drop_experts(model, {1: [0, 1]})
    dense = tiny_model("qwen2_moe")
    with pytest.raises(MoekernError, match="dense layer"):
        surgery.drop_experts(dense, {1: [0, 1]})


def test_moe_block_buffers_of_a_meta_skeleton_stay_on_the_cpu():
    """MoEBlock puts its routing buffers on its weights' device (checked on a GPU by the kernel tests with
    MOEKERN_TEST_GPU=1), except for moekern.load's meta skeleton, whose replay of the decisions reads them."""
    model = tiny_model("mixtral").to("meta")
    block = surgery.moe_block(model, 0)
    assert {t.device.type for t in (block.alive, block.kept_experts, block.expert_row)} == {"cpu"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_router_logits_and_aux_loss_are_recorded_through_moe_blocks(family):
    """output_router_logits (the load-balancing loss of fine-tuning) sees moekern's blocks as it sees HF's: the same
    logits and loss while nothing is dropped; after Expert Drop, the original expert count with -inf for a dropped
    expert, and a finite loss whose gradient is finite."""
    model = tiny_model(family)
    model.config.router_aux_loss_coef = 0.1
    ids = torch.randint(3, 97, (2, 7))
    expected = model(ids, labels=ids, output_router_logits=True)
    layers = surgery.moe_layer_ids(model)
    for layer in layers:
        surgery.moe_block(model, layer)  # swapped in, routing unchanged
    got = model(ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(expected.router_logits) == len(layers)
    for g, e in zip(got.router_logits, expected.router_logits, strict=True):
        assert rel_err(g, e) <= 1e-5
    assert torch.allclose(got.aux_loss, expected.aux_loss, rtol=1e-5)

    surgery.drop_experts(model, {layers[0]: [0, 2, 3]})
    out = model(ids, labels=ids, output_router_logits=True)
    first = out.router_logits[0]
    assert first.shape == expected.router_logits[0].shape
    dropped = [e for e in range(first.shape[1]) if e not in (0, 2, 3)]
    assert torch.isinf(first[:, dropped]).all() and torch.isfinite(first[:, [0, 2, 3]]).all()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.aux_loss) and grads and all(torch.isfinite(g).all() for g in grads)
