"""Quantizing the linears of one layer with one method, given their calibration inputs:

    quantize_ffn      a gated FFN (one routed expert, a shared expert, a dense MLP): gate_up [2I, H], down [H, I]
    quantize_linears  linears that read the same input (AWQ searches one scale for them), e.g. q, k, v

AWQ, where the scales go (AutoAWQ folds a scale into the op before the linear wherever that is exact):
  - down of a SiLU-gated FFN: into the up rows (act(gate) * up is linear in up): exact, nothing stored.
  - down of GPT-OSS's clamped SwiGLU (not linear in up): an input scale of the down GEMM.
  - gate_up of a routed expert: the op before is post_attention_layernorm, shared by the router and every expert,
    each expert with its own scale: an input scale per expert, so the router's input is unchanged.
  - q, k, v: one scale, folded into input_layernorm (exact: nothing else reads it) - done by the caller.
  - any other linear (o_proj, shared-expert gate/up): an input scale.
An input scale is stored as 1 / s in the activation dtype: y = (x * input_scale) @ Q(W s)^T.
"""

import torch

from moekern.ops.reference import Activation, gated_activation
from moekern.quant import awq
from moekern.quant.gptq import gptq
from moekern.quant.hessian import hessian
from moekern.quant.rtn import dequantize_codes, pack, rtn


def _quantize(w, x, method, group_size, act_order, dtype):
    """(q, scales, zeros) of w [N, K] by RTN or GPTQ (x: the inputs, for GPTQ's Hessian)."""
    if method == "gptq":
        return gptq(w, hessian(x), group_size, act_order, dtype=dtype)[:3]
    return rtn(w, group_size, dtype)


def _packed(prefix: str, qsz) -> dict:
    return {f"{prefix}_{name}": t for name, t in pack(*qsz).items()}


def quantize_ffn(x, w_gate_up, w_down, b_gate_up, b_down, act: Activation, method: str, group_size: int,
                 act_order: bool = False, dtype=None):
    """One gated FFN in fp32 math -> (tensors, rel_error). tensors: gate_up_proj_{qweight,scales,zeros},
    down_proj_{...}, with AWQ gate_up_proj_input_scale [H] (and down_proj_input_scale [I] where the fold is not
    exact), and the biases (AWQ may have scaled the up bias). rel_error: ||FFN_q(x) - FFN(x)|| / ||FFN(x)|| on the
    calibration inputs (None without them). x None: RTN."""
    dtype = dtype or w_gate_up.dtype
    w_gu, w_d = w_gate_up.float().clone(), w_down.float().clone()
    b_gu = None if b_gate_up is None else b_gate_up.float().clone()
    b_d = None if b_down is None else b_down.float()
    x = None if x is None else x.float()
    method = method if x is not None and x.shape[0] > 0 else "rtn"
    out = {}
    if method == "awq":
        a = gated_activation(_linear(x, w_gu, b_gu), act)
        s_d = awq.search_scale(a, [w_d], group_size, dtype)
        w_d = w_d * s_d
        if act.kind == "silu":  # fold 1 / s_d into the up rows: down's input is divided by s_d exactly
            inter = w_d.shape[1]
            w_gu[inter:] /= s_d[:, None]
            if b_gu is not None:
                b_gu[inter:] /= s_d
        else:
            out["down_proj_input_scale"] = (1 / s_d).to(dtype)
        # gate_up's scale is judged by the expert's output (AutoAWQ's module2inspect): the errors of gate and up
        # rows count as much as they move what the expert returns, not by their raw size
        w_d_fp = w_d if act.kind == "silu" else w_down.float()  # down as the (folded) fp expert computes it

        def expert_output(inputs, w, w_d=w_d_fp, b_gu=b_gu):
            return _linear(gated_activation(_linear(inputs, w, b_gu), act), w_d, b_d)

        s_gu = awq.search_scale(x, [w_gu], group_size, dtype, expert_output)
        out["gate_up_proj_input_scale"] = (1 / s_gu).to(dtype)
        w_gu = awq.clip(x / s_gu, w_gu * s_gu, group_size, dtype)
        w_d = awq.clip(a / s_d, w_d, group_size, dtype)
        q_gu, q_d = rtn(w_gu, group_size, dtype), rtn(w_d, group_size, dtype)
    else:
        q_gu = _quantize(w_gu, x, method, group_size, act_order, dtype)
        if method == "gptq":  # down is calibrated on what the quantized gate_up really produces
            a_q = gated_activation(_linear(x, _effective(q_gu, out.get("gate_up_proj_input_scale")), b_gu), act)
            q_d = _quantize(w_d, a_q, method, group_size, act_order, dtype)
        else:
            q_d = rtn(w_d, group_size, dtype)
    out.update(_packed("gate_up_proj", q_gu))
    out.update(_packed("down_proj", q_d))
    if b_gu is not None:
        out["gate_up_proj_bias"] = b_gu.to(dtype)
    if b_down is not None:
        out["down_proj_bias"] = b_down.to(dtype)
    error = None
    if x is not None and x.shape[0] > 0:
        y = _linear(gated_activation(_linear(x, w_gate_up.float(), _f(b_gate_up)), act), w_down.float(), b_d)
        h = _linear(x, _effective(q_gu, out.get("gate_up_proj_input_scale")), _f(out.get("gate_up_proj_bias")))
        y_q = _linear(gated_activation(h, act), _effective(q_d, out.get("down_proj_input_scale")), b_d)
        error = ((y_q - y).norm() / y.norm().clamp_min(1e-12)).item()
    return out, error


def quantize_linears(x, weights: list[torch.Tensor], method: str, group_size: int, act_order=False, dtype=None,
                     clip: bool = True):
    """Linears reading the same input x [T, K] -> ([tensors per linear], s or None, rel_error). With AWQ, s [K] is
    the searched scale (the weights were multiplied by it); the caller folds 1 / s before the linears or stores it as
    their input scale. clip=False skips AWQ's weight clipping (AutoAWQ skips it for q and k)."""
    dtype = dtype or weights[0].dtype
    x = None if x is None else x.float()
    method = method if x is not None and x.shape[0] > 0 else "rtn"
    ws = [w.float() for w in weights]
    s = None
    if method == "awq":
        s = awq.search_scale(x, ws, group_size, dtype)
        ws = [awq.clip(x / s, w * s, group_size, dtype) if clip else w * s for w in ws]
        quantized = [rtn(w, group_size, dtype) for w in ws]
    else:
        quantized = [_quantize(w, x, method, group_size, act_order, dtype) for w in ws]
    error = None
    if x is not None:
        w_ref = torch.cat([w.float() for w in weights])
        w_q = torch.cat([_effective(q, None if s is None else 1 / s) for q in quantized])
        y = x @ w_ref.T
        error = ((x @ w_q.T - y).norm() / y.norm().clamp_min(1e-12)).item()
    return [pack(*q) for q in quantized], s, error


def _effective(qsz, input_scale):
    w = dequantize_codes(qsz[0], qsz[1].float(), qsz[2])
    return w if input_scale is None else w * input_scale.float()[None, :]


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _f(t):
    return None if t is None else t.float()
