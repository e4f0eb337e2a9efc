"""`moekern serve` on the shipped model compressed by each recipe: vLLM's greedy tokens over HTTP equal moekern's own
generate in float32. The standard-architecture results are served with no plugin loaded at all."""

import json

import pytest
import torch

import moekern

PROMPTS = ["The with statement", "A class definition creates", "def f(x):\n    return"]
MAX_TOKENS = 24
RECIPES = {  # recipe: a standard architecture (vLLM's own class, no plugin needed)
    "expert-drop=2:layerwise": True,
    "expert-drop=3": False,  # global: a different expert count per layer
    "layer-drop=2": False,
    "block-drop=2": True,
    "skip": False,
    "enum-prune=6+layer-drop=1": False,
}


def moekern_tokens(folder) -> list[list[int]]:
    model, tokenizer = moekern.load(folder, dtype=torch.float32)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_served_tokens_equal_moekerns(recipe, compressed, serve):
    folder = compressed(recipe)
    config = json.loads((folder / "config.json").read_text())
    standard = RECIPES[recipe]
    assert config["architectures"] == (["MixtralForCausalLM"] if standard else ["MoekernMixtralForCausalLM"])
    expected = moekern_tokens(folder)
    # a standard result needs no plugin: VLLM_PLUGINS names none, so vLLM loads no plugin at all
    server = serve(folder, env={"VLLM_PLUGINS": ""} if standard else None)
    load_seconds = server.wait_ready()
    served = server.complete(PROMPTS, MAX_TOKENS)
    assert served == expected, f"{recipe}: vLLM {served} != moekern {expected} (server up in {load_seconds:.0f} s)"
