"""The names of checkpoints only moekern can read, and their registration with transformers' Auto classes.

A compressed model whose structure transformers' own class cannot hold (a different expert count per layer, masked
experts, layers without their MoE, per-token skipping, moekern's 4-bit experts) is saved with its own `model_type`
and architecture, so that no tool loads it silently wrong:

    mixtral -> moekern_mixtral, MoekernMixtralForCausalLM     (likewise for every family moekern knows)

A standard result (Block Drop, the same Expert Drop count in every layer of a router without expert groups) keeps
its family's names and stays a plain hub checkpoint.

`import moekern` registers these names with transformers' AutoConfig and AutoModelForCausalLM, without importing
transformers: if transformers' Auto modules are loaded already, at once; otherwise right after Python imports them
(a post-import hook that waits until no transformers module is mid-import, and removes itself once both Auto modules
know the names). Then `AutoModelForCausalLM.from_pretrained`
of such a folder returns what `moekern.load` returns. Without moekern, transformers refuses the unknown model_type.
The vLLM plugin (moekern.serving.vllm_plugin) registers the same architecture names with vLLM.
"""

import importlib.abc
import sys
import warnings

PREFIX = "moekern_"
# The families moekern knows, by model_type, with the prefix of their transformers class names.
CLASS_STEMS = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
    "olmoe": "Olmoe",
    "deepseek_v2": "DeepseekV2",
    "deepseek_v3": "DeepseekV3",
    "gpt_oss": "GptOss",
}
CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODELING_MODULE = "transformers.models.auto.modeling_auto"


def moekern_model_type(base: str) -> str:
    return PREFIX + base


def architecture(base: str) -> str:
    """The architecture name of a non-standard checkpoint of family `base`, e.g. MoekernMixtralForCausalLM."""
    return f"Moekern{CLASS_STEMS[base]}ForCausalLM"


def base_model_type(model_type: str | None) -> str | None:
    """The family of a moekern model_type (moekern_mixtral -> mixtral); None for any other model_type."""
    if model_type and model_type.startswith(PREFIX) and model_type[len(PREFIX):] in CLASS_STEMS:
        return model_type[len(PREFIX):]
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Which saved models need the moekern names
# ----------------------------------------------------------------------------------------------------------------------
def standard_architecture(model, config) -> bool:
    """Whether `model`, saved with `config` (its on-disk config), is its family's plain architecture: no removed
    MoE, no skip, no module of moekern's own with tensors of its own (4-bit experts and linears, adapters), and
    every MoE layer stores exactly config's expert count, all alive."""
    from moekern.models import family_of
    from moekern.modules.moe import MoEBlock
    from moekern.surgery import decisions, decoder_layers, is_moe_block

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
    register_with_transformers()
    from moekern import hf_classes

    config.__class__ = hf_classes.CONFIGS[base]
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


# ----------------------------------------------------------------------------------------------------------------------
# Registration with transformers
# ----------------------------------------------------------------------------------------------------------------------
_registered = {"configs": False, "models": False}
_busy = []  # non-empty while registering: importing the config classes can import transformers' Auto modules again


def register_with_transformers(models: bool = True) -> None:
    """Register the moekern model types with AutoConfig and (models=True, or where transformers' Auto models are
    loaded anyway) AutoModelForCausalLM. Idempotent; a call made while one runs returns at once."""
    if _busy:
        return
    _busy.append(True)
    try:
        from moekern import hf_classes

        if not _registered["configs"]:
            from transformers.models.auto.configuration_auto import AutoConfig

            for config_class in hf_classes.CONFIGS.values():
                AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            _registered["configs"] = True
        if (models or MODELING_MODULE in sys.modules) and not _registered["models"]:
            from transformers.models.auto.modeling_auto import AutoModelForCausalLM

            for base, config_class in hf_classes.CONFIGS.items():
                AutoModelForCausalLM.register(config_class, hf_classes.MODELS[base], exist_ok=True)
            _registered["models"] = True
    finally:
        _busy.clear()


_importing = [0]  # how many transformers modules are being executed right now


def _register_what_is_loaded() -> None:
    if CONFIG_MODULE not in sys.modules:
        return
    try:
        register_with_transformers(models=False)  # the models too where modeling_auto is loaded
    except Exception as exc:  # never break the user's import of transformers
        warnings.warn(f"moekern could not register its model types with transformers: {exc!r}; moekern.load "
                      f"still reads moekern checkpoints", stacklevel=2)
    if all(_registered.values()):
        _remove_hook()


class _ThenRegister(importlib.abc.Loader):
    """Wraps the loader of a transformers module: runs it, then, once no transformers module is still being
    executed, registers (the config classes it imports need the modules that import them complete)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _importing[0] += 1
        try:
            self._loader.exec_module(module)
        finally:
            _importing[0] -= 1
        if not _importing[0]:
            _register_what_is_loaded()

    def __getattr__(self, name):  # get_source, get_filename, ... as the wrapped loader
        return getattr(self._loader, name)


class _AfterTransformersAuto(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for transformers' modules it asks the other finders and wraps the loader; it removes
    itself once the Auto classes know the moekern model types."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


_HOOK = _AfterTransformersAuto()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Called by `import moekern`: register now where transformers' Auto modules are loaded, else when they are."""
    _register_what_is_loaded()
    if not all(_registered.values()) and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
