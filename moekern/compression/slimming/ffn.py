"""Quantizing the linears of one layer with one method, given their calibration inputs:

    quantize_ffn      a gated FFN (one routed expert, a shared expert, a dense MLP): gate_up [2I, H], down [H, I]
    quantize_linears  linears that read the same input (AWQ searches one scale for them), e.g. q, k, v

AWQ, where the scales go (AutoAWQ folds a scale into the op before the linear wherever that is exact):
  - down of a SiLU-gated FFN: into the up rows (act(gate) * up is linear in up): exact, nothing stored.
  - down of GPT-OSS's clamped SwiGLU (not linear in up): an input scale of the down GEMM.
  - gate_up of a routed expert: the op before is post_attention_layernorm, shared by the router and every expert,
    each expert with its own scale: an input scale per expert, so the router's input is unchanged.
  - q, k, v: one scale, folded into input_layernorm (exact: nothing else reads it) - done by the caller, which
    passes fix_scale so that the weights are quantized against the scale the rounded norm weight really applies.
  - any other linear (o_proj, shared-expert gate/up): an input scale.
An input scale is stored as 1 / s in the activation dtype: y = (x * input_scale) @ Q(W s)^T.

GPTQ on a routed expert weights each calibration token by its routing weight too: H = sum_t r_t^2 x_t x_t^T, the
curvature of the error as it reaches the layer's output (a token the router barely sent here counts little).

AWQ on a routed expert minimises the expert's output error weighted by the tokens' routing weights (awq.py), in
three steps each of which has plain RTN (or no clipping) among its candidates: down's scale, gate_up's scale (judged
by the expert's output), then clipping, kept for gate_up and for down only where it lowers the expert's weighted
output error. Finally the whole AWQ expert is compared with the RTN expert on the same objective and RTN is kept
when AWQ is not strictly better (the steps are searched one at a time, so their combination is not guaranteed to
beat RTN by itself).
"""

import torch

from moekern.ops.reference import Activation, gated_activation
from moekern.compression.slimming import awq
from moekern.formats import layout
from moekern.compression.slimming.gptq import gptq
from moekern.compression.slimming.hessian import hessian
from moekern.compression.slimming.rtn import dequantize_codes, pack, rtn


def _quantize(w, x, method, group_size, act_order, dtype, r=None, sym=False):
    """(q, scales, zeros) of w [N, K] by RTN or GPTQ (x: the inputs, for GPTQ's Hessian; r [T]: each row's routing
    weight, so H = sum_t r_t^2 x_t x_t^T is the curvature of the error as it reaches the layer's output; sym:
    AutoGPTQ's symmetric grid)."""
    if method == "gptq":
        return gptq(w, hessian(x if r is None else x * r[:, None]), group_size, act_order, dtype=dtype, sym=sym)[:3]
    return rtn(w, group_size, dtype)


def _packed(prefix: str, qsz) -> dict:
    return {f"{prefix}_{name}": t for name, t in pack(*qsz).items()}


