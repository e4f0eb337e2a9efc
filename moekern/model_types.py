"""The model types of checkpoints only moekern can read (moekern.architectures says which results need them and
registers them with transformers): names only, so that every layer can map a moekern_* model_type to its family."""

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
