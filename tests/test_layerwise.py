"""Streaming one decoder layer at a time reproduces the model's own hidden states."""

import torch
from tiny_models import rel_err, tiny_model

from moekern.compression.layerwise import stream_layers


def test_streamed_layers_give_the_models_hidden_states():
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 97, (5, 10))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states  # embeddings, then after each layer
    seen = []
    for index, _, run in stream_layers(model, ids, batch_size=2):
        seen.append(torch.cat(run()))
    assert len(seen) == model.config.num_hidden_layers
    for index, got in enumerate(seen[:-1]):  # the last entry of hidden_states is after the final norm
        assert rel_err(got, expected[index + 1]) <= 1e-5


def test_changes_to_a_layer_reach_the_next_layers_inputs():
    model = tiny_model("mixtral")
    ids = torch.randint(3, 97, (3, 6))
    firsts = []
    for index, layer, run in stream_layers(model, ids, batch_size=3):
        firsts.append(torch.cat(run()))
        if index == 0:
            with torch.no_grad():
                layer.self_attn.o_proj.weight.zero_()  # the caller "compresses" layer 0
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    assert rel_err(firsts[1], expected[2]) <= 1e-5  # layer 1 saw layer 0 as changed


def test_each_layer_gets_its_own_attention_mask():
    """GPT-OSS alternates sliding-window and full attention (config.layer_types): with a window (4) shorter than the
    sequence (12), each streamed layer must get its own mask, and its outputs must be the full forward's."""
    model = tiny_model("gpt_oss", num_hidden_layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert model.config.sliding_window < 12
    ids = torch.randint(3, 97, (3, 12))
    layers = model.model.layers
    expected, handles = [], []
    for layer in layers:
        handles.append(layer.register_forward_hook(
            lambda module, args, out: expected.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    assert rel_err(expected[0], hidden_states[1]) <= 1e-6
    seen = []
    for _, _, run in stream_layers(model, ids, batch_size=2):
        seen.append(torch.cat(run()))
    for index, (got, want) in enumerate(zip(seen, expected, strict=True)):
        assert rel_err(got, want) <= 1e-5, f"layer {index} ({model.config.layer_types[index]})"
    # the check has teeth: the full-attention layer given the sliding layer's mask computes something else
    from moekern.compression.layerwise import call_layer, layer_inputs

    ((_, per_layer),) = layer_inputs(model, ids, batch_size=3)
    with torch.no_grad():
        right = call_layer(layers[1], expected[0], per_layer[1], "cpu")
        wrong = call_layer(layers[1], expected[0], per_layer[0], "cpu")
    assert rel_err(right, expected[1]) <= 1e-5 and rel_err(wrong, expected[1]) > 1e-2
