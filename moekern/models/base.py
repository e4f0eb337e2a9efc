"""What moekern needs to know about one Hugging Face MoE family, and the defaults most families share.

An adapter answers: how the router scores experts (a RouterSpec), where the MoE block's router and shared experts
are, which layers are MoE layers, and which config fields change when experts or decoder layers are removed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekern.ops.reference import Activation, RouterSpec

DECISIONS_KEY = "moekern"  # the config field that holds the compression decisions (moekern.surgery.KEY)


def decisions_of(model, family: "Family") -> dict:
    """The compression decisions of a model of `family` (created empty on first use), in original numbering;
    moekern.surgery.decisions(model) finds the family itself."""
    config = model.config
    found = getattr(config, DECISIONS_KEY, None)
    if found:
        return found
    layers = config.num_hidden_layers
    fresh = {
        "dropped_blocks": [],
        "dropped_moe_layers": [],
        "kept_experts": [None] * layers,
        "skip_beta": [None] * layers,
        "quant": None,
        "recipe": None,
        "original_num_hidden_layers": layers,
        "original_num_experts": getattr(config, family.expert_count_field),
    }
    setattr(config, DECISIONS_KEY, fresh)
    return fresh


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    expert_count_field: str  # the config field that holds the number of routed experts
    router_attr: str = "gate"  # the MoE block's router module
    returns_router_scores: bool = False  # GPT-OSS's block returns (hidden, router_scores)

    def router_spec(self, config) -> RouterSpec:
        raise NotImplementedError

    def router_logits(self, router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, router.weight)

    def correction_bias(self, router: torch.nn.Module) -> torch.Tensor | None:
        return None

    def shared_output(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' contribution for tokens x [T, H], or None where the family has none."""
        return None

    def is_moe_layer(self, config, index: int) -> bool:
        return True

    def keep_dense_fields(self, config, kept_layers: list[int]) -> None:
        """Rewrite the config fields that decide which layers are dense, after only `kept_layers` remain."""

    # A family whose MoE blocks moekern replaces with its own MoEBlock as soon as it sees the model (remote code that
    # does not call transformers' experts interface); the others keep the HF blocks until a decision changes them.
    own_blocks = False

    def is_own_block(self, module: torch.nn.Module) -> bool:
        """Whether `module` is one of the MoE blocks moekern replaces on sight (own_blocks families; the swap itself
        is moekern.surgery.adopt, undone by moekern.patching.unpatch)."""
        return False

    def to_disk(self, state: dict) -> dict:
        """The state dict's names as the family's checkpoints name them (transformers' families: as they are)."""
        return state

    def from_disk(self, state: dict) -> dict:
        return state


def expert_weights(experts: torch.nn.Module):
    """(w_gate_up [E, 2I, H], w_down [E, H, I], b_gate_up, b_down) of an HF stacked-experts module, in moekern's
    (out, in) layout; families that store (in, out) (GPT-OSS) give transposed views, not copies."""
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    if getattr(experts, "has_bias", False):
        return w_gate_up, w_down, experts.gate_up_proj_bias, experts.down_proj_bias
    return w_gate_up, w_down, None, None


SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' names for the same function


def expert_activation(experts: torch.nn.Module) -> Activation:
    """The gated activation of an HF experts module: GPT-OSS's interleaved clamped SwiGLU, or SiLU(gate) * up."""
    if not getattr(experts, "is_concatenated", True):
        return Activation("clamped_swiglu", alpha=experts.alpha, limit=experts.limit)
    if type(getattr(experts, "act_fn", None)).__name__ not in SILU:
        raise NotImplementedError(f"moekern supports SiLU-gated experts; this model uses {experts.act_fn!r}")
    return Activation("silu")


def softmax_family(name, model_types, expert_count_field, always_renormalize=False):
    """The Mixtral/Qwen/OLMoE router: softmax over experts, top-k, renormalised (always, or by norm_topk_prob)."""

    class SoftmaxTopK(Family):
        def router_spec(self, config) -> RouterSpec:
            renorm = always_renormalize or bool(getattr(config, "norm_topk_prob", False))
            return RouterSpec("softmax", config.num_experts_per_tok, renormalize=renorm)

    return SoftmaxTopK(name, model_types, expert_count_field)
