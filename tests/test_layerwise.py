"""Streaming one decoder layer at a time reproduces the model's own hidden states."""

import torch
from tiny_models import rel_err, tiny_model

from moekern.compress.layerwise import stream_layers


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
