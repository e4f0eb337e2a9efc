"""model_info.describe: parameters and weight bytes, also for 4-bit models whose weights are packed buffers."""

import torch
from tiny_models import tiny_model

from moekern.model_info import describe
from moekern.compression.slimming import QuantConfig, quantize_


def test_describe_counts_packed_4bit_weights():
    model = tiny_model("mixtral")
    before = describe(model)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert before["weight_bytes"] == dense_bytes
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert before["expert_parameters"] == experts

    quantize_(model, QuantConfig("rtn", group_size=8), torch.randint(3, 97, (2, 8)))
    after = describe(model)
    # a packed weight counts as the weights it holds; the bytes are the packed words, scales and zeros
    assert after["parameters"] == before["parameters"] and after["expert_parameters"] == experts
    stored = {t.data_ptr(): t for t in model.state_dict().values()}
    assert after["weight_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    # fp32 experts (4 bytes a weight) become half a byte a weight plus a scale (4 bytes) and a zero (1) per 8
    assert after["weight_bytes"] < before["weight_bytes"] - experts * (4 - 0.5 - 5 / 8) * 0.99
