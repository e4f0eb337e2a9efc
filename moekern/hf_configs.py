"""The transformers config classes of the moekern model types (moekern.model_types): each family's own config class
with model_type "moekern_<family>", nothing else added. Importing this module imports transformers' config classes,
so `import moekern` does not; moekern.hf_classes adds the model classes, whose from_pretrained is moekern.load.

    MoekernMixtralConfig            MixtralConfig with model_type "moekern_mixtral"
"""

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moekern.model_types import CLASS_STEMS, moekern_model_type

CONFIGS: dict[str, type] = {}
for _base, _stem in CLASS_STEMS.items():
    _config = type(f"Moekern{_stem}Config", (CONFIG_MAPPING[_base],),
                   {"model_type": moekern_model_type(_base), "__module__": __name__})
    globals()[_config.__name__] = CONFIGS[_base] = _config  # module attributes, so that pickle finds them

_registered = []


def register_configs() -> None:
    """Register the config classes with AutoConfig (idempotent), so that AutoConfig reads a moekern_* config.json."""
    if _registered:
        return
    from transformers.models.auto.configuration_auto import AutoConfig

    for config_class in CONFIGS.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    _registered.append(True)
