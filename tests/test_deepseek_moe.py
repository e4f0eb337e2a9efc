"""DeepSeek-MoE (model_type "deepseek", remote code) on a tiny checkpoint built from tests/deepseek_moe_remote, a
reduction of its public modeling_deepseek.py: refused without trust_remote_code; once trusted, moekern's blocks give
the remote code's own output; Expert Drop by the authors' DeepSeek score; save and load (the remote per-expert layout
on disk); Block Drop with cached generation; 4-bit; unpatch; the command line."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moekern
from moekern import surgery
from moekern.cli import main
from moekern.compression.recipe import run_recipe
from moekern.errors import MoekernError
from moekern.modules.moe import MoEBlock
from moekern.compression.slimming import QuantConfig, quantize_
from moekern.shipped import MODEL_DIR

REMOTE = Path(__file__).parent / "deepseek_moe_remote"
CONFIG = dict(vocab_size=4096, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
              num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder as deepseek-ai publishes one: config.json with auto_map, the two .py files, safetensors weights with
    the remote names (model.layers.1.mlp.experts.3.gate_proj.weight, ...), and a tokenizer."""
    import sys

    sys.path.insert(0, str(REMOTE.parent))
    from deepseek_moe_remote.configuration_deepseek import DeepseekConfig
    from deepseek_moe_remote.modeling_deepseek import DeepseekForCausalLM

    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("deepseek-moe-tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = {**DeepseekConfig(**CONFIG).to_dict(), "architectures": ["DeepseekForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        shutil.copy(REMOTE / name, folder / name)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(folder)
    return folder


def remote(checkpoint):
    """The checkpoint's own code, untouched by moekern."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()


def ids(n=3, length=10, seed=0):
    return torch.randint(3, 4096, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def test_remote_code_runs_only_when_trusted(checkpoint, capsys):
    with pytest.raises(MoekernError, match="--trust-remote-code"):
        moekern.load(checkpoint)
    assert main(["info", str(checkpoint), "--device", "cpu"]) == 2
    assert "trust-remote-code" in capsys.readouterr().err


def test_moekern_blocks_give_the_remote_codes_output(checkpoint):
    reference = remote(checkpoint)
    model, tokenizer = moekern.load(checkpoint, trust_remote_code=True)
    layers = surgery.decoder_layers(model)
    assert not isinstance(layers[0].mlp, MoEBlock) and all(isinstance(l.mlp, MoEBlock) for l in layers[1:])
    assert surgery.moe_layer_ids(model) == [1, 2] and layers[1].mlp.experts.gate_up_proj.shape == (8, 32, 32)
    x = ids()
    expected = logits(reference, x)
    assert (logits(model, x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    patched = moekern.patch(copy.deepcopy(reference))  # patch() adopts a model loaded by transformers too
    assert (logits(patched, x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    moekern.unpatch(patched)
    assert isinstance(surgery.decoder_layers(patched)[1].mlp.experts, torch.nn.ModuleList)
    assert (logits(patched, x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_expert_drop_by_the_authors_deepseek_score(checkpoint):
    """He et al.'s DeepseekExpertDropWrapper: MoEGate's (topk_idx, topk_weight) scattered into [T, E], averaged;
    global dropping without a floor: one torch.topk over every layer's scores."""
    reference = remote(checkpoint)
    x = ids(4, 12)
    scores, handles = {}, []
    for index, layer in enumerate(reference.model.layers):
        if hasattr(layer.mlp, "gate"):
            def grab(module, args, out, index=index):
                topk_idx, topk_weight, _ = out
                scores[index] = torch.zeros(topk_idx.shape[0], 8).scatter(1, topk_idx, topk_weight).mean(0)

            handles.append(layer.mlp.gate.register_forward_hook(grab))
    logits(reference, x)
    for h in handles:
        h.remove()
    flat = torch.cat([scores[1], scores[2]])
    dropped = set(torch.topk(flat, 3 * 2, largest=False).indices.tolist())
    expected = {i: [e for e in range(8) if 8 * (i - 1) + e not in dropped] for i in (1, 2)}
    model, _ = moekern.load(checkpoint, trust_remote_code=True)
    result = run_recipe(model, "expert-drop=3:nofloor:topk", x)
    assert result.steps[0]["kept_experts"] == expected
    assert torch.allclose(result.stats.layers[1].expert_topk_scores, scores[1], atol=1e-6)


def test_save_and_load_keep_the_remote_layout(checkpoint, tmp_path):
    model, tokenizer = moekern.load(checkpoint, trust_remote_code=True)
    x = ids()
    moekern.drop_experts(model, {1: [0, 2, 3, 5, 7], 2: [1, 2, 4, 6]})  # different counts per layer
    expected = logits(model, x)
    moekern.save(model, tmp_path / "global", tokenizer=tokenizer)
    names = load_file(tmp_path / "global" / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.4.up_proj.weight" in names and "model.layers.1.mlp.experts.5.up_proj.weight" \
        not in names and not any("gate_up_proj" in n for n in names)
    assert (tmp_path / "global" / "modeling_deepseek.py").exists()
    again, _ = moekern.load(tmp_path / "global", trust_remote_code=True)
    assert torch.equal(logits(again, x), expected)
    assert surgery.decisions(again)["kept_experts"][1:] == [[0, 2, 3, 5, 7], [1, 2, 4, 6]]

    uniform, _ = moekern.load(checkpoint, trust_remote_code=True)
    moekern.drop_experts(uniform, {1: [0, 1, 2, 5, 6, 7], 2: [0, 2, 3, 4, 5, 6]})
    moekern.save(uniform, tmp_path / "uniform")
    assert json.loads((tmp_path / "uniform" / "config.json").read_text())["n_routed_experts"] == 6
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", trust_remote_code=True).eval()
    assert (logits(plain, x) - logits(uniform, x)).abs().max() <= 1e-5 * logits(uniform, x).abs().max()


def test_block_drop_generates_with_the_cache(checkpoint, tmp_path):
    model, tokenizer = moekern.load(checkpoint, trust_remote_code=True)
    moekern.remove_blocks(model, [0])  # the dense first layer
    assert model.config.first_k_dense_replace == 0 and model.config.num_hidden_layers == 2
    prompt = ids(1, 6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = prompt
        for _ in range(5):
            uncached = torch.cat([uncached, logits(model, uncached)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached)
    moekern.save(model, tmp_path / "b1")
    again, _ = moekern.load(tmp_path / "b1", trust_remote_code=True)
    assert torch.equal(logits(again, cached), logits(model, cached))


def test_four_bit_round_trip(checkpoint, tmp_path):
    model, _ = moekern.load(checkpoint, trust_remote_code=True)
    x = ids()
    quantize_(model, QuantConfig("gptq", group_size=16, scheme="autogptq"), x)
    expected = logits(model, x)
    moekern.save(model, tmp_path / "q")
    again, _ = moekern.load(tmp_path / "q", trust_remote_code=True)
    assert torch.equal(logits(again, x), expected)
    with pytest.raises(MoekernError, match="4-bit"):
        moekern.unpatch(again)


def test_the_command_line_compresses_it(checkpoint, tmp_path, capsys):
    args = ["compress", str(checkpoint), "--recipe", "wanda=0.5:shared+expert-drop=2:topk", "--samples", "2",
            "--seq-len", "16", "--device", "cpu", "--out", str(tmp_path / "c")]
    assert main(args) == 2 and "trust-remote-code" in capsys.readouterr().err
    assert main([*args, "--trust-remote-code"]) == 0
    model, _ = moekern.load(tmp_path / "c", trust_remote_code=True)
    shared = surgery.decoder_layers(model)[1].mlp.shared_experts.gate_proj.weight
    assert float((shared == 0).double().mean()) == pytest.approx(0.5)
    assert [len(k) for k in surgery.decisions(model)["kept_experts"][1:]] in ([6, 6], [5, 7], [7, 5], [4, 8], [8, 4])
