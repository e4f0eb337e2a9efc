"""moekern.patch(model) / moekern.unpatch(model).

patch registers moekern's experts computation with transformers' experts interface and switches the model to it:
the HF modules stay, their weights are untouched, and every experts call runs moekern's path. On the CPU its large
Linears (attention, lm_head) also get a forward that reads their weights once for a decode batch
(moekern.modules.linear). Blocks whose routing state changed (dropped experts, per-token skip) are already moekern's
MoEBlock (moekern.surgery swaps them in); unpatch swaps them back to the HF block they wrap, restores the experts
implementation the model had and the Linears' own forward.
"""

from transformers.integrations.moe import ExpertsInterface

from moekern.errors import MoekernError
from moekern.models import family_of
from moekern.modules import linear
from moekern.modules.experts import experts_forward
from moekern.modules.moe import MoEBlock
from moekern.modules.stacked import StackedExperts
from moekern.surgery import adopt

IMPLEMENTATION = "moekern"
_PREVIOUS = "_moekern_previous_experts_implementation"


def patch(model):
    """Run the model's experts through moekern. Refuses a model family moekern does not know. A family whose blocks
    do not call transformers' experts interface (DeepSeek-MoE's remote code) gets moekern's MoEBlock in every MoE
    layer instead (moekern.surgery.adopt)."""
    family = family_of(model)
    adopt(model)
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    linear.install(model)
    if family.own_blocks:
        return model
    current = model.config._experts_implementation
    if current != IMPLEMENTATION:
        setattr(model, _PREVIOUS, current)
        model.set_experts_implementation(IMPLEMENTATION)
    return model


def unpatch(model):
    """Back to transformers' own modules and experts implementation. Sliced weights stay sliced (the HF block then
    routes over the survivors); masks and skips are no longer applied."""
    linear.uninstall(model)
    family = family_of(model)
    for layer in model.get_decoder().layers:
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp = _release(layer.mlp, family)
    previous = getattr(model, _PREVIOUS, None)
    if previous is not None and model.config._experts_implementation == IMPLEMENTATION:
        model.set_experts_implementation(previous)
        delattr(model, _PREVIOUS)
    return model


def is_patched(model) -> bool:
    return model.config._experts_implementation == IMPLEMENTATION


def _release(block: MoEBlock, family):
    """The HF block a MoEBlock wraps, as unpatch gives it back: an own_blocks family's experts restacked back into
    its ModuleList (the kept ones)."""
    hf = block.hf_block
    if family.own_blocks:
        if not isinstance(hf.experts, StackedExperts):
            raise MoekernError(f"this {family.name} layer's experts are 4-bit: they run only through moekern's "
                               f"modules; keep the model patched")
        hf.experts = hf.experts.to_module_list()
    return hf
