"""AutoAWQ's MoE scheme: the recipe step awq4:autoawq, QuantConfig(method="awq", scheme="autoawq").

He et al. quantized with AutoAWQ (their App. A.2; their code vendors it: Unified-MoE-Compression, AutoAWQ/awq/models/
mixtral.py and deepseek.py, AutoAWQ/awq/quantize/quantizer.py and scale.py, the same scheme as casper-hansen/AutoAWQ's
awq/models/mixtral.py). moekern's own AWQ (ffn.py) searches one scale per expert and weights each token by its
routing weight; this module does what AutoAWQ does instead, per decoder layer, on the inputs the layer receives:

 1. One per-channel scale s for every quantized linear that reads post_attention_layernorm's output: the gate and up
    of all routed experts, and of the shared experts (DeepSeek) or of a dense layer's MLP (get_layers_for_scaling:
    prev_op=post_attention_layernorm, module2inspect=the MoE block, inp=the block's input). s is chosen on the output
    of the whole MLP module, whose output carries the routing weights and the shared experts, over every calibration
    token (the mean squared error, _compute_best_scale), the other weights in full precision:
        s = (mean_t |x|)^r / w_mean^(1 - r), normalised to sqrt(max * min) = 1, r in {0, 1/20, ..., 19/20}
    with w_mean the per-input-channel mean of |w| / max|w| within each quantization group of the concatenated
    weights (duo_scaling=True, AutoAWQ's default); the first strict minimum wins.
 2. One scale per down_proj (prev_op=up_proj), chosen the same way on the inputs that down receives (a routed expert:
    act(gate) * up of the tokens routed to it, unweighted) and judged on down's own output.
    Every search runs on the layer's original weights (AutoAWQ computes the whole scales_list before apply_scale).
 3. The norm's weight is divided by s (scale_ln_fcs; moekern rounds it as linears.NormFold does, so the fold is
    exact in any dtype), the gate and up columns multiplied by it; each up's rows are divided by its down's scale and
    down's columns multiplied by it (scale_fc_fc). Nothing is stored as an input scale, so the result is a plain
    AutoAWQ-layout model. The router, and Qwen2-MoE's shared-expert gate, read the same norm and are not rescaled:
    as in AutoAWQ (scale_ln_fcs touches only the listed linears; the router is in modules_to_not_convert), they see
    their input divided by s, and routing changes with it.
 4. auto_clip: each quantized linear, every (row, group), max|w| shrunk by i/20 for the i < 10 with the lowest mean
    squared group output error on its own inputs (divided by the scale applied before it), 512 of them taken with
    stride T // 512 (_compute_best_clip); i = 0 (no clipping) unless another is strictly better.
 5. Round to nearest (rtn.py, the same grid as AutoAWQ's pseudo_quantize_tensor with zero_point).

Where moekern differs, and why: the math is fp32 (AutoAWQ runs the module in fp16); w_mean is floored at 1e-12 so an
all-zero input channel gives no NaN; the clip stride is at least 1 (the slice step T // 512 is 0, an error, for an
expert that got fewer than 512 tokens); an expert that no calibration token reaches keeps the group scale and is not
clipped; attention is quantized only with quantize_attention, by moekern's own path (AutoAWQ quantizes it too).
"""

import torch

from moekern.errors import MoekernError
from moekern.models.base import expert_activation
from moekern.modules.quant import QuantizedExperts
from moekern.ops.reference import gated_activation
from moekern import targets
from moekern.compression.slimming.linears import NormFold, replace_linear
from moekern.compression.slimming.rtn import fake_quantize, pack, rtn

MLP = "mlp"  # the name under which the MLP module's inputs are captured (calibrate.LayerCapture)
GRID = 20
CLIP_TOKENS = 512
CHUNK = 8192  # tokens per forward of the MLP module during the search


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor):
    """AutoAWQ's grid with duo_scaling: (ratio, s) for ratio = 0, 1/20, ..., 19/20."""
    for step in range(GRID):
        ratio = step / GRID
        s = (x_mean.pow(ratio) / w_mean.clamp_min(1e-12).pow(1 - ratio)).clamp(min=1e-4)
        yield ratio, s / (s.max() * s.min()).sqrt()


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel [K]: the mean over all rows of |w| / max|w| of its quantization group (AutoAWQ's w_mean)."""
    w = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in weights])
    g = w.reshape(-1, group_size).abs()
    return (g / g.amax(dim=1, keepdim=True)).reshape(w.shape).mean(dim=0)


