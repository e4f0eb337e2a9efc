"""config.json as moekern writes it and reads it back: the expert count of a uniformly trimmed model, the moekern_*
names of a result transformers' own class cannot hold (moekern.model_types), and the family's config again when
such a folder is read."""

import copy

from moekern.model_types import CLASS_STEMS, architecture, base_model_type
from moekern.models import family_of
from moekern.modules.moe import MoEBlock
from moekern.surgery import decisions, decoder_layers, is_moe_block


def config_for_disk(model):
    """A copy of the config as it goes to disk. Where every MoE layer kept the same number of experts (stored, not
    masked) and the router has no expert groups, the expert count becomes that number, so the checkpoint is a
    standard architecture for transformers."""
    config = copy.deepcopy(model.config)
    family = family_of(model)
    stored = {
        layer.mlp.experts.num_experts for layer in decoder_layers(model) if is_moe_block(layer.mlp)
    }
    masked = any(not bool(layer.mlp.alive.all()) for layer in decoder_layers(model)
                 if hasattr(layer.mlp, "alive") and not layer.mlp.compact())
    # Group-limited routing (DeepSeek) is defined over the original groups: fewer experts is not the same router.
    grouped = family.router_spec(config).n_group > 1
    count = stored.pop() if len(stored) == 1 and not masked and not grouped else decisions(model)["original_num_experts"]
    setattr(config, family.expert_count_field, count)
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Which saved models need the moekern names
# ----------------------------------------------------------------------------------------------------------------------
def standard_architecture(model, config) -> bool:
    """Whether `model`, saved with `config` (its on-disk config), is its family's plain architecture: no removed
    MoE, no skip, no module of moekern's own with tensors of its own (4-bit experts and linears, adapters), and
    every MoE layer stores exactly config's expert count, all alive."""
    d = decisions(model)
    if d["dropped_moe_layers"] or any(beta is not None for beta in d["skip_beta"]):
        return False
    for module in model.modules():
        own_tensors = next(module.parameters(recurse=False), None) is not None or \
            next(module.buffers(recurse=False), None) is not None
        if own_tensors and type(module).__module__.startswith("moekern.") and not isinstance(module, MoEBlock):
            return False
    count = getattr(config, family_of(model).expert_count_field)
    for layer in decoder_layers(model):
        mlp = layer.mlp
        if not is_moe_block(mlp):
            continue
        if mlp.experts.num_experts != count:
            return False
        if hasattr(mlp, "alive") and int(mlp.alive.sum()) != mlp.kept_experts.numel():  # masked experts
            return False
    return True


def name_for_disk(model, config):
    """`config` (a copy, as it goes to disk) renamed to the moekern model_type and architecture where the model is
    not a standard architecture (the config classes differ only in their model_type), else named by the model's
    class as save_pretrained names it."""
    base = config.model_type
    if base not in CLASS_STEMS or standard_architecture(model, config):
        config.architectures = [type(model).__name__]  # as save_pretrained writes it (vLLM picks its class by it)
        return config
    from moekern.hf_configs import CONFIGS

    config.__class__ = CONFIGS[base]
    vars(config).pop("model_type", None)  # a config read from JSON carries it per instance too
    config.architectures = [architecture(base)]
    return config


def base_config(config):
    """A config read from a moekern_* folder, as its family's config (the class that builds the model); any other
    config unchanged."""
    base = base_model_type(getattr(config, "model_type", None))
    if base is None:
        return config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config.__class__ = CONFIG_MAPPING[base]
    vars(config).pop("model_type", None)
    config.architectures = [f"{CLASS_STEMS[base]}ForCausalLM"]
    return config
