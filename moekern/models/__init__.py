"""One adapter per Hugging Face MoE family; `family_of(model_or_config)` finds it or says which ones exist."""

from moekern.errors import MoekernError
from moekern.model_types import base_model_type
from moekern.models.base import Family, expert_activation, expert_weights
from moekern.models.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from moekern.models.deepseek_moe import DEEPSEEK_MOE
from moekern.models.gpt_oss import GPT_OSS
from moekern.models.mixtral import MIXTRAL
from moekern.models.olmoe import OLMOE
from moekern.models.qwen_moe import QWEN2_MOE, QWEN3_MOE

FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS)
    for model_type in family.model_types
}


def family_of(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    model_type = base_model_type(model_type) or model_type  # a moekern_* checkpoint's config is its family's
    if model_type not in FAMILIES:
        raise MoekernError(
            f"moekern does not know the model type {model_type!r}. Known MoE families: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "expert_activation", "expert_weights", "family_of"]
