"""moekern.save and moekern.load: only local folders, only safetensors, no remote code unless the user asks.

`load` is the one door through which the CLI and the library open a model folder: a moekern checkpoint is rebuilt
from its recorded decisions, a published AutoAWQ / GPTQ folder is converted into moekern's 4-bit modules
(moekern.quantized_folders), and any other Hugging Face folder is read by transformers (load_pretrained). The folder
itself (which one, its shards, tied weights, tokenizer) is read by moekern.model_files.
"""

import json
from pathlib import Path

import torch

from moekern import folders
from moekern.errors import MoekernError
from moekern.model_files import (  # noqa: F401 (resolve_model_dir, SHIPPED: their home was here)
    SHIPPED,
    fill_tied_weights,
    load_tokenizer,
    materialise_buffers,
    read_weights,
    resolve_model_dir,
)


def __getattr__(name: str):
    if name == "config_for_disk":  # its home was here; imported on use, as it imports the model classes
        from moekern.config_on_disk import config_for_disk

        return config_for_disk
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_pretrained(
    source: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    **from_pretrained,
):
    """Load (model, tokenizer) of a plain Hugging Face folder with safetensors weights, in eval mode. A published
    AutoAWQ (GEMM) or GPTQ checkpoint loads into moekern's 4-bit modules (moekern.quantized_folders). Further keyword
    arguments go to transformers' from_pretrained (e.g. experts_implementation=)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekern.quantized_folders import is_quantized_folder, load_quantized_folder

    path = resolve_model_dir(source)
    if is_quantized_folder(path):
        model, tokenizer = load_quantized_folder(path, dtype=None if dtype == "auto" else dtype, device=device)
        folders.check_finite(model.state_dict().items(), f"weights of {str(path)!r}")
        return model, tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **from_pretrained,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise _load_error(path, exc) from exc
    except (OSError, RuntimeError, SafetensorError) as exc:  # what safetensors raises for a corrupt shard
        raise MoekernError(f"could not load {str(path)!r}: {exc}. Is a weight shard missing or corrupt?") from exc
    folders.check_finite(model.state_dict().items(), f"weights of {str(path)!r}")
    from moekern.models import FAMILIES
    from moekern.surgery import adopt

    if getattr(model.config, "model_type", None) in FAMILIES:
        adopt(model)  # DeepSeek-MoE's remote blocks become moekern's (the output is unchanged)
    return model.to(device).eval(), tokenizer


def _load_error(path: Path, exc: ValueError) -> MoekernError:
    if "trust_remote_code" in str(exc):
        return MoekernError(
            f"{str(path)!r} needs custom modeling code. moekern never runs remote code unless you pass "
            f"--trust-remote-code (trust_remote_code=True) and have read that code."
        )
    return MoekernError(f"could not load {str(path)!r}: {exc}")


def is_remote_code(obj) -> bool:
    """Whether a model or config class came from a checkpoint's own Python files (transformers' dynamic modules)."""
    return type(obj).__module__.startswith("transformers_modules")


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading compressed models
# ----------------------------------------------------------------------------------------------------------------------
WEIGHTS = "model.safetensors"


def save(model, path: str | Path, tokenizer=None, *, overwrite: bool = False, add_files=None) -> Path:
    """Write a (compressed) model to `path`: config.json with the decisions under the `moekern` key (and moekern's
    model_type where the result is not a standard architecture: moekern.architectures), the weights as safetensors in
    the family's hub layout (moekern.hub_layout; a remote-code family's own checkpoint layout, DeepSeek-MoE's), and
    the tokenizer if given.

    The output rule of moekern.folders holds: an existing `path` is replaced only if it is a moekern model and
    overwrite=True, never the model's own source folder; everything is written into a temporary folder beside
    `path` that takes its place at the end. add_files(folder) writes more files (a report) into that folder, so
    that they appear together with the checkpoint."""
    from safetensors.torch import save_file

    from moekern.config_on_disk import config_for_disk, name_for_disk
    from moekern.hub_layout import state_for_disk
    from moekern.models import Family, family_of
    from moekern.surgery import decisions

    decisions(model)  # a model saved through moekern always carries its (possibly empty) decisions
    family = family_of(model)
    source = getattr(model.config, "_name_or_path", None)
    with folders.replaced_folder(path, folders.MODEL, overwrite=overwrite, sources=[source]) as tmp:
        name_for_disk(model, config_for_disk(model)).save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if is_remote_code(model):  # the checkpoint's own modeling files go with it
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, tmp)
        if type(family).to_disk is Family.to_disk:  # transformers' families: transformers' own hub layout
            save_file(state_for_disk(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:  # the family's checkpoint layout (DeepSeek-MoE: one tensor per expert and projection)
            save_file(family.to_disk(_unique_tensors(model)), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
    return Path(path).expanduser()


def _unique_tensors(model) -> dict:
    """The state dict with each storage once (a tied weight under its first name), contiguous."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def load(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a local model folder, compressed by moekern or not: (model, tokenizer or None), in eval mode.

    A folder without moekern decisions is loaded by transformers. Otherwise the architecture is built empty from
    config.json, the recorded decisions are replayed on it (removed MoE layers, kept experts, skip thresholds), and
    only then are the weights read (safetensors) into it. dtype None keeps the checkpoint's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekern import hub_layout, surgery
    from moekern.config_on_disk import base_config
    from moekern.hf_configs import register_configs
    from moekern.models import Family, family_of
    from moekern.schema import validate_decisions

    path = resolve_model_dir(path)
    raw = json.loads((path / "config.json").read_text())
    if not isinstance(raw, dict) or surgery.KEY not in raw:
        return load_pretrained(path, dtype or "auto", device, trust_remote_code)
    validate_decisions(raw[surgery.KEY], raw, where=str(path / "config.json"))
    register_configs()  # AutoConfig reads moekern_* model types
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise _load_error(path, exc) from exc
    config = base_config(config)  # a moekern_* folder builds its family's class
    state = read_weights(path)
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    if is_remote_code(config):
        # remote code builds its buffers in its own way (DeepSeek-MoE's rotary embedding): only the parameters go on
        # the meta device, the buffers are computed as the model's code computes them
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    family = family_of(model)
    surgery.adopt(model)
    if type(family).from_disk is Family.from_disk:
        state = hub_layout.state_from_disk(model, state)
    else:
        state = family.from_disk(state)
    d = getattr(config, surgery.KEY, None)
    if d:
        replay(model, d, state)
    fill_tied_weights(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise MoekernError(
            f"{str(path)!r} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}. The checkpoint is corrupt or from another model."
        )
    model.tie_weights()
    model = model.to(dtype=dtype)
    materialise_buffers(model, config)  # after the cast: the rotary inv_freq stays fp32, as transformers keeps it
    model = model.to(device=device).eval()
    return model, load_tokenizer(path, trust_remote_code)


def replay(model, d: dict, state: dict) -> None:
    """Apply recorded decisions to a freshly built (meta) model whose config already has the blocks removed."""
    from moekern import surgery

    layers = d["original_num_hidden_layers"]
    fresh = {**d, "dropped_moe_layers": [], "kept_experts": [None] * layers, "skip_beta": [None] * layers}
    setattr(model.config, surgery.KEY, fresh)  # the replay below records each decision again
    surgery.remove_moe_layers(model, d["dropped_moe_layers"])
    for current, original in enumerate(surgery.original_layer_ids(model)):
        kept = d["kept_experts"][original]
        if kept is not None:
            block = surgery.moe_block(model, original)
            on_disk = _stored_experts(state, current)
            if block.kept_experts.numel() == len(kept) and len(kept) < d["original_num_experts"]:
                # the config already has the smaller count (a uniform drop): the rows are the kept experts
                block.set_kept_experts(torch.tensor(kept))
                alive = torch.zeros_like(block.alive)
                alive[kept] = True
                block.alive = alive
                surgery.decisions(model)["kept_experts"][original] = kept
            else:
                surgery.drop_experts(model, {original: kept}, mask_only=on_disk != len(kept))
        if d["skip_beta"][original] is not None:
            surgery.set_skip_beta(model, {original: d["skip_beta"][original]})
    if d.get("quant"):  # the 4-bit modules, rebuilt from the names and shapes on disk, then assign-loaded
        rebuild_quantized(model, state)
    if d.get("lora_experts"):  # LoRA adapters kept beside 4-bit experts by moekern finetune
        rebuild_expert_adapters(model, d["lora_experts"], state)


def _stored_experts(state: dict, current_layer: int) -> int:
    for name, tensor in state.items():
        if f"layers.{current_layer}.mlp.experts.gate_up_proj" in name and tensor.dim() == 3:
            return tensor.shape[0]
    raise MoekernError(f"the checkpoint has no experts for layer {current_layer}; it is corrupt")


# The 4-bit modules of a saved quantized model, rebuilt on the freshly built (meta) model from the names and shapes of
# its state dict, so that load_state_dict(assign=True) can fill them.
def _buffers_under(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {
        name[len(prefix) :]: torch.empty_like(tensor, device="meta")
        for name, tensor in state.items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    }


def rebuild_quantized(model, state: dict) -> int:
    """Swap in QuantizedExperts / QuantizedLinear wherever the state holds 4-bit tensors; returns how many."""
    from torch import nn

    from moekern import targets
    from moekern.models.base import expert_activation
    from moekern.modules.quant import QuantizedExperts, QuantizedLinear

    count = 0
    for path, module in list(model.named_modules()):
        if not path:
            continue
        if f"{path}.gate_up_proj_qweight" in state and hasattr(module, "gate_up_proj"):
            buffers = _buffers_under(state, f"{path}.")
            targets.set_module(model, path, QuantizedExperts(buffers, expert_activation(module)))
            count += 1
        elif f"{path}.qweight" in state and isinstance(module, nn.Linear):
            targets.set_module(model, path, QuantizedLinear(_buffers_under(state, f"{path}.")))
            count += 1
    return count


def rebuild_expert_adapters(model, spec: dict, state: dict) -> int:
    """On a model being loaded (replay): an empty ExpertsLora wherever the state holds one, so that
    load_state_dict(assign=True) fills it. spec: config.moekern["lora_experts"] ({"r", "alpha"})."""
    from moekern.modules.lora import ATTR, PROJECTIONS, ExpertsLora

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
