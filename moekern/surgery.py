"""Structural edits that compression decides on, each recorded in `model.config.moekern` in the original layer and
expert numbering (the names other tools read: dropped_blocks, dropped_moe_layers, kept_experts, skip_beta, quant,
recipe). They change the model in place; the methods of moekern.compression choose what to pass them.

    drop_experts(model, {layer: kept_ids})   Expert Drop: keep only these experts (weights sliced, or masked)
    remove_moe_layers(model, layers)         Layer Drop: the layer's post-attention norm and MoE are removed
    remove_blocks(model, layers)             Block Drop: whole decoder layers are removed
    set_skip_beta(model, {layer: beta})      per-token skipping of weak slots
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from moekern import arguments
from moekern.errors import MoekernError
from moekern.models import family_of
from moekern.models.base import DECISIONS_KEY, decisions_of
from moekern.modules.moe import MoEBlock, RemovedMoE

KEY = DECISIONS_KEY
_COUNT_HINT = " (to remove layer 3 pass [3]; to let moekern choose N layers, use the recipe step {step}=N)"


def decisions(model) -> dict:
    """The compression decisions of a model (created empty on first use), in original numbering."""
    config = model.config
    found = getattr(config, KEY, None)
    if found:
        return found
    return decisions_of(model, family_of(model))


def original_layer_ids(model) -> list[int]:
    """The original index of each decoder layer the model has now."""
    d = decisions(model)
    return [i for i in range(d["original_num_hidden_layers"]) if i not in d["dropped_blocks"]]


def decoder_layers(model) -> nn.ModuleList:
    return model.get_decoder().layers


def is_moe_block(module: nn.Module) -> bool:
    return isinstance(module, MoEBlock) or hasattr(module, "experts")


def moe_layer_ids(model) -> list[int]:
    """Original indices of the layers that still have a routed MoE."""
    return [orig for orig, layer in zip(original_layer_ids(model), decoder_layers(model)) if is_moe_block(layer.mlp)]


def _layer(model, original: int) -> nn.Module:
    ids = original_layer_ids(model)
    if original not in ids:
        d = decisions(model)
        why = "was removed by Block Drop" if original in d["dropped_blocks"] else "does not exist"
        raise MoekernError(f"layer {original} {why}; the model has layers {ids}")
    return decoder_layers(model)[ids.index(original)]


def adopt(model):
    """Bring a model into the layout moekern works on: nothing for transformers' own families; the MoE blocks of an
    own_blocks family (DeepSeek-MoE's remote code) become MoEBlocks over stacked experts (idempotent). Every entry
    point calls it; it returns the model."""
    family = family_of(model)
    if not family.own_blocks:
        return model
    from moekern.modules.stacked import StackedExperts

    original = None
    for layer in model.get_decoder().layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or isinstance(mlp, MoEBlock) or not family.is_own_block(mlp):
            continue
        original = original or decisions_of(model, family)["original_num_experts"]
        mlp.experts = StackedExperts(mlp.experts)
        layer.mlp = MoEBlock(mlp, family, model.config, original)
    return model


def moe_block(model, original: int) -> MoEBlock:
    """The layer's MoE as a MoEBlock, swapping one in for the HF block the first time its state changes."""
    adopt(model)
    layer = _layer(model, original)
    if isinstance(layer.mlp, MoEBlock):
        return layer.mlp
    if not is_moe_block(layer.mlp):
        kind = "had its MoE removed" if isinstance(layer.mlp, RemovedMoE) else "is a dense layer"
        raise MoekernError(f"layer {original} {kind}: it has no experts to change")
    block = MoEBlock(layer.mlp, family_of(model), model.config, decisions(model)["original_num_experts"])
    layer.mlp = block
    return block


def drop_experts(model, kept: Mapping[int, Sequence[int]], mask_only: bool = False) -> None:
    """Expert Drop: in each layer (original index), keep only the experts `kept[layer]` (original ids).

    Tokens then route among the survivors (softmax, top-k and renormalisation over them). By default the dropped
    experts' weights and router rows are removed, so memory shrinks; mask_only=True keeps them and masks the router.
    Both give the same output. A layer may keep fewer experts than top_k: its emptied slots are not computed.
    """
    arguments.mapping(kept, "drop_experts: kept", "{layer: [expert ids to keep]}")
    d = decisions(model)
    for original, ids in kept.items():
        original = arguments.index(original, "drop_experts: layer ids")
        ids = sorted(arguments.indices(ids, f"drop_experts: layer {original}: the expert ids"))
        block = moe_block(model, original)
        stored = block.kept_experts.tolist()
        if not ids:
            raise MoekernError(f"layer {original}: dropping every expert leaves no MoE; use Layer Drop instead")
        if len(set(ids)) != len(ids) or not set(ids) <= set(torch.nonzero(block.alive).flatten().tolist()):
            raise MoekernError(
                f"layer {original}: kept experts {ids} must be distinct experts that are still there "
                f"(alive now: {torch.nonzero(block.alive).flatten().tolist()})"
            )
        alive = torch.zeros_like(block.alive)
        alive[ids] = True
        block.alive = alive
        if not mask_only:
            _slice_experts(block, [stored.index(i) for i in ids])
            block.set_kept_experts(torch.tensor(ids, device=block.kept_experts.device))
        d["kept_experts"][original] = ids


def _slice_experts(block: MoEBlock, rows: list[int]) -> None:
    """Keep only these storage rows of the experts' weights and the router's per-expert rows (new, smaller tensors)."""
    index = torch.tensor(rows, device=block.kept_experts.device)
    for module in (block.experts, getattr(block, block.family.router_attr)):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.dim() >= 1 and tensor.shape[0] == block.kept_experts.numel():
                sliced = tensor.detach().index_select(0, index)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(name, sliced)
        if hasattr(module, "num_experts"):  # so the HF forward stays consistent after unpatch
            module.num_experts = len(rows)


def remove_moe_layers(model, layers: Iterable[int]) -> None:
    """Layer Drop: remove the post-attention norm and MoE of these layers (original indices); attention stays."""
    layers = arguments.indices(layers, "remove_moe_layers: layers", _COUNT_HINT.format(step="layer-drop"))
    d = decisions(model)
    family = family_of(model)
    for original in sorted(set(layers)):
        layer = _layer(model, original)
        if not is_moe_block(layer.mlp):
            raise MoekernError(f"layer {original} has no MoE to remove (MoE layers now: {moe_layer_ids(model)})")
        layer.mlp = RemovedMoE(family.returns_router_scores)
        layer.post_attention_layernorm = nn.Identity()
        d["dropped_moe_layers"] = sorted(d["dropped_moe_layers"] + [original])
        d["kept_experts"][original] = None
        d["skip_beta"][original] = None


def remove_blocks(model, layers: Iterable[int]) -> None:
    """Block Drop: remove these decoder layers (original indices) and renumber what is left, so the KV cache and
    generate keep working: layer_idx, num_hidden_layers, layer_types and the fields that mark dense layers."""
    layers = arguments.indices(layers, "remove_blocks: layers", _COUNT_HINT.format(step="block-drop"))
    d = decisions(model)
    drop = sorted(set(layers))
    current = original_layer_ids(model)
    for original in drop:
        _layer(model, original)  # validates
    kept = [orig for orig in current if orig not in drop]
    if not kept:
        raise MoekernError(f"dropping blocks {drop} would leave no decoder layer; keep at least one")
    config = model.config
    family = family_of(model)
    modules = decoder_layers(model)
    survivors = [modules[current.index(orig)] for orig in kept]
    # Which current layers are dense is decided on the current numbering, before the fields are rewritten.
    family.keep_dense_fields(config, [current.index(orig) for orig in kept])
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[current.index(orig)] for orig in kept]
    config.num_hidden_layers = len(kept)
    model.get_decoder().layers = nn.ModuleList(survivors)
    for new_index, layer in enumerate(survivors):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    d["dropped_blocks"] = sorted(d["dropped_blocks"] + drop)
    for original in drop:
        d["kept_experts"][original] = None
        d["skip_beta"][original] = None
        if original in d["dropped_moe_layers"]:
            d["dropped_moe_layers"].remove(original)


def set_skip_beta(model, betas: Mapping[int, float | None]) -> None:
    """Per-token skipping: in each layer, a slot whose routing weight is below beta times the token's top weight is
    not computed. beta=None turns it off for the layer."""
    arguments.mapping(betas, "set_skip_beta: betas", "{layer: beta in [0, 1] or None}")
    d = decisions(model)
    for original, beta in betas.items():
        original = arguments.index(original, "set_skip_beta: layer ids")
        if beta is not None:
            beta = arguments.fraction(beta, f"set_skip_beta: layer {original}: skip beta")
        moe_block(model, original).skip_beta = beta
        d["skip_beta"][original] = beta