def best_scale(x_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int, dtype, loss) -> torch.Tensor:
    """The candidate s with the lowest loss([Q(W_i s) / s]) (the first strict minimum)."""
    best, best_s = float("inf"), None
    weights = [w.reshape(-1, w.shape[-1]).float() for w in weights]
    w_mean = weight_mean(weights, group_size)
    for _, s in scale_candidates(x_mean.float(), w_mean):
        error = loss([fake_quantize(w * s, group_size, dtype) / s for w in weights])
        if error < best:
            best, best_s = error, s
    if best_s is None:
        raise MoekernError("AutoAWQ's scale search found no finite error (NaN in the weights or inputs?)")
    return best_s


class _ModuleLoss:
    """The mean squared error of a module's output on tokens x [T, H] when some of its weights are replaced (AutoAWQ's
    module2inspect): the weights are written into the live tensors for one forward, then put back."""

    def __init__(self, module, x: torch.Tensor, tensors: list[torch.Tensor]):
        self.module, self.x, self.tensors = module, x, tensors
        self.original = [t.detach().clone() for t in tensors]
        self.reference = self.output()

    def output(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        with torch.no_grad():
            outs = []
            for start in range(0, x.shape[0], CHUNK):
                chunk = x[start : start + CHUNK]
                out = self.module(chunk[None].to(self.original[0].dtype))
                outs.append((out[0] if isinstance(out, tuple) else out).reshape(chunk.shape[0], -1).float())
            return torch.cat(outs)

    def __call__(self, weights: list[torch.Tensor]) -> float:
        try:
            for tensor, w in zip(self.tensors, weights, strict=True):
                tensor.data.copy_(w.reshape(tensor.shape).to(tensor.dtype))
            return (self.output() - self.reference).pow(2).mean().item()
        finally:
            for tensor, original in zip(self.tensors, self.original, strict=True):
                tensor.data.copy_(original)


def _linear_loss(a: torch.Tensor, w: torch.Tensor):
    reference = a @ w.float().T
    return lambda weights: (a @ weights[0].T - reference).pow(2).mean().item()


def _strided(x: torch.Tensor) -> torch.Tensor:
    """512 rows of x taken with AutoAWQ's stride (at least 1)."""
    return x[:: max(1, x.shape[0] // CLIP_TOKENS)]


def _clip_rtn(x: torch.Tensor | None, w: torch.Tensor, group_size: int, dtype):
    """auto_clip on x (None: no inputs, no clipping), then RTN: (q, scales, zeros)."""
    from moekern.compression.slimming import awq

    if x is not None and x.shape[0]:
        w = awq.clip(_strided(x.float()), w, group_size, dtype, tokens=None)
    return rtn(w, group_size, dtype)


def check_layer(layer) -> None:
    experts = targets.routed_experts(layer)
    if experts is not None and (expert_activation(experts).kind != "silu" or getattr(experts, "has_bias", False)):
        raise MoekernError("awq4:autoawq is AutoAWQ's scheme for SiLU-gated experts without biases (Mixtral, "
                           "DeepSeek, Qwen); this model's experts are not; use awq4")


def quantize_mlp(model, layer, capture, config, entry: dict) -> set[str]:
    """AutoAWQ's scheme on one decoder layer's MLP side (module doc). Replaces the routed experts by QuantizedExperts
    and the quantized shared-expert or dense-MLP linears by QuantizedLinear; returns the names of the linears it
    handled, which moekern's own path must leave alone."""
    experts = targets.routed_experts(layer)
    always = targets.always_active_linears(model, layer)
    triples = targets.ffn_triples(always)
    quantize_triples = config.quantize_shared_experts
    if experts is None and not (triples and quantize_triples):
        return set()
    check_layer(layer)
    norm = getattr(layer, "post_attention_layernorm", None)
    if not NormFold.foldable(norm):
        raise MoekernError("awq4:autoawq folds its scale into post_attention_layernorm, which here is not "
                           "y = weight * normalized(x); use awq4 (moekern's AWQ stores the scale instead)")
    x = capture.linear_inputs(MLP).float()
    group_size = config.group_size

    # 1. the input-side scale, judged on the whole MLP's output
    tensors = ([experts.gate_up_proj] if experts is not None else [])
    if quantize_triples:
        tensors += [always[name].weight for gate, up, _ in triples for name in (gate, up)]
    dtype = tensors[0].dtype
    loss = _ModuleLoss(layer.mlp, x, tensors)
    s_in = best_scale(x.abs().mean(dim=0), [t.detach() for t in tensors], group_size, dtype, loss)

    # 2. each down_proj's scale, on its own inputs, from the original weights
    act = expert_activation(experts) if experts is not None else None
    expert_inputs, down_scales = {}, {}
    if experts is not None:
        w_gu, w_d = experts.gate_up_proj.detach().float(), experts.down_proj.detach().float()
        for e in range(w_gu.shape[0]):
            x_e = capture.expert_inputs(e)
            if x_e is None or not x_e.shape[0]:
                entry["fallback_rtn"] += 1
                continue
            a = gated_activation(x_e.float() @ w_gu[e].T, act)
            expert_inputs[e] = (x_e.float(), a)
            down_scales[e] = best_scale(a.abs().mean(dim=0), [w_d[e]], group_size, dtype, _linear_loss(a, w_d[e]))
    triple_inputs = {}
    for gate, up, down in triples if quantize_triples else []:
        a = torch.nn.functional.silu(x @ always[gate].weight.float().T) * (x @ always[up].weight.float().T)
        w = always[down].weight.detach().float()
        triple_inputs[down] = (a, best_scale(a.abs().mean(dim=0), [w], group_size, dtype, _linear_loss(a, w)))

    # 3. apply: fold s_in into the norm (exactly: s' is what the rounded norm weight divides by)
    fold = NormFold(norm)
    s_in = fold.fix(s_in).float()
    fold.apply()
    with torch.no_grad():
        for gate, up, down in triples:  # every reader of the norm that is not a router, quantized or not
            for name in (gate, up):
                always[name].weight.copy_((always[name].weight.float() * s_in).to(always[name].weight.dtype))
        done = set()
        for gate, up, down in triples if quantize_triples else []:
            a, s_d = triple_inputs[down]
            w_up = always[up].weight.float() / s_d[:, None]
            w_down = always[down].weight.float() * s_d
            # 4. and 5.: clip on the inputs divided by the scale before each linear, then round
            for name, w, inputs in ((gate, always[gate].weight.float(), x / s_in), (up, w_up, x / s_in),
                                    (down, w_down, a / s_d)):
                replace_linear(layer, name, pack(*_clip_rtn(inputs, w, group_size, dtype)), always[name])
            done.update((gate, up, down))
            entry["linears"] += 3
        if experts is not None:
            w_gu = experts.gate_up_proj.detach().float() * s_in
            w_d = experts.down_proj.detach().float()
            inter = w_d.shape[-1]
            per_expert = []
            for e in range(w_gu.shape[0]):
                g_u, d = w_gu[e], w_d[e]
                x_e = a = None
                if e in down_scales:
                    g_u = g_u.clone()
                    g_u[inter:] /= down_scales[e][:, None]
                    d = d * down_scales[e]
                    x_e, a = expert_inputs[e][0] / s_in, expert_inputs[e][1] / down_scales[e]
                q_gu = _clip_rtn(x_e, g_u, group_size, dtype)
                q_d = _clip_rtn(a, d, group_size, dtype)
                per_expert.append({**{f"gate_up_proj_{k}": v for k, v in pack(*q_gu).items()},
                                   **{f"down_proj_{k}": v for k, v in pack(*q_d).items()}})
            stacked = {name: torch.stack([t[name] for t in per_expert]) for name in per_expert[0]}
            device = experts.gate_up_proj.device
            targets.set_module(layer, "mlp.experts", QuantizedExperts(stacked, act).to(device))
            entry["experts"] += len(per_expert)
        # the error of the MLP as the model now computes it: its input is the norm's output, divided by s'
        after = loss.output(x / s_in)
        entry["errors"].append(((after - loss.reference).norm() / loss.reference.norm().clamp_min(1e-12)).item())
    return done
