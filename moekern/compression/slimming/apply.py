"""quantize_(model, QuantConfig) and prune_(model, PruneConfig): walk the decoder layers (calibrated one at a time
where the method needs data), compress each layer's targets, record the decision, and report."""

import time

import torch
from torch import nn

from moekern.errors import MoekernError
from moekern.models.base import expert_activation, expert_weights
from moekern.modules.quant import QuantizedExperts
from moekern.ops.reference import Activation, gated_activation
from moekern import targets
from moekern.compression.slimming.calibrate import calibrated_layers, check_calibration
from moekern.compression.slimming.config import PruneConfig, QuantConfig
from moekern.compression.slimming.ffn import quantize_ffn, quantize_linears
from moekern.compression.slimming.hessian import hessian
from moekern.compression.slimming.linears import NormFold, replace_linear
from moekern.compression.slimming.prune import sparsegpt, wanda
from moekern.compression.slimming.rtn import check_group, pack, rtn
from moekern.surgery import adopt, decisions, decoder_layers

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # AutoAWQ does not clip q and k (attention scores are sensitive)


# ----------------------------------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------------------------------
def _quant_linears(model, layer, config: QuantConfig) -> dict[str, nn.Linear]:
    found = {}
    if config.quantize_attention:
        found.update(targets.attention_linears(layer))
    if config.quantize_shared_experts:
        found.update(targets.always_active_linears(model, layer))
    return found


def check_widths(model, config: QuantConfig) -> None:
    """Fail before any calibration if the group size does not divide a width that would be quantized."""
    for index, layer in enumerate(decoder_layers(model)):
        experts = targets.routed_experts(layer)
        if experts is not None:
            w_gu, w_d, _, _ = expert_weights(experts)
            check_group(w_gu.shape[-1], config.group_size, f"experts' gate_up of layer {index}")
            check_group(w_d.shape[-1], config.group_size, f"experts' down of layer {index}")
        for name, linear in _quant_linears(model, layer, config).items():
            check_group(linear.in_features, config.group_size, f"{name} of layer {index}")
    if config.quantize_lm_head:
        _lm_head(model)  # a Linear (its width is the experts' input width, checked above)


def quantize_(model, config: QuantConfig, calibration: torch.Tensor | None = None, device=None,
              batch_size: int = 8) -> dict:
    """Quantize the model's experts (and, by the config, attention and shared experts) to 4 bits in place.

    calibration: token ids LongTensor [n, L], needed by AWQ and GPTQ (RTN only reports its errors on it). Each
    routed expert is calibrated on the tokens the router sends it; an expert no calibration token reaches is
    quantized by RTN (counted in the report). device: where each layer is calibrated (default: where it is).
    Returns the report: per layer seconds, experts quantized, RTN fallbacks (experts without calibration tokens),
    awq_kept_rtn (experts where RTN had the lower routing-weighted output error on calibration, so AWQ kept it), and
    the relative output errors on calibration: plain (every routed token once) and, for the routed experts,
    weighted by the routing weights (the error as it reaches the layer's output).
    """
    config.validate()
    adopt(model)
    d = decisions(model)
    if d.get("quant"):
        raise MoekernError(f"the model is already quantized ({d['quant']}); quantize the 16-bit model")
    check_widths(model, config)
    started = time.time()
    report = {"method": config.method, "bits": config.bits, "group_size": config.group_size, "layers": []}
    autoawq = config.scheme == "autoawq"
    if autoawq:
        from moekern.compression.slimming import autoawq as autoawq_scheme

        for layer in decoder_layers(model):
            autoawq_scheme.check_layer(layer)

    def choose(layer):
        linears = _quant_linears(model, layer, config)
        if autoawq and targets.has_mlp(layer):  # AutoAWQ judges the scale on the whole MLP's output
            linears[autoawq_scheme.MLP] = layer.mlp
        return targets.routed_experts(layer), linears

    if config.needs_calibration or calibration is not None:  # RTN uses it only to report the output errors
        ids = check_calibration(model, calibration, config.method.upper())
        walk = calibrated_layers(model, ids, choose, desc=f"{config.method} 4-bit", device=device,
                                 batch_size=batch_size)
    else:
        walk = ((i, layer, None) for i, layer in enumerate(decoder_layers(model)))
    for index, layer, capture in walk:
        t0 = time.time()
        entry = {"layer": index, "experts": 0, "fallback_rtn": 0, "awq_kept_rtn": 0, "linears": 0, "errors": [],
                 "weighted_errors": []}
        with torch.no_grad():
            done = set()
            if autoawq:
                done = autoawq_scheme.quantize_mlp(model, layer, capture, config, entry)
            else:
                _quantize_experts(layer, capture, config, entry)
            _quantize_other_linears(model, layer, capture, config, entry, done)
        errors, weighted = entry.pop("errors"), entry.pop("weighted_errors")
        entry["mean_rel_output_error"] = sum(errors) / len(errors) if errors else None
        entry["max_rel_output_error"] = max(errors) if errors else None
        entry["mean_weighted_rel_output_error"] = sum(weighted) / len(weighted) if weighted else None
        entry["seconds"] = round(time.time() - t0, 3)
        report["layers"].append(entry)
        del capture  # this layer's inputs go before the next layer's are captured
    if config.quantize_lm_head:
        _quantize_lm_head(model, config)
    d["quant"] = config.record()
    report["fallback_rtn"] = sum(e["fallback_rtn"] for e in report["layers"])
    report["awq_kept_rtn"] = sum(e["awq_kept_rtn"] for e in report["layers"])
    report["experts"] = sum(e["experts"] for e in report["layers"])
    for key in ("mean_rel_output_error", "mean_weighted_rel_output_error"):
        errors = [e[key] for e in report["layers"] if e[key] is not None]
        report[key] = sum(errors) / len(errors) if errors else None
    report["seconds"] = round(time.time() - started, 2)
    return report