def quantize_ffn(x, w_gate_up, w_down, b_gate_up, b_down, act: Activation, method: str, group_size: int,
                 act_order: bool = False, dtype=None, token_weights=None, sym: bool = False,
                 hessian_weights: bool = True):
    """One gated FFN in fp32 math -> (tensors, rel_error, weighted_rel_error). tensors: gate_up_proj_{qweight,
    scales,zeros}, down_proj_{...}, with AWQ gate_up_proj_input_scale [H] (and down_proj_input_scale [I] where the
    fold is not exact), and the biases (AWQ may have scaled the up bias). AWQ on calibration inputs returns the RTN
    tensors (no input scale) when those give the lower weighted output error.

    token_weights [T]: the routing weight each row of x had in the model (routed experts; None: 1), used by AWQ's
    objectives. rel_error: ||FFN_q(x) - FFN(x)|| / ||FFN(x)|| on the calibration inputs; weighted_rel_error: the
    same with row t weighted by token_weights[t] (the error as it reaches the layer's output). Both None without
    inputs. x None: RTN. sym: GPTQ's symmetric grid; hessian_weights=False: GPTQ's Hessian ignores token_weights
    (AutoGPTQ), which then only weight the report."""
    dtype = dtype or w_gate_up.dtype
    w_gu, w_d = w_gate_up.float().clone(), w_down.float().clone()
    b_gu = None if b_gate_up is None else b_gate_up.float().clone()
    b_d = None if b_down is None else b_down.float()
    x = None if x is None else x.float()
    r = None if token_weights is None or x is None else token_weights.reshape(-1).float()
    method = method if x is not None and x.shape[0] > 0 else "rtn"
    if method == "awq":
        out = _awq_ffn(x, w_gu, w_d, b_gu, b_d, act, group_size, dtype, r)
    else:
        r_h = r if hessian_weights else None
        q_gu = _quantize(w_gu, x, method, group_size, act_order, dtype, r_h, sym)
        if method == "gptq":  # down is calibrated on what the quantized gate_up really produces
            a_q = gated_activation(_linear(x, _effective(q_gu, None), b_gu), act)
            q_d = _quantize(w_d, a_q, method, group_size, act_order, dtype, r_h, sym)
        else:
            q_d = rtn(w_d, group_size, dtype)
        out = {**_packed("gate_up_proj", q_gu), **_packed("down_proj", q_d)}
        if b_gu is not None:
            out["gate_up_proj_bias"] = b_gu.to(dtype)
    if b_down is not None:
        out["down_proj_bias"] = b_down.to(dtype)
    if x is None or x.shape[0] == 0:
        return out, None, None
    y = _linear(gated_activation(_linear(x, w_gate_up.float(), _f(b_gate_up)), act), w_down.float(), b_d)
    diff = _quantized_ffn_output(out, x, act, b_d) - y
    error = (diff.norm() / y.norm().clamp_min(1e-12)).item()
    weighted = error
    if r is not None:
        num = (diff.pow(2).sum(dim=-1) * r.pow(2)).sum()
        den = (y.pow(2).sum(dim=-1) * r.pow(2)).sum().clamp_min(1e-24)
        weighted = (num / den).sqrt().item()
    return out, error, weighted


def _awq_ffn(x, w_gu, w_d, b_gu, b_d, act: Activation, group_size: int, dtype, r) -> dict:
    """AWQ on one gated FFN (fp32 weights, x [T, H], r [T] or None) -> the tensors of quantize_ffn."""
    w_gu_fp, b_gu_fp, w_d_fp = w_gu, b_gu, w_d
    a = gated_activation(_linear(x, w_gu, b_gu), act)
    # 1. down's scale, judged by down's output (= the expert's output)
    s_d = awq.search_scale(a, [w_d], group_size, dtype, token_weights=r)
    w_d = w_d * s_d
    in_d = None
    if act.kind == "silu":  # fold 1 / s_d into the up rows: down's input is divided by s_d exactly
        inter = w_d.shape[1]
        w_gu = w_gu.clone()
        w_gu[inter:] /= s_d[:, None]
        if b_gu is not None:
            b_gu = b_gu.clone()
            b_gu[inter:] /= s_d
        w_d_ref = w_d  # the fp expert with the fold: act(gate) * (up / s_d) @ (W_d s_d)^T
    else:
        in_d = (1 / s_d).to(dtype)  # stored as down's input scale
        w_d_ref = w_d_fp  # (a / s_d) @ (W_d s_d)^T = a @ W_d^T

    # 2. gate_up's scale, judged by the expert's output (AutoAWQ's module2inspect): the errors of gate and up rows
    # count as much as they move what the expert returns, not by their raw size
    def expert_output(inputs, w, w_d=w_d_ref, b_gu=b_gu):
        return _linear(gated_activation(_linear(inputs, w, b_gu), act), w_d, b_d)

    s_gu = awq.search_scale(x, [w_gu], group_size, dtype, expert_output, token_weights=r)
    in_gu = (1 / s_gu).to(dtype)
    w_gu = w_gu * s_gu

    # 3. clipping (AutoAWQ's auto_clip) per (row, group), kept only where it lowers the weighted expert error:
    # gate_up's with down in full precision (as its scale was searched), then down's with gate_up quantized
    x_e, w2 = awq.sample_rows(x, awq.SEARCH_TOKENS, r)
    y_e = _linear(gated_activation(_linear(x_e, w_gu_fp, b_gu_fp), act), w_d_fp, b_d)

    def error(q_gu, s_gu_in, b, q_d, s_d_in):
        h = _linear(x_e, _effective(q_gu, s_gu_in), b)
        w_down = w_d_ref if q_d is None else _effective(q_d, s_d_in)
        return awq.weighted_error(_linear(gated_activation(h, act), w_down, b_d) - y_e, w2)

    q_gu = rtn(w_gu, group_size, dtype)
    q_gu_clipped = rtn(awq.clip(x / s_gu, w_gu, group_size, dtype, r), group_size, dtype)
    if error(q_gu_clipped, in_gu, b_gu, None, None) < error(q_gu, in_gu, b_gu, None, None):
        q_gu = q_gu_clipped
    q_d = rtn(w_d, group_size, dtype)
    q_d_clipped = rtn(awq.clip(a / s_d, w_d, group_size, dtype, r), group_size, dtype)
    awq_error = error(q_gu, in_gu, b_gu, q_d, in_d)
    clipped_error = error(q_gu, in_gu, b_gu, q_d_clipped, in_d)
    if clipped_error < awq_error:
        q_d, awq_error = q_d_clipped, clipped_error

    # 4. the whole AWQ expert against the RTN expert on the same objective
    q_gu_rtn, q_d_rtn = rtn(w_gu_fp, group_size, dtype), rtn(w_d_fp, group_size, dtype)
    if error(q_gu_rtn, None, b_gu_fp, q_d_rtn, None) <= awq_error:
        out = {**_packed("gate_up_proj", q_gu_rtn), **_packed("down_proj", q_d_rtn)}
        b_gu = b_gu_fp
    else:
        out = {**_packed("gate_up_proj", q_gu), **_packed("down_proj", q_d), "gate_up_proj_input_scale": in_gu}
        if in_d is not None:
            out["down_proj_input_scale"] = in_d
    if b_gu is not None:
        out["gate_up_proj_bias"] = b_gu.to(dtype)
    return out


