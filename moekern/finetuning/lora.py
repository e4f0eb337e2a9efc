"""LoRA on a (compressed) MoE model: peft's LoRA on the Linear layers (attention, shared experts), and moekern's own
adapter on the routed experts' stacked weights, 16-bit or 4-bit.

    summary = attach(model, LoraSpec(r=16, alpha=32, targets=("attention", "experts")))
    ... train ...
    unload(model, merge_4bit=False)      # peft's merge for the Linears; the experts' adapters merged or kept

Why the experts have an adapter of moekern's own (ExpertsLora) rather than peft's `target_parameters` (ParamWrapper):
  - ParamWrapper adds the whole stacked update W + B @ A to the parameter at every forward (a parametrization), so
    autograd keeps a second copy of every layer's experts for the backward pass: twice the experts' memory, which is
    what a compressed MoE cannot spare. ExpertsLora computes x @ W[e]^T + s * (x @ A[e]^T) @ B[e]^T for the tokens
    routed to each expert, and nothing of expert size is kept.
  - It needs an nn.Parameter: moekern's 4-bit experts (QuantizedExperts) hold packed int32 buffers. ExpertsLora reads
    them through a dequantizing matmul whose backward dequantizes again (QLoRA's way), so the 4-bit weights stay
    frozen and bit-identical and no 16-bit copy of them is kept for the backward.
  - It wraps the experts module, while moekern's MoEBlock calls the experts function directly: an adapter that is a
    child of the experts module (`experts.lora_experts`), found by moekern.modules.experts.experts_forward, works
    under the HF block and under MoEBlock alike, and leaves every weight's name as it was, so a checkpoint with
    unmerged 4-bit adapters reloads through moekern.load (checkpoint.replay rebuilds the adapter).
peft's own custom-module registration (LoraConfig._register_custom_module) is private and places adapters with
`next(module.parameters())`, which a buffers-only QuantizedExperts does not have.

The update of expert e is s * B[e] @ A[e] with s = alpha / r, A initialised as peft does (Kaiming-uniform) and B at
zero, so training starts from the compressed model exactly.
"""

import torch
from torch import nn

from moekern.errors import MoekernError, require
from moekern.finetuning.config import LORA_GROUPS, LoraSpec
from moekern.modules.lora import ATTR, PROJECTIONS, ExpertsLora, frozen_weights  # noqa: F401 (ATTR, PROJECTIONS)
from moekern.modules.quant import QuantizedExperts, QuantizedLinear

def candidates(model) -> list[dict]:
    """Every module LoRA could target, per decoder layer: {"name" (full), "local" (within the layer), "group",
    "adaptable", "why"}. Attention and shared-expert Linears (nn.Linear: peft; 4-bit QuantizedLinear: not adaptable),
    and the routed experts module of each MoE layer (16-bit or 4-bit: ExpertsLora). The router never is."""
    from moekern import surgery
    from moekern.models import family_of
    from moekern.targets import NEVER, ROUTED

    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder) + ".layers"
    router = family_of(model).router_attr
    found = []
    for index, layer in enumerate(surgery.decoder_layers(model)):
        base = f"{prefix}.{index}"
        for table, group in (("self_attn", "attention"), ("mlp", "shared")):
            owner = getattr(layer, table, None)
            if owner is None:
                continue
            for name, module in owner.named_modules():
                first = name.split(".")[0]
                if not name or (group == "shared" and (first in (router, ROUTED) or name.endswith(NEVER))):
                    continue
                if type(module) is nn.Linear or isinstance(module, QuantizedLinear):
                    four_bit = isinstance(module, QuantizedLinear)
                    found.append({"name": f"{base}.{table}.{name}", "local": f"{table}.{name}", "group": group,
                                  "adaptable": not four_bit,
                                  "why": "a 4-bit Linear: LoRA over it is not supported" if four_bit else ""})
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and surgery.is_moe_block(mlp) and getattr(mlp, ROUTED, None) is not None:
            found.append({"name": f"{base}.mlp.{ROUTED}", "local": f"mlp.{ROUTED}", "group": "experts",
                          "adaptable": True, "why": ""})
    return found