def _lm_head(model) -> nn.Linear:
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise MoekernError(f"the lm_head of this model is a {type(head).__name__}, not a Linear; quantize without "
                           f"quantize_lm_head (the recipe option :head)")
    return head


def _quantize_lm_head(model, config: QuantConfig) -> None:
    """The output projection in 4 bits by RTN (llama.cpp keeps its output tensor in 6 bits, Q6_K, by default): a
    decode step reads all of it for every token. Where it is tied to the embedding, it gets a 4-bit copy of its own
    and the embedding stays 16-bit, so the configs no longer tie them (save and load then keep both)."""
    head = _lm_head(model)
    name = next(path for path, module in model.named_modules() if module is head)
    tensors = pack(*rtn(head.weight.detach(), config.group_size))
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    replace_linear(model, name, tensors, head)


def _quantize_experts(layer, capture, config: QuantConfig, entry: dict) -> None:
    experts = targets.routed_experts(layer)
    if experts is None:
        return
    w_gu, w_d, b_gu, b_d = expert_weights(experts)
    act = expert_activation(experts)
    per_expert = []
    for e in range(w_gu.shape[0]):
        x = capture.expert_inputs(e) if capture is not None else None
        routing = capture.expert_routing_weights(e) if capture is not None else None
        if config.needs_calibration and x is None:
            entry["fallback_rtn"] += 1
        gptq = config.gptq_options
        tensors, error, weighted = quantize_ffn(
            x, w_gu[e], w_d[e], None if b_gu is None else b_gu[e], None if b_d is None else b_d[e], act,
            config.method, config.group_size, gptq["act_order"], w_gu.dtype, token_weights=routing,
            sym=gptq["sym"], hessian_weights=gptq["routing_weights"],
        )
        if config.method == "awq" and x is not None and "gate_up_proj_input_scale" not in tensors:
            entry["awq_kept_rtn"] += 1  # RTN had the lower routing-weighted output error on calibration
        per_expert.append(tensors)
        if error is not None:
            entry["errors"].append(error)
            entry["weighted_errors"].append(weighted)
    stacked = {}
    for name in dict.fromkeys(n for t in per_expert for n in t):  # an RTN fallback has no AWQ input scale: ones
        like = next(t[name] for t in per_expert if name in t)
        stacked[name] = torch.stack([t.get(name, torch.ones_like(like)) for t in per_expert])
    quantized = QuantizedExperts(stacked, act).to(w_gu.device)
    targets.set_module(layer, "mlp.experts", quantized)
    entry["experts"] += w_gu.shape[0]