def quantize_linears(x, weights: list[torch.Tensor], method: str, group_size: int, act_order=False, dtype=None,
                     clip: bool = True, fix_scale=None, sym: bool = False):
    """Linears reading the same input x [T, K] -> ([tensors per linear], s or None, rel_error). With AWQ, s [K] is
    the searched scale (the weights were multiplied by it); the caller folds 1 / s before the linears or stores it as
    their input scale. clip=False skips AWQ's weight clipping (AutoAWQ skips it for q and k); clipping is kept per
    linear only where it lowers that linear's output error. fix_scale(s) -> s': the scale the caller's fold really
    applies (e.g. after rounding a norm weight divided by s to its dtype); the weights are quantized against s'."""
    dtype = dtype or weights[0].dtype
    x = None if x is None else x.float()
    method = method if x is not None and x.shape[0] > 0 else "rtn"
    ws = [w.float() for w in weights]
    s = None
    if method == "awq":
        s = awq.search_scale(x, ws, group_size, dtype)
        if fix_scale is not None:
            s = fix_scale(s).float()
        quantized = []
        x_e, _ = awq.sample_rows(x, awq.SEARCH_TOKENS)
        for w in ws:
            q = rtn(w * s, group_size, dtype)
            if clip:
                q_clipped = rtn(awq.clip(x / s, w * s, group_size, dtype), group_size, dtype)
                y = x_e @ w.T
                if _err(x_e, q_clipped, s, y) < _err(x_e, q, s, y):
                    q = q_clipped
            quantized.append(q)
    else:
        quantized = [_quantize(w, x, method, group_size, act_order, dtype, sym=sym) for w in ws]
    error = None
    if x is not None:
        w_ref = torch.cat([w.float() for w in weights])
        w_q = torch.cat([_effective(q, None if s is None else 1 / s) for q in quantized])
        y = x @ w_ref.T
        error = ((x @ w_q.T - y).norm() / y.norm().clamp_min(1e-12)).item()
    return [pack(*q) for q in quantized], s, error


def _err(x, qsz, s, y) -> float:
    return (x @ _effective(qsz, 1 / s).T - y).pow(2).mean().item()


def _quantized_ffn_output(tensors: dict, x, act: Activation, b_d) -> torch.Tensor:
    """The quantized FFN of quantize_ffn's tensors on x, in fp32 (its error report)."""
    h = _linear(x, _dequantized(tensors, "gate_up_proj"), _f(tensors.get("gate_up_proj_bias")))
    return _linear(gated_activation(h, act), _dequantized(tensors, "down_proj"), b_d)


def _dequantized(tensors: dict, prefix: str) -> torch.Tensor:
    w = layout.dequantize(tensors[f"{prefix}_qweight"], tensors[f"{prefix}_scales"].float(),
                          tensors[f"{prefix}_zeros"])
    input_scale = tensors.get(f"{prefix}_input_scale")
    return w if input_scale is None else w * input_scale.float()[None, :]


def _effective(qsz, input_scale):
    w = dequantize_codes(qsz[0], qsz[1].float(), qsz[2])
    return w if input_scale is None else w * input_scale.float()[None, :]


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _f(t):
    return None if t is None else t.float()
