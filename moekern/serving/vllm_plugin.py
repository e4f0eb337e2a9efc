"""moekern's vLLM plugin: the `vllm.general_plugins` entry point (pyproject.toml), which vLLM calls in each of its
processes. It registers the moekern model types with transformers' AutoConfig (vLLM reads config.json through it)
and the architectures of non-standard moekern checkpoints with vLLM's ModelRegistry, as lazy "module:Class"
references, so vLLM imports moekern.serving.vllm_models only when it builds such a model."""

SERVED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def register() -> None:
    from vllm import ModelRegistry

    from moekern.architectures import architecture, moekern_model_type, register_with_transformers

    register_with_transformers(models=False)
    supported = set(ModelRegistry.get_supported_archs())
    for base in SERVED:
        name = architecture(base)
        if name not in supported:
            ModelRegistry.register_model(name, f"moekern.serving.vllm_models:{name}")
    _detect_mla(moekern_model_type("deepseek_v2"), moekern_model_type("deepseek_v3"))


def _detect_mla(*model_types: str) -> None:
    """vLLM decides by model_type whether a model uses DeepSeek's latent attention (MLA) and its KV cache layout;
    the moekern DeepSeek types use it exactly where their family does (a kv_lora_rank)."""
    from vllm.transformers_utils import model_arch_config_convertor as convertors

    class MoekernDeepseekConvertor(convertors.ModelArchConfigConvertorBase):
        def is_deepseek_mla(self) -> bool:
            return getattr(self.hf_text_config, "kv_lora_rank", None) is not None

    for model_type in model_types:
        convertors.MODEL_ARCH_CONFIG_CONVERTORS.setdefault(model_type, MoekernDeepseekConvertor)
