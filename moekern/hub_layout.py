"""The names and shapes of a model's tensors on disk: each family's hub layout, as transformers' save_pretrained
writes it, and back to the in-memory names transformers 5 and moekern use.

transformers 5 converts checkpoints on load (Mixtral: `block_sparse_moe.experts.N.w1.weight` ... stacked into
`mlp.experts.gate_up_proj [E, 2I, H]`) and reverts the conversion on save. moekern uses transformers' own conversion
mapping in both directions (transformers.conversion_mapping, core_model_loading), so every family it knows is
written exactly as save_pretrained writes it, tied weights included (`model.embed_tokens.weight` kept,
`lm_head.weight` dropped), and no family needs a key map of its own here.

    state_for_disk(model)          -> {hub name: tensor}
    state_from_disk(model, state)  -> {in-memory name: tensor}

state_from_disk reads the hub layout and also the in-memory layout that moekern wrote before (the conversion leaves
in-memory names as they are), so older folders keep loading.

moekern's 4-bit experts (QuantizedExperts: `gate_up_proj_qweight [E, K/8, 2I]`, `_scales`, `_zeros`,
`_input_scale`, stacked) go where the family's 16-bit experts go: per expert, each under the name of the 16-bit
weight it replaces with `.weight` swapped for the part, in moekern's own packing (moekern/formats/layout.py: qweight
int32 [K/8, N], scales [K/G, N], zeros uint8 [K/G, N], input_scale [K]), e.g.

    model.layers.0.block_sparse_moe.experts.3.w1.qweight      int32 [H/8, I]   (gate of expert 3)
    model.layers.0.block_sparse_moe.experts.3.w1.input_scale  [H]              (AWQ: the same on w1 and w3)

and stacked where the family's hub layout stacks them (GPT-OSS: `mlp.experts.gate_up_proj_qweight`). The names are
transformers' own: the parts are handed to its conversion as stand-ins of the 16-bit weights. A per-expert layout
keeps one numbering of experts for the 16-bit and the 4-bit checkpoints, and is what vLLM's expert loader reads;
`zeros` (not AutoAWQ's packed `qzeros`) and the moekern model_type in config.json keep it from being mistaken for
an AutoAWQ or GPTQ checkpoint (moekern.quantized_folders writes those).
"""

import copy

import torch

from moekern.errors import MoekernError

QUANT_PARTS = ("qweight", "scales", "zeros", "input_scale")
STACKED = ("gate_up_proj", "down_proj")  # the stacked expert parameters of transformers 5


