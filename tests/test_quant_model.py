"""quantize_ on whole models: decisions, save/load, calibration one layer at a time, RTN fallbacks, bad input."""

import gc
import weakref

import pytest
import torch
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.errors import MoekernError
from moekern.modules.quant import QuantizedExperts, QuantizedLinear
from moekern.compression.slimming import PruneConfig, QuantConfig, prune_, quantize_
from moekern.compression.slimming.calibrate import LayerCapture


def calibration(n=4, length=16, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("family, method", [("mixtral", "awq"), ("qwen3_moe", "gptq"), ("gpt_oss", "awq"),
                                            ("deepseek_v3", "rtn")])
def test_save_load_of_a_quantized_model_generates_identical_tokens(tmp_path, family, method):
    model = tiny_model(family)
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {moe[0]: [0, 1, 3, 4, 5]})  # quantization after Expert Drop
    report = quantize_(model, QuantConfig(method, group_size=8, quantize_attention=True), calibration())
    assert surgery.decisions(model)["quant"] == {"method": method, "bits": 4, "group_size": 8}
    assert report["experts"] > 0 and len(report["layers"]) == model.config.num_hidden_layers
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    ids = torch.randint(3, 97, (2, 5))
    expected = generate(model, ids)
    moekern.save(model, tmp_path / "out")
    loaded, _ = moekern.load(tmp_path / "out")
    assert torch.equal(generate(loaded, ids), expected)
    assert sum(isinstance(m, QuantizedExperts) for m in loaded.modules()) == len(moe)
    assert loaded.config.moekern["quant"] == model.config.moekern["quant"]


def test_quantized_output_stays_close_and_the_router_stays_16_bit():
    model = tiny_model("mixtral")
    ids = calibration(seed=1)
    with torch.no_grad():
        reference = model(ids).logits
    quantize_(model, QuantConfig("gptq", group_size=8, act_order=True), calibration(n=16))
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, QuantizedExperts)
        assert isinstance(layer.mlp.gate.weight, torch.nn.Parameter)  # the router is untouched
        assert isinstance(layer.self_attn.q_proj, torch.nn.Linear)  # attention stays 16-bit by default
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        error = (model(ids).logits - reference).norm() / reference.norm()
    assert error < 0.25


def test_an_expert_without_calibration_tokens_falls_back_to_rtn_and_is_counted():
    model = tiny_model("mixtral", num_hidden_layers=2)
    surgery.drop_experts(model, {1: [0, 1, 2, 3, 5]}, mask_only=True)  # expert 4 stays stored, never routed
    report = quantize_(model, QuantConfig("awq", group_size=8), calibration())
    assert report["layers"][1]["fallback_rtn"] == 1 and report["fallback_rtn"] == 1
    assert report["layers"][1]["experts"] == 6


def test_calibration_holds_one_layer_at_a_time():
    """12 layers: at every layer's calibration, count the bytes of all live tensors that are not the model's own
    (captured inputs, statistics, activations). If anything of earlier layers were kept, it would grow with the
    layer index; it must stay flat. Only one layer's captured inputs are alive at any time."""
    model = tiny_model("mixtral", num_hidden_layers=12)
    active, samples, captures = [], [], weakref.WeakSet()

    def extra_bytes():
        own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        seen, total = set(), 0
        for obj in gc.get_objects():
            if type(obj) is torch.Tensor and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in own and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    original_enter, original_exit = LayerCapture.__enter__, LayerCapture.__exit__

    def enter(self):
        active.append(self.layer_index)
        assert len(active) == 1, f"captures of layers {active} active at once"
        gc.collect()
        alive = [c.layer_index for c in captures if c is not self]
        assert not alive, f"layer {self.layer_index} is captured while the inputs of layers {alive} are still alive"
        captures.add(self)
        return original_enter(self)

    def exit_(self, *exc):
        if self.layer_index in (1, 6, 11):
            samples.append(extra_bytes())  # everything of this layer is still alive here: its peak
        active.remove(self.layer_index)
        return original_exit(self, *exc)

    LayerCapture.__enter__, LayerCapture.__exit__ = enter, exit_
    try:
        quantize_(model, QuantConfig("gptq", group_size=8), calibration(n=8, length=16))
    finally:
        LayerCapture.__enter__, LayerCapture.__exit__ = original_enter, original_exit
    assert len(samples) == 3
    assert max(samples) <= 1.5 * samples[0], samples  # flat: the 12th layer costs what the 2nd did


