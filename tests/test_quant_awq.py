"""AWQ's objectives: routing-weighted token errors for routed experts, RTN (alpha = 0) and "no clip" always among the
candidates, the RTN expert kept where AWQ does not beat it, and the q/k/v scale folded exactly into the norm."""

import pytest
import torch
from tiny_models import tiny_model

from moekern.ops.reference import Activation
from moekern.compression.slimming import awq
from moekern.compression.slimming.apply import _NormFold
from moekern.compression.slimming.calibrate import LayerCapture, calibrated_layers
from moekern.compression.slimming.ffn import quantize_ffn
from moekern.compression.slimming.rtn import fake_quantize


def weighted_output_error(x, w, w_hat, r):
    return float(((x @ (w_hat - w).T).pow(2).mean(dim=-1) * r.pow(2)).sum())


def test_token_weights_decide_which_tokens_the_scale_serves():
    """Two token populations with different salient channels: the searched scale serves the heavily weighted one."""
    torch.manual_seed(0)
    k, n = 64, 16
    heavy, light = torch.randn(256, k), torch.randn(256, k)
    heavy[:, :4] *= 40.0
    light[:, 32:36] *= 40.0
    x = torch.cat([heavy, light])
    r = torch.cat([torch.ones(256), torch.full((256,), 0.05)])
    w = torch.randn(n, k)
    s_weighted = awq.search_scale(x, [w], 32, torch.float32, token_weights=r)
    s_plain = awq.search_scale(x, [w], 32, torch.float32)
    for s in (s_weighted, s_plain):
        assert s.shape == (k,)
    errors = {name: weighted_output_error(x, w, fake_quantize(w * s, 32, torch.float32) / s, r)
              for name, s in (("weighted", s_weighted), ("plain", s_plain))}
    assert errors["weighted"] <= errors["plain"]
    rtn = weighted_output_error(x, w, fake_quantize(w, 32, torch.float32), r)
    assert errors["weighted"] <= rtn  # alpha = 0 is a candidate


def test_clip_keeps_a_group_unclipped_unless_clipping_is_better():
    torch.manual_seed(1)
    x, w = torch.randn(128, 64), torch.randn(8, 64)
    r = torch.rand(128)
    clipped = awq.clip(x, w, 32, torch.float32, r)
    xg = (x * r[:, None]).reshape(-1, 2, 32)
    for row in range(8):
        for g in range(2):
            def err(weights):
                q = fake_quantize(weights, 32, torch.float32)[row].reshape(2, 32)[g]
                return float((xg[:, g] @ (q - w[row].reshape(2, 32)[g])).pow(2).mean())
            assert err(clipped) <= err(w) + 1e-6


@pytest.mark.parametrize("act", ["silu", "clamped_swiglu"])
def test_awq_expert_never_loses_to_rtn_on_its_weighted_objective(act):
    torch.manual_seed(2)
    hidden, inter = 64, 32
    kind = Activation(act)
    w_gu, w_d = torch.randn(2 * inter, hidden) * 0.1, torch.randn(hidden, inter) * 0.1
    bias = torch.randn(2 * inter) * 0.1 if act != "silu" else None
    for outliers in (True, False):
        x = torch.randn(300, hidden)
        if outliers:
            x[:, [3, 20]] *= 25.0
        r = torch.rand(300)
        awq_tensors, _, awq_weighted = quantize_ffn(x, w_gu, w_d, bias, None, kind, "awq", 32, token_weights=r)
        rtn_tensors, _, rtn_weighted = quantize_ffn(x, w_gu, w_d, bias, None, kind, "rtn", 32, token_weights=r)
        assert awq_weighted <= rtn_weighted + 1e-7
        if "gate_up_proj_input_scale" not in awq_tensors:  # RTN was kept: exactly RTN's tensors
            assert all(torch.equal(awq_tensors[k], rtn_tensors[k]) for k in rtn_tensors)
        elif outliers:
            assert awq_weighted < 0.8 * rtn_weighted


def test_capture_records_the_routing_weight_of_each_token():
    """Mixtral renormalises its top-k weights to sum to 1: over all experts, the captured routing weights of a
    layer add up to the number of tokens, and each is in (0, 1]."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    ids = torch.randint(3, 97, (3, 10))
    from moekern import targets

    for _, layer, capture in calibrated_layers(model, ids, lambda layer: (targets.routed_experts(layer), {}),
                                               desc="test", batch_size=2):
        assert isinstance(capture, LayerCapture)
        weights = [capture.expert_routing_weights(e) for e in range(6)]
        inputs = [capture.expert_inputs(e) for e in range(6)]
        total = sum(float(w.sum()) for w in weights if w is not None)
        assert total == pytest.approx(ids.numel(), rel=1e-5)
        for w, x in zip(weights, inputs, strict=True):
            if w is not None:
                assert w.shape == (x.shape[0],) and bool((w > 0).all() and (w <= 1 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_fold_quantizes_against_the_scale_the_rounded_norm_applies(dtype):
    model = tiny_model("mixtral", num_hidden_layers=1)
    norm = model.model.layers[0].input_layernorm.to(dtype)
    assert _NormFold.foldable(norm)
    g = norm.weight.detach().clone()
    fold = _NormFold(norm)
    s = torch.rand(g.shape[0]) * 3 + 0.2
    s_fixed = fold.fix(s)
    fold.apply()
    assert torch.equal(norm.weight, (g.float() / s_fixed).to(dtype))  # the weights saw what the norm applies
    assert (s_fixed / s - 1).abs().max() < (1e-6 if dtype == torch.float32 else 1e-2)


def test_a_norm_that_is_not_weight_times_normalized_is_not_folded():
    class OnePlusNorm(torch.nn.Module):  # Gemma-style: y = (1 + w) * n(x)
        def __init__(self, width):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(width) * 0.1)

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    norm = OnePlusNorm(32)
    before = norm.weight.detach().clone()
    assert not _NormFold.foldable(norm)
    assert torch.equal(norm.weight, before)
    assert not _NormFold.foldable(torch.nn.LayerNorm(32))  # has a bias
