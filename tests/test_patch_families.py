"""Patched models equal transformers' own output for every family, in prefill and in cached generation."""

import pytest
import torch
from tiny_models import FAMILIES, rel_err, tiny_model

from moekern import surgery
from moekern.errors import MoekernError
from moekern.modules import MoEBlock
from moekern.patching import is_patched, patch, unpatch

FP32_BOUND = 1e-5


def swap_every_block(model):
    """Route through moekern's own MoEBlock (its routing, not transformers') without changing any state."""
    for layer in surgery.moe_layer_ids(model):
        surgery.moe_block(model, layer)


def prefill_and_steps(model, ids, steps=4):
    """Logits of a prefill, then of `steps` single-token decode steps through the KV cache (greedy)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["experts_interface", "moe_block"])
def test_patched_equals_transformers(family, how):
    model = tiny_model(family)
    ids = torch.randint(3, 97, (2, 11))
    expected = prefill_and_steps(model, ids)
    original_blocks = [layer.mlp for layer in model.model.layers]
    implementation = model.config._experts_implementation

    patch(model)
    if how == "moe_block":
        swap_every_block(model)
        assert any(isinstance(layer.mlp, MoEBlock) for layer in model.model.layers)
    got = prefill_and_steps(model, ids)
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) <= FP32_BOUND

    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    unpatch(model)
    assert not is_patched(model) and model.config._experts_implementation == implementation
    assert all(layer.mlp is block for layer, block in zip(model.model.layers, original_blocks, strict=True))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), generated)


def test_one_token_and_empty_experts():
    """One token reaches only top_k experts: every other expert is empty in that batch."""
    model = tiny_model("mixtral")
    ids = torch.randint(3, 97, (1, 1))
    with torch.no_grad():
        expected = model(ids).logits
        patch(model)
        swap_every_block(model)
        assert rel_err(model(ids).logits, expected) <= FP32_BOUND


def test_unknown_family_is_refused_with_the_known_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(MoekernError, match="llama.*Known MoE families: .*mixtral"):
        patch(model)
