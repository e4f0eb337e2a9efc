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
    unmerged 4-bit adapters reloads through moekern.load (checkpoint.replay calls rebuild_expert_adapters).
peft's own custom-module registration (LoraConfig._register_custom_module) is private and places adapters with
`next(module.parameters())`, which a buffers-only QuantizedExperts does not have.

The update of expert e is s * B[e] @ A[e] with s = alpha / r, A initialised as peft does (Kaiming-uniform) and B at
zero, so training starts from the compressed model exactly.
"""

import math

import torch
from torch import nn

from moekern.errors import MoekernError, require
from moekern.finetune.config import LORA_GROUPS, LoraSpec
from moekern.modules.quant import QuantizedExperts, QuantizedLinear
from moekern.ops import reference

ATTR = "lora_experts"  # the adapter's name under the experts module (checkpoint keys: ...mlp.experts.lora_experts.*)
PROJECTIONS = ("gate_up_proj", "down_proj")


class ExpertsLora(nn.Module):
    """Rank-r updates of every stored expert's gate_up and down weights (moekern's (out, in) orientation):
    gate_up_proj_A [E, r, H], gate_up_proj_B [E, 2I, r], down_proj_A [E, r, I], down_proj_B [E, H, r]."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], r: int, alpha: float, device=None, dtype=None):
        super().__init__()
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        for name, (experts, out_features, in_features) in shapes.items():
            a = nn.Parameter(torch.empty(experts, r, in_features, device=device, dtype=dtype))
            b = nn.Parameter(torch.zeros(experts, out_features, r, device=device, dtype=dtype))
            if a.device.type != "meta":
                for e in range(experts):  # peft's init of lora_A (nn.Linear's), per expert
                    nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
            setattr(self, f"{name}_A", a)
            setattr(self, f"{name}_B", b)

    @classmethod
    def for_experts(cls, experts: nn.Module, r: int, alpha: float) -> "ExpertsLora":
        weights = frozen_weights(experts)
        shapes = {name: tuple(weights.shape(name)) for name in PROJECTIONS}
        device = weights.device
        return cls(shapes, r, alpha, device=device, dtype=torch.float32)

    def delta(self, name: str, expert: int) -> torch.Tensor:
        """The (out, in) update of one expert's weight."""
        return self.scaling * getattr(self, f"{name}_B")[expert] @ getattr(self, f"{name}_A")[expert]

    def forward(self, experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """reference.moe_experts with each expert's weight W[e] + s * B[e] @ A[e], applied as the frozen matmul plus
        the low-rank path (the same contract: ids NO_EXPERT for a slot that is not computed)."""
        frozen = frozen_weights(experts)
        out = torch.zeros(x.shape[0], frozen.shape("down_proj")[1], dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            if e == reference.NO_EXPERT:
                continue
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            h = self._linear(frozen, "gate_up_proj", e, x[token])
            y = self._linear(frozen, "down_proj", e, reference.gated_activation(h, frozen.act))
            out.index_add_(0, token, y.float() * weights[token, slot, None].float())
        return out.to(x.dtype)

    def _linear(self, frozen, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, f"{name}_A")[e], getattr(self, f"{name}_B")[e]
        y = frozen.matmul(name, e, x) + self.scaling * ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T)
        bias = frozen.bias(name)
        return y if bias is None else y + bias[e]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class _Stacked:
    """The frozen weights of an HF stacked-experts module (16-bit): views of its parameters."""

    def __init__(self, experts):
        from moekern.models.base import expert_activation, expert_weights

        w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
        self.w = {"gate_up_proj": w_gate_up, "down_proj": w_down}
        self.b = {"gate_up_proj": b_gate_up, "down_proj": b_down}
        self.act = expert_activation(experts)
        self.device = w_gate_up.device

    def shape(self, name):
        return self.w[name].shape

    def matmul(self, name, e, x):
        return x @ self.w[name][e].to(x.dtype).T

    def bias(self, name):
        return self.b[name]


class _Packed:
    """The frozen weights of moekern's 4-bit experts, read through _DequantizedMatmul."""

    def __init__(self, experts: QuantizedExperts):
        self.experts, self.act = experts, experts.act
        self.device = experts.gate_up_proj_qweight.device

    def shape(self, name):
        qweight = getattr(self.experts, f"{name}_qweight")  # [E, K // 8, N]
        return (qweight.shape[0], qweight.shape[2], qweight.shape[1] * 8)

    def matmul(self, name, e, x):
        return _DequantizedMatmul.apply(x, self.experts, name, e)

    def bias(self, name):
        return getattr(self.experts, f"{name}_bias", None)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ dequantize(W[e])^T with the gradient to x only; the backward dequantizes again instead of keeping the
    16-bit weight alive between the passes (QLoRA)."""

    @staticmethod
    def forward(ctx, x, experts, name, e):
        ctx.experts, ctx.name, ctx.e = experts, name, e
        return x @ experts.dequantized(name, e).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.experts.dequantized(ctx.name, ctx.e).to(grad.dtype), None, None, None


def frozen_weights(experts: nn.Module):
    return _Packed(experts) if isinstance(experts, QuantizedExperts) else _Stacked(experts)


# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------
def candidates(model) -> list[dict]:
    """Every module LoRA could target, per decoder layer: {"name" (full), "local" (within the layer), "group",
    "adaptable", "why"}. Attention and shared-expert Linears (nn.Linear: peft; 4-bit QuantizedLinear: not adaptable),
    and the routed experts module of each MoE layer (16-bit or 4-bit: ExpertsLora). The router never is."""
    from moekern import surgery
    from moekern.models import family_of
    from moekern.quant.targets import NEVER, ROUTED

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
    adapted. Trainable flags are the caller's business (moekern.finetune.run sets them)."""
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
    from moekern.quant import layout

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


def rebuild_expert_adapters(model, spec: dict, state: dict) -> int:
    """On a model being loaded (checkpoint.replay): an empty ExpertsLora wherever the state holds one, so that
    load_state_dict(assign=True) fills it. spec: config.moekern["lora_experts"] ({"r", "alpha"})."""
    count = 0
    for path, module in list(model.named_modules()):
        key = f"{path}.{ATTR}."
        names = {n[len(key):]: t for n, t in state.items() if n.startswith(key)}
        if not names:
            continue
        shapes = {p: (names[f"{p}_B"].shape[0], names[f"{p}_B"].shape[1], names[f"{p}_A"].shape[2])
                  for p in PROJECTIONS}
        module.add_module(ATTR, ExpertsLora(shapes, int(spec["r"]), float(spec["alpha"]), device="meta"))
        count += 1
    return count


def adapter_count(model) -> int:
    return sum(isinstance(getattr(m, ATTR, None), ExpertsLora) for m in model.modules())