def state_for_disk(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names, and with the shapes, that transformers' save_pretrained writes; each
    tensor is contiguous and owns its storage (safetensors refuses shared memory)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    stand_ins = _quantized_expert_stand_ins(model, state)  # removes those buffers from state
    own = _moekern_tensors(model, state)  # and the other tensors of moekern's modules
    out = revert_weight_conversion(model, state)
    out.update(_renamed_only(model, own))
    for part, tensors in stand_ins.items():
        for stacked_name, stand_in in tensors.items():  # one at a time: each knows its last dim (transformers'
            for name, tensor in revert_weight_conversion(model, {stacked_name: stand_in}).items():  # split squeezes)
                out.update(_part_from_stand_in(name, tensor, part, stand_in.shape[-1]))
    return _own_storage(out)


def state_from_disk(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors read from a folder (hub layout, or moekern's earlier in-memory layout) under the model's own names.
    `model` gives the family's conversion (its weights are not read: a skeleton on the meta device will do)."""
    plain, stand_ins = {}, {}
    for name, tensor in state.items():
        base, _, part = name.rpartition(".")
        if part in QUANT_PARTS:
            stand_ins.setdefault(part, {})[f"{base}.weight"] = tensor.T if tensor.dim() == 2 else tensor[None]
        else:
            plain[name] = tensor
    out = _convert(model, plain)
    for part, tensors in stand_ins.items():
        for name, tensor in _convert(model, tensors).items():
            if name.endswith(".weight"):  # a 4-bit linear, renamed like the 16-bit one
                out[f"{name.removesuffix('.weight')}.{part}"] = tensor.T if part != "input_scale" else tensor[0]
            else:  # stacked experts [E, N, K/8] -> [E, K/8, N]; an input scale [E, 1 or 2, K] -> [E, K]
                out[f"{name}_{part}"] = tensor.transpose(1, 2) if part != "input_scale" else _one_row(name, tensor)
    # the conversions above give transposed views; moekern's kernels read the 4-bit layout where it lies, row-major
    return {name: tensor.contiguous() for name, tensor in out.items()}


# ----------------------------------------------------------------------------------------------------------------------
# 4-bit experts as stand-ins of the 16-bit weights
# ----------------------------------------------------------------------------------------------------------------------
def _quantized_expert_stand_ins(model, state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{part: {"<experts>.gate_up_proj": stand-in}}: each QuantizedExperts buffer reshaped like the 16-bit parameter
    it replaces ([E, N, ...], output rows second), taken out of `state`."""
    from moekern.modules.quant import QuantizedExperts

    stand_ins = {}
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedExperts):
            continue
        for stacked in STACKED:
            for part in QUANT_PARTS:
                tensor = state.pop(f"{path}.{stacked}_{part}", None)
                if tensor is None:
                    continue
                if part == "input_scale":  # one row per output block: gate and up share the input
                    tensor = tensor[:, None].expand(-1, 2 if stacked == "gate_up_proj" else 1, -1)
                else:
                    tensor = tensor.transpose(1, 2)
                stand_ins.setdefault(part, {})[f"{path}.{stacked}"] = tensor
    return stand_ins


def _part_from_stand_in(name: str, tensor: torch.Tensor, part: str, width: int) -> dict[str, torch.Tensor]:
    if name.endswith(".weight"):  # one expert's linear: [N, K/8] -> [K/8, N]; input scale [1, K] -> [K]
        tensor = tensor.reshape(-1, width)  # transformers' split squeezes every dim of size 1
        return {f"{name.removesuffix('.weight')}.{part}": tensor.T if part != "input_scale" else tensor[0]}
    # stacked on disk too (no conversion for this family)
    return {f"{name}_{part}": tensor.transpose(1, 2) if part != "input_scale" else _one_row(name, tensor)}


def _one_row(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not bool((tensor == tensor[:, :1]).all()):
        raise MoekernError(f"{name}: the gate and up projections of an expert carry different input scales; "
                           f"moekern's 4-bit experts share one per expert")
    return tensor[:, 0]


def _moekern_tensors(model, state: dict) -> dict[str, torch.Tensor]:
    """The tensors held by moekern's own modules (4-bit linears, adapters), taken out of `state`: transformers'
    patterns are regular expressions that can match their names (`lora_experts.gate_up_proj_A` matches
    `.experts.gate_up_proj`), and only the module path around them is transformers'."""
    own = {}
    for name in list(state):
        owner = name.rpartition(".")[0]
        if type(model.get_submodule(owner)).__module__.startswith("moekern."):
            own[name] = state.pop(name)
    return own


def _renamed_only(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under the module paths save_pretrained writes (its renamings reversed, no converter)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, rename_source_key

    conversions = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model, add_legacy=False)
    renamings = [c.reverse_transform() for c in conversions[::-1]
                 if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
    return {rename_source_key(name, renamings, [], reverse=True)[0]: tensor for name, tensor in state.items()}


# ----------------------------------------------------------------------------------------------------------------------
# transformers' conversion, forward
# ----------------------------------------------------------------------------------------------------------------------
def _convert(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What transformers' loading does to names and shapes (renamings, then at most one converter per key), the
    mirror of its revert_weight_conversion. Keys no conversion matches keep their names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    # As on save: a model built from its config has no prefix to add or strip.
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if not conversions or not state:
        return dict(state)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    pending = {}
    for name, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):  # experts 0, 1, 2, ... 10
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            transform, pattern = pending.setdefault(target, WeightRenaming(name, target)), name
        else:
            transform = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        transform.add_tensor(target, name, pattern, tensor)
    out = {}
    for target, transform in pending.items():
        for name, tensor in transform.convert(target, model=model, config=model.config).items():
            out[name] = tensor[0] if isinstance(tensor, list) else tensor
    return out


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with a storage of its own: a view into a stacked tensor is copied."""
    out, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        out[name] = tensor if whole and ptr not in seen else tensor.contiguous().clone()
        seen.add(ptr)
    return out