def _quantize_other_linears(model, layer, capture, config: QuantConfig, entry: dict, done=()) -> None:
    linears = {k: v for k, v in _quant_linears(model, layer, config).items() if k not in done}
    done = set()
    inputs = (lambda name: capture.linear_inputs(name)) if capture is not None else (lambda name: None)
    # gated FFNs (shared experts, dense MLPs): the FFN path, so AWQ folds down's scale into up
    for gate, up, down in targets.ffn_triples(linears):
        act_fn = type(targets.get(layer, gate[: -len("gate_proj")] + "act_fn")).__name__
        if act_fn not in ("SiLU", "SiLUActivation"):
            continue
        g, u, dn = linears[gate], linears[up], linears[down]
        w_gu = torch.cat([g.weight, u.weight])
        tensors, error, _ = quantize_ffn(inputs(gate), w_gu, dn.weight, None, None, _SILU, config.method,
                                         config.group_size, config.gptq_options["act_order"], g.weight.dtype,
                                         sym=config.gptq_options["sym"])
        inter = g.out_features
        split = {gate: slice(0, inter), up: slice(inter, 2 * inter)}
        for name, rows in split.items():
            t = {k.removeprefix("gate_up_proj_"): v for k, v in tensors.items() if k.startswith("gate_up_proj_")}
            # each linear its own copy: safetensors would drop a tensor that two names share
            t = {k: (v[..., rows] if k in ("qweight", "scales", "zeros") else v).clone() for k, v in t.items()}
            replace_linear(layer, name, t, linears[name])
        replace_linear(layer, down, {k.removeprefix("down_proj_"): v for k, v in tensors.items()
                                      if k.startswith("down_proj_")}, dn)
        done.update((gate, up, down))
        entry["linears"] += 3
        if error is not None:
            entry["errors"].append(error)
    # q, k, v read input_layernorm only: AWQ searches one scale for the three and folds it into the norm
    norm = getattr(layer, "input_layernorm", None)
    # (where the norm is not y = weight * normalized(x), they take input scales below, one by one)
    if all(n in linears for n in QKV) and NormFold.foldable(norm):
        x = inputs(QKV[0])
        fold = NormFold(norm)
        packed, s, error = quantize_linears(x, [linears[n].weight for n in QKV], _method(config, x),
                                            config.group_size, config.gptq_options["act_order"], clip=False,
                                            fix_scale=fold.fix, sym=config.gptq_options["sym"])
        if s is not None:
            fold.apply()
        for name, tensors in zip(QKV, packed, strict=True):
            replace_linear(layer, name, tensors, linears[name])
        done.update(QKV)
        entry["linears"] += 3
        if error is not None:
            entry["errors"].append(error)
    for name, linear in linears.items():
        if name in done:
            continue
        x = inputs(name)
        packed, s, error = quantize_linears(x, [linear.weight], _method(config, x), config.group_size,
                                            config.gptq_options["act_order"], clip=name not in NO_CLIP,
                                            sym=config.gptq_options["sym"])
        tensors = packed[0]
        if s is not None:
            tensors["input_scale"] = (1 / s).to(linear.weight.dtype)
        replace_linear(layer, name, tensors, linear)
        entry["linears"] += 1
        if error is not None:
            entry["errors"].append(error)


_NormFold = NormFold  # its earlier name

_SILU = Activation("silu")  # the shared experts and dense MLPs of every family moekern knows


def _method(config: QuantConfig, x) -> str:
    return config.method if x is not None else "rtn"