@pytest.mark.parametrize("config, message", [
    (QuantConfig(bits=8), "4 bits only"),
    (QuantConfig(bits=3), "4 bits only"),
    (QuantConfig(group_size=64), "does not divide"),  # the tiny models' widths are 32 and 24
    (QuantConfig(group_size=12), "multiple of 8"),
    (QuantConfig(method="hqq"), "unknown quantization method"),
    (QuantConfig(method="awq", act_order=True), "GPTQ option"),
])
def test_bad_quant_configs(config, message):
    with pytest.raises(MoekernError, match=message):
        quantize_(tiny_model("mixtral", num_hidden_layers=1), config, calibration())


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_bad_calibration_data(method):
    model = tiny_model("mixtral", num_hidden_layers=1)
    config = QuantConfig(method, group_size=8)
    with pytest.raises(MoekernError, match="needs calibration data"):
        quantize_(model, config, None)
    with pytest.raises(MoekernError, match="integer token ids"):
        quantize_(model, config, calibration().float())
    with pytest.raises(MoekernError, match="integer token ids"):
        quantize_(model, config, torch.full((2, 4), float("nan")))
    with pytest.raises(MoekernError, match="vocabulary"):
        quantize_(model, config, calibration() + 1000)
    with pytest.raises(MoekernError, match=r"\[n, L\]"):
        quantize_(model, config, calibration()[0])
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    with pytest.raises(MoekernError, match="NaN"):
        quantize_(model, config, torch.full((2, 4), 5))
    assert surgery.decisions(model)["quant"] is None  # nothing recorded by a failed call


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_needs_calibration(method):
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(MoekernError, match="needs calibration data"):
        prune_(model, PruneConfig(method), None)
    with pytest.raises(MoekernError, match="integer token ids"):
        prune_(model, PruneConfig(method), calibration().double())


def test_quantizing_twice_and_pruning_a_quantized_model_are_refused():
    model = tiny_model("mixtral", num_hidden_layers=1)
    quantize_(model, QuantConfig("rtn", group_size=8))
    with pytest.raises(MoekernError, match="already quantized"):
        quantize_(model, QuantConfig("rtn", group_size=8))
    with pytest.raises(MoekernError, match="before quantizing"):
        prune_(model, PruneConfig("wanda"), calibration())


def test_awq_folds_the_qkv_scale_into_input_layernorm():
    """q, k, v share one AWQ scale folded into input_layernorm (exact: nothing else reads it); o_proj keeps an input
    scale. On layer 0, whose inputs are the embeddings in every model, q/k/v of the folded norm are at least as close
    to the 16-bit outputs as RTN's on the calibration tokens (alpha = 0 is RTN, so only a wrong fold could lose)."""
    ids = calibration(n=16)
    rtn_model = tiny_model("mixtral")
    quantize_(rtn_model, QuantConfig("rtn", group_size=8, quantize_attention=True))
    model, reference_model = tiny_model("mixtral"), tiny_model("mixtral")
    norms = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    quantize_(model, QuantConfig("awq", group_size=8, quantize_attention=True), ids)
    for layer, before in zip(model.model.layers, norms, strict=True):
        attn = layer.self_attn
        assert not torch.equal(layer.input_layernorm.weight, before)  # the scale went into the norm
        assert all(not hasattr(getattr(attn, n), "input_scale") for n in ("q_proj", "k_proj", "v_proj"))
        assert isinstance(attn.o_proj, QuantizedLinear) and hasattr(attn.o_proj, "input_scale")

    def qkv(m):
        layer = m.model.layers[0]
        with torch.no_grad():
            x = layer.input_layernorm(m.model.embed_tokens(ids))
            return torch.cat([getattr(layer.self_attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")], dim=-1)

    expected = qkv(reference_model)
    awq_error, rtn_error = (float((qkv(m) - expected).pow(2).mean()) for m in (model, rtn_model))
    assert awq_error <= rtn_error * (1 + 1e-4)
    with torch.no_grad():  # and the whole model stays close to the 16-bit one
        reference = reference_model(ids).logits
        assert (model(ids).logits - reference).norm() / reference.norm() < 0.5
