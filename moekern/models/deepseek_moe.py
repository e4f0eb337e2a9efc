"""DeepSeek-MoE (DeepSeek-MoE-16B, He et al.'s second model; config model_type "deepseek").

Its checkpoints carry their own modeling_deepseek.py (remote code: moekern loads it only with trust_remote_code) and
transformers has no native class, so this adapter keys on the module structure, not on classes it cannot import: a
decoder layer's `mlp` is an MoE when it has a router `gate` holding `weight` [E, H] (MoEGate) and routed `experts`
in an nn.ModuleList of gated FFNs (gate_proj, up_proj, down_proj), optionally with `shared_experts`; the first
first_k_dense_replace layers (and those off moe_layer_freq) are dense MLPs.

Router (MoEGate.forward): softmax over the routed experts, top-k, renormalised only with norm_topk_prob, no scaling;
the shared experts' output is added with weight 1 (He et al., Eq. 12).

moekern runs these blocks itself: moekern.surgery.adopt(model) restacks each layer's experts
(moekern.modules.stacked.StackedExperts, the layout of transformers' own MoE experts) and puts a MoEBlock in the
remote block's place, so routing, Expert Drop, the kernels and 4-bit quantization work as for Mixtral. On disk the
16-bit experts keep the remote layout (`mlp.experts.{e}.gate_proj.weight`, ...: to_disk / from_disk), so a model whose
every MoE layer kept the same number of experts loads with the checkpoint's own code as well; moekern.unpatch gives
the remote block back.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from moekern.errors import MoekernError
from moekern.models.base import Family
from moekern.ops.reference import RouterSpec

_STACKED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def is_remote_moe(module: nn.Module) -> bool:
    """The structure of DeepSeek-MoE's DeepseekMoE: MoEGate-like `gate` and a ModuleList of gated FFN experts."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (isinstance(getattr(gate, "weight", None), nn.Parameter) and gate.weight.dim() == 2
            and isinstance(experts, nn.ModuleList) and len(experts) > 0
            and all(all(isinstance(getattr(e, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
                    for e in experts))


class DeepSeekMoE(Family):
    own_blocks = True

    def router_spec(self, config) -> RouterSpec:
        scoring = getattr(config, "scoring_func", "softmax")
        if scoring != "softmax":
            raise MoekernError(f"DeepSeek-MoE with scoring_func={scoring!r}: MoEGate supports only softmax")
        return RouterSpec("softmax", config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))

    def router_logits(self, router, x):
        return F.linear(x, router.weight)

    def shared_output(self, block, x):
        shared = getattr(block, "shared_experts", None)
        return None if shared is None else shared(x)

    def is_moe_layer(self, config, index: int) -> bool:
        return (config.n_routed_experts is not None and index >= (config.first_k_dense_replace or 0)
                and index % (config.moe_layer_freq or 1) == 0)

    def keep_dense_fields(self, config, kept_layers: list[int]) -> None:
        if (config.moe_layer_freq or 1) != 1 and any(self.is_moe_layer(config, i) for i in kept_layers):
            raise MoekernError("Block Drop on DeepSeek-MoE with moe_layer_freq != 1 would break its dense-layer "
                               "pattern, which its config cannot express")
        # dense layers are a prefix; it shrinks by the dense layers that were removed
        config.first_k_dense_replace = sum(1 for old in kept_layers if not self.is_moe_layer(config, old))

    def is_own_block(self, module: nn.Module) -> bool:
        return is_remote_moe(module)

    def to_disk(self, state: dict) -> dict:
        """moekern's stacked 16-bit experts -> the remote per-expert names (the checkpoint's own layout)."""
        out = {}
        for name, tensor in state.items():
            found = _STACKED.fullmatch(name)
            if found is None or tensor.dim() != 3:
                out[name] = tensor
                continue
            prefix, which = found.groups()
            for e in range(tensor.shape[0]):
                if which == "down_proj":
                    out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
                else:
                    gate, up = tensor[e].chunk(2)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        return out

    def from_disk(self, state: dict) -> dict:
        """The remote per-expert names -> moekern's stacked experts (to_disk's inverse)."""
        out, grouped = {}, {}
        for name, tensor in state.items():
            found = _PER_EXPERT.fullmatch(name)
            if found is None:
                out[name] = tensor
                continue
            prefix, e, which = found.groups()
            grouped.setdefault(prefix, {}).setdefault(int(e), {})[which] = tensor
        for prefix, experts in grouped.items():
            rows = [experts[e] for e in sorted(experts)]
            if sorted(experts) != list(range(len(experts))) or any(len(r) != 3 for r in rows):
                raise MoekernError(f"{prefix}: the checkpoint's experts are incomplete (ids {sorted(experts)})")
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([r["gate_proj"], r["up_proj"]]) for r in rows])
            out[f"{prefix}.down_proj"] = torch.stack([r["down_proj"] for r in rows])
        return out


DEEPSEEK_MOE = DeepSeekMoE("deepseek", ("deepseek",), "n_routed_experts")
