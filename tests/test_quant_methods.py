"""The quantizers on single linears: RTN against an explicit per-group computation; GPTQ and AWQ lower the output
error where they should (correlated inputs; outlier input channels)."""

import pytest
import torch

from moekern.errors import MoekernError
from moekern.compression.slimming import awq
from moekern.compression.slimming.gptq import gptq
from moekern.compression.slimming.hessian import hessian
from moekern.compression.slimming.rtn import dequantize_codes, fake_quantize, rtn


@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_is_the_explicit_per_group_computation(group):
    n, k = 12, 256
    w = torch.randn(n, k)
    q, scales, zeros = rtn(w, group, torch.float32)
    for row in range(n):
        for g in range(k // group):
            values = w[row, g * group : (g + 1) * group]
            scale = (values.max() - values.min()).clamp(min=1e-5) / 15
            zero = torch.clamp(torch.round(-values.min() / scale), 0, 15)
            codes = torch.clamp(torch.round(values / scale) + zero, 0, 15)
            assert scales[g, row] == scale and zeros[g, row] == zero
            assert torch.equal(q[row, g * group : (g + 1) * group], codes.to(torch.uint8))
    error = (dequantize_codes(q, scales, zeros) - w).abs()
    assert bool((error <= scales.T.repeat_interleave(group, 1) / 2 + 1e-6).all())  # inside the grid: half a step


def test_rtn_scales_are_rounded_to_the_storage_dtype_before_rounding_codes():
    w = torch.randn(8, 64)
    q, scales, zeros = rtn(w, 32, torch.float16)
    assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8
    s = scales.float().T.repeat_interleave(32, 1)
    assert torch.equal(q.float(), (w / s).round().add(zeros.float().T.repeat_interleave(32, 1)).clamp(0, 15))


def output_error(x, w, w_hat):
    return ((x @ w_hat.T - x @ w.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    k, n, t = 128, 32, 1024
    mixing = torch.randn(8, k)  # low rank plus a little noise: strongly correlated input channels
    x = torch.randn(t, 8) @ mixing + 0.05 * torch.randn(t, k)
    x_heldout = torch.randn(t, 8) @ mixing + 0.05 * torch.randn(t, k)
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]  # rows of very different ranges
    q, scales, zeros, g_idx = gptq(w, hessian(x), 32, act_order=act_order, dtype=torch.float32)
    assert torch.equal(g_idx, (torch.arange(k) // 32).to(torch.int32))
    gptq_error = output_error(x, w, dequantize_codes(q, scales, zeros))
    rtn_error = output_error(x, w, fake_quantize(w, 32, torch.float32))
    assert gptq_error < 0.5 * rtn_error
    assert output_error(x_heldout, w, dequantize_codes(q, scales, zeros)) < rtn_error  # not only on its own data


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_independent_inputs_is_rtn(act_order):
    """A diagonal Hessian leaves no error to compensate: GPTQ's codes and grid are RTN's, exactly."""
    w = torch.randn(16, 128) * torch.logspace(-2, 1, 16)[:, None]
    q, scales, zeros, _ = gptq(w, torch.diag(torch.rand(128) + 0.5), 32, act_order=act_order, dtype=torch.float32)
    q_rtn, scales_rtn, zeros_rtn = rtn(w, 32, torch.float32)
    assert torch.equal(q, q_rtn) and torch.equal(scales, scales_rtn) and torch.equal(zeros, zeros_rtn)


def test_awq_beats_rtn_on_outlier_channels():
    k, n, t = 128, 32, 512
    x = torch.randn(t, k)
    x[:, [3, 40, 77, 100]] *= 50.0  # a few salient input channels, as in LLM activations
    w = torch.randn(n, k)
    s = awq.search_scale(x, [w], 32, torch.float32)
    awq_weight = fake_quantize(w * s, 32, torch.float32) / s
    rtn_error = output_error(x, w, fake_quantize(w, 32, torch.float32))
    assert output_error(x, w, awq_weight) < 0.7 * rtn_error
    clipped = awq.clip(x / s, w * s, 32, torch.float32)
    assert output_error(x, w, fake_quantize(clipped, 32, torch.float32) / s) <= output_error(x, w, awq_weight) + 1e-6


def test_awq_never_loses_to_rtn_on_its_calibration_data():
    x, w = torch.randn(256, 64), torch.randn(16, 64)  # no outliers: alpha = 0 (plain RTN) is on the grid
    s = awq.search_scale(x, [w], 32, torch.float32)
    rtn_error = output_error(x, w, fake_quantize(w, 32, torch.float32))
    assert output_error(x, w, fake_quantize(w * s, 32, torch.float32) / s) <= rtn_error + 1e-7


def test_a_group_that_does_not_divide_the_width_is_refused():
    with pytest.raises(MoekernError, match="does not divide"):
        rtn(torch.randn(4, 96), 64)


@pytest.mark.parametrize("act", ["silu", "clamped_swiglu"])
def test_awq_on_an_expert_folds_its_scales_exactly(act):
    """AWQ on a whole expert: down's scale folded into the up rows (SiLU) or kept as an input scale (GPT-OSS);
    gate_up's as an input scale. A wrong fold would show as a large output error; a right one beats RTN."""
    from moekern.ops.reference import Activation
    from moekern.compression.slimming.ffn import quantize_ffn

    hidden, inter = 128, 64
    x = torch.randn(512, hidden)
    x[:, [5, 17, 90]] *= 30.0
    w_gate_up, w_down = torch.randn(2 * inter, hidden) * 0.1, torch.randn(hidden, inter) * 0.1
    bias = torch.randn(2 * inter) * 0.1 if act != "silu" else None
    kind = Activation(act)
    awq_tensors, awq_error, _ = quantize_ffn(x, w_gate_up, w_down, bias, None, kind, "awq", 32)
    _, rtn_error, _ = quantize_ffn(x, w_gate_up, w_down, bias, None, kind, "rtn", 32)
    assert awq_error < rtn_error
    assert ("down_proj_input_scale" in awq_tensors) == (act != "silu")
    assert "gate_up_proj_input_scale" in awq_tensors


def test_gptq_on_an_expert_weights_tokens_by_their_routing_weight():
    """A routed expert's error reaches the model times the token's routing weight, so GPTQ's Hessian is
    sum_t r_t^2 x_t x_t^T: tokens of weight 0 count for nothing (the same weights as without them), and the others
    change the result."""
    from moekern.ops.reference import Activation
    from moekern.compression.slimming.ffn import quantize_ffn

    hidden, inter, kept, ignored = 32, 16, 40, 24
    x = torch.randn(kept + ignored, hidden)
    x[kept:] *= 5  # loud tokens the router barely sent here
    w_gu, w_d = torch.randn(2 * inter, hidden), torch.randn(hidden, inter)
    r = torch.cat([torch.ones(kept), torch.zeros(ignored)])
    args = (w_gu, w_d, None, None, Activation("silu"), "gptq", 16)
    weighted, _, _ = quantize_ffn(x, *args, token_weights=r)
    only_kept, _, _ = quantize_ffn(x[:kept], *args)
    unweighted, _, _ = quantize_ffn(x, *args)
    for name in ("gate_up_proj_qweight", "down_proj_qweight"):
        assert torch.equal(weighted[name], only_kept[name])
    assert not all(torch.equal(weighted[n], unweighted[n]) for n in ("gate_up_proj_qweight", "down_proj_qweight"))
