"""Which modules of a decoder layer are compressed: the routed experts, the attention projections, and the
always-active FFNs (shared experts, the MLP of a dense layer). The router, its gates and lm_head never are."""

from torch import nn

from moekern.models import family_of
from moekern.surgery import is_moe_block

ROUTED = "experts"
NEVER = ("shared_expert_gate",)  # Qwen2-MoE's sigmoid gate of the shared expert: a router, kept 16-bit


def routed_experts(layer: nn.Module) -> nn.Module | None:
    """The layer's HF stacked experts module (gate_up_proj [E, 2I, H]), or None (dense layer, MoE removed)."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, ROUTED, None) if mlp is not None and is_moe_block(mlp) else None
    return experts if experts is not None and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) else None


def has_mlp(layer: nn.Module) -> bool:
    """Whether the layer still has an MLP with weights (a routed MoE or a dense MLP, not one Layer Drop removed)."""
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and any(True for _ in mlp.parameters())


def attention_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        return {}
    return {f"self_attn.{name}": m for name, m in attn.named_modules() if type(m) is nn.Linear}


def always_active_linears(model, layer: nn.Module) -> dict[str, nn.Linear]:
    """Linears of the shared experts (MoE layers) or of the dense MLP (dense layers)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        return {}
    router = family_of(model).router_attr
    found = {}
    for name, m in mlp.named_modules():
        first = name.split(".")[0]
        if type(m) is nn.Linear and first not in (router, ROUTED) and not name.endswith(NEVER):
            found[f"mlp.{name}"] = m
    return found


def ffn_triples(linears: dict[str, nn.Linear]) -> list[tuple[str, str, str]]:
    """(gate, up, down) names of the SiLU-gated FFNs among `linears` (prefix.gate_proj / up_proj / down_proj)."""
    triples = []
    for name in linears:
        if name.endswith(".gate_proj"):
            prefix = name[: -len("gate_proj")]
            up, down = prefix + "up_proj", prefix + "down_proj"
            if up in linears and down in linears:
                triples.append((name, up, down))
    return triples


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace root's submodule at `path`; a MoEBlock's wrapped HF block gets it too, so the old weights are freed
    and unpatch keeps the compressed module."""
    from moekern.modules.moe import MoEBlock

    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)
    if isinstance(parent, MoEBlock) and getattr(parent.hf_block, attr, None) is not None:
        setattr(parent.hf_block, attr, module)


def get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)