# ----------------------------------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------------------------------
def prune_(model, config: PruneConfig, calibration: torch.Tensor | None = None, device=None,
           batch_size: int = 8) -> dict:
    """Prune the routed experts' weights in place (and the shared experts' with prune_shared_experts), each expert
    calibrated on the tokens routed to it; down is pruned on what the pruned gate_up produces. An expert that no
    calibration token reaches is pruned by weight magnitude (counted as fallback_magnitude)."""
    config.validate()
    adopt(model)
    ids = check_calibration(model, calibration, config.method)
    d = decisions(model)
    if d.get("quant"):
        raise MoekernError("prune the 16-bit model before quantizing it (the experts are 4-bit now)")
    if config.structured:
        for index, layer in enumerate(decoder_layers(model)):
            experts = targets.routed_experts(layer)
            if experts is not None:
                for w in expert_weights(experts)[:2]:
                    if w.shape[-1] % config.m:
                        raise MoekernError(
                            f"layer {index}: input width {w.shape[-1]} is not a multiple of m={config.m}"
                        )
    started = time.time()
    report = {**config.record(), "layers": []}

    def choose(layer):
        shared = targets.always_active_linears(model, layer) if config.prune_shared_experts else {}
        return targets.routed_experts(layer), ({} if targets.routed_experts(layer) is None else shared)

    for index, layer, capture in calibrated_layers(model, ids, choose, desc=f"{config.method} pruning",
                                                   device=device, batch_size=batch_size):
        t0 = time.time()
        entry = {"layer": index, "experts": 0, "fallback_magnitude": 0}
        errors = []
        with torch.no_grad():
            experts = targets.routed_experts(layer)
            if experts is not None:
                w_gu, w_d, b_gu, b_d = expert_weights(experts)
                act = expert_activation(experts)
                for e in range(w_gu.shape[0]):
                    x = capture.expert_inputs(e)
                    entry["fallback_magnitude"] += x is None
                    before = None if x is None else _expert_output(x, w_gu, w_d, b_gu, b_d, e, act)
                    w_gu[e].copy_(_prune(w_gu[e], x, config))
                    a = None
                    if x is not None:
                        h = x.float() @ w_gu[e].float().T
                        a = gated_activation(h if b_gu is None else h + b_gu[e].float(), act)
                    w_d[e].copy_(_prune(w_d[e], a, config))
                    entry["experts"] += 1
                    if before is not None:
                        after = _expert_output(x, w_gu, w_d, b_gu, b_d, e, act)
                        errors.append(((after - before).norm() / before.norm().clamp_min(1e-12)).item())
                for gate, up, down in targets.ffn_triples(choose(layer)[1]):
                    x = capture.linear_inputs(gate)
                    for name in (gate, up):
                        w = targets.get(layer, name).weight
                        w.copy_(_prune(w, x, config))
                    g, u = targets.get(layer, gate), targets.get(layer, up)
                    act_fn = targets.get(layer, gate[: -len("gate_proj")] + "act_fn")
                    a = None if x is None else act_fn(g(x)) * u(x)
                    w = targets.get(layer, down).weight
                    w.copy_(_prune(w, a, config))
        entry["mean_rel_output_error"] = sum(errors) / len(errors) if errors else None
        entry["seconds"] = round(time.time() - t0, 3)
        report["layers"].append(entry)
        del capture  # this layer's inputs go before the next layer's are captured
    d["prune"] = config.record()
    means = [e["mean_rel_output_error"] for e in report["layers"] if e["mean_rel_output_error"] is not None]
    report["mean_rel_output_error"] = sum(means) / len(means) if means else None
    report["fallback_magnitude"] = sum(e["fallback_magnitude"] for e in report["layers"])
    report["seconds"] = round(time.time() - started, 2)
    return report


def _expert_output(x, w_gu, w_d, b_gu, b_d, e, act) -> torch.Tensor:
    """Expert e's output on its tokens x, in fp32 (for the report's relative output error)."""
    h = x.float() @ w_gu[e].float().T
    y = gated_activation(h if b_gu is None else h + b_gu[e].float(), act) @ w_d[e].float().T
    return y if b_d is None else y + b_d[e].float()


def _prune(w: torch.Tensor, x: torch.Tensor | None, config: PruneConfig) -> torch.Tensor:
    pattern = {"sparsity": config.sparsity, "n": config.n, "m": config.m}
    if config.method == "sparsegpt" and x is not None:
        return sparsegpt(w, hessian(x), **pattern)
    return wanda(w, None if x is None else x.float().pow(2).sum(dim=0), **pattern)