def find_targets(model, targets) -> dict:
    """What the LoRA targets select in this model: {"linears": [names], "experts": [names], "skipped": [(name, why)]}.
    targets None: every group the model has. An explicitly named target that adapts nothing is an error, and so is
    a selection that adapts nothing."""
    strict = targets is not None
    wanted = tuple(targets) if strict else LORA_GROUPS
    every = candidates(model)
    found = {"linears": [], "experts": [], "skipped": []}
    for target in wanted:
        hits = [c for c in every if (c["group"] == target if target in LORA_GROUPS
                                     else c["local"] == target or c["local"].endswith("." + target))]
        usable = [c for c in hits if c["adaptable"]]
        found["skipped"] += [(c["name"], c["why"]) for c in hits if not c["adaptable"]]
        if strict and not usable:
            why = f" (only {len(hits)} 4-bit Linears, which LoRA does not cover)" if hits else ""
            groups = sorted({c["group"] for c in every if c["adaptable"]})
            raise MoekernError(f"LoRA target {target!r} matches nothing this model can adapt{why}; it has "
                               f"{', '.join(groups) or 'nothing adaptable'}, or name Linears such as q_proj, o_proj")
        for c in usable:
            bucket = found["experts" if c["group"] == "experts" else "linears"]
            if c["name"] not in bucket:
                bucket.append(c["name"])
    found["skipped"] = sorted(set(found["skipped"]))
    if not found["linears"] and not found["experts"]:
        raise MoekernError("the LoRA targets match nothing this model can adapt; name some of "
                           f"{', '.join(LORA_GROUPS)} or Linears such as q_proj")
    return found


def attach(model, spec: LoraSpec) -> dict:
    """Add LoRA adapters in place (peft for the Linears, ExpertsLora for the routed experts); returns what was
    adapted. Trainable flags are the caller's business (moekern.finetuning.run sets them)."""
    found = find_targets(model, spec.targets)
    for path in found["experts"]:
        experts = model.get_submodule(path)
        experts.add_module(ATTR, ExpertsLora.for_experts(experts, spec.r, spec.alpha))
    if found["linears"]:
        peft = require("peft", "LoRA on Linear layers")
        LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                            target_modules=list(found["linears"]))
        inject_adapter_in_model(config, model)
    return found


def unload(model, merge_4bit: bool = False) -> dict:
    """Fold the adapters into the weights and remove them: peft's merge for every LoRA Linear (exact in 16-bit), the
    update s * B @ A for 16-bit experts; 4-bit experts keep their adapter unless merge_4bit (requantize_merged).
    Returns {"merged": n, "kept_4bit": n}."""
    LoraLayer = require("peft.tuners.lora", "merging LoRA adapters").LoraLayer

    counts = {"merged": 0, "kept_4bit": 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            counts["merged"] += 1
    for experts in [m for m in model.modules() if isinstance(getattr(m, ATTR, None), ExpertsLora)]:
        adapter = getattr(experts, ATTR)
        if isinstance(experts, QuantizedExperts):
            if not merge_4bit:
                counts["kept_4bit"] += 1
                continue
            requantize_merged(experts, adapter)
        else:
            weights = frozen_weights(experts)
            with torch.no_grad():
                for name in PROJECTIONS:
                    w = weights.w[name]
                    for e in range(w.shape[0]):
                        w[e] += adapter.delta(name, e).to(w.dtype)
        delattr(experts, ATTR)
        counts["merged"] += 1
    return counts


def requantize_merged(experts: QuantizedExperts, adapter: ExpertsLora) -> None:
    """Merge a 4-bit expert's update by rounding W + dW onto the weight's own quantization grid (scales, zeros and
    AWQ input scale unchanged; only qweight changes). An update smaller than half a quantization step rounds away:
    the run's report measures what the merge kept."""
    from moekern.formats import layout

    with torch.no_grad():
        for name in PROJECTIONS:
            qweight = getattr(experts, f"{name}_qweight")
            scales, zeros = getattr(experts, f"{name}_scales"), getattr(experts, f"{name}_zeros")
            input_scale = getattr(experts, f"{name}_input_scale", None)
            new = qweight.clone()
            for e in range(qweight.shape[0]):
                w = layout.dequantize(qweight[e], scales[e], zeros[e]).float()  # [N, K], before the input scale
                d = adapter.delta(name, e).float()
                if input_scale is not None:  # the effective weight is w * input_scale[k]
                    d = d / input_scale[e][None, :].float()
                group = w.shape[1] // scales.shape[-2]
                s = scales[e].float().transpose(0, 1).repeat_interleave(group, dim=1)
                z = zeros[e].float().transpose(0, 1).repeat_interleave(group, dim=1)
                q = torch.clamp(torch.round((w + d) / s + z), 0, 15).to(torch.uint8)
                new[e] = layout.pack(q)
            setattr(experts, f"{name}_qweight", new)


def adapter_count(model) -> int:
    return sum(isinstance(getattr(m, ATTR, None), ExpertsLora) for m in model.modules())
