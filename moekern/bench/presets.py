"""Shapes of published MoE models, built with random weights so that speed and memory can be measured without a
download. Numbers are copied from each model's config.json on the Hugging Face hub (the model id in `source`).

Random weights route near uniformly (every expert about equally often), unlike trained models: a decode step then
touches about as many distinct experts as uniform routing predicts, which is what a trained model does at large
batch and more than it does at batch 1. The report says so.
"""

from moekern.bench.memory import is_out_of_memory  # (also where older callers look for it)
from moekern.errors import MoekernError

# name: (source, transformers config class, config fields, what differs from the published model)
PRESETS = {
    "mixtral-8x7b": dict(
        source="mistralai/Mixtral-8x7B-v0.1", config="MixtralConfig",
        fields=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                    tie_word_embeddings=False),
        differs=None),
    "deepseek-moe-16b": dict(
        source="deepseek-ai/deepseek-moe-16b-base", config="DeepseekV2Config",
        # DeepSeek-MoE-16B has no transformers-5 class (its own code is remote code). DeepSeek-V2 routing with greedy
        # top-k, no renormalisation and scaling 1.0 is its routing; 2 shared experts, first layer dense, same sizes.
        fields=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
                    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False),
        differs="approximated with DeepseekV2Config: the attention is DeepSeek-V2's latent attention (MLA, "
                "kv_lora_rank 512) instead of DeepSeek-MoE's plain multi-head attention (16 heads x 128), so the "
                "attention weights and the KV cache differ; experts, shared experts, routing and the dense first "
                "layer match"),
    "qwen1.5-moe-a2.7b": dict(
        source="Qwen/Qwen1.5-MoE-A2.7B", config="Qwen2MoeConfig",
        fields=dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                    shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                    decoder_sparse_step=1, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False),
        differs=None),
    "qwen3-30b-a3b": dict(
        source="Qwen/Qwen3-30B-A3B", config="Qwen3MoeConfig",
        fields=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                    max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                    tie_word_embeddings=False),
        differs=None),
    "olmoe-1b-7b": dict(
        source="allenai/OLMoE-1B-7B-0924", config="OlmoeConfig",
        fields=dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                    norm_topk_prob=False, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False),
        differs=None),
}
# A 4-bit variant of a preset is `moekern bench PRESET --recipe rtn4` (the preset, then moekern.compress(model,
# "rtn4") before measuring); no preset name of its own.


def preset_config(name: str, layers: int | None = None):
    """The transformers config of a preset; `layers` keeps only the first N decoder layers."""
    import transformers

    if name not in PRESETS:
        raise MoekernError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    fields = dict(spec["fields"])
    if layers is not None:
        if layers > fields["num_hidden_layers"]:
            raise MoekernError(f"--layers {layers}: {name} has only {fields['num_hidden_layers']} layers")
        fields["num_hidden_layers"] = layers
    return getattr(transformers, spec["config"])(**fields)


def build_preset(name: str, layers: int | None = None, dtype=None, device="cpu", seed: int = 0):
    """A preset with random weights, in eval mode. The model is laid out on the meta device and its parts are made
    real one decoder layer at a time, so a preset that does not fit fails at the first layer that does not fit
    (a MoekernError saying how far it got) instead of asking for all the memory at once."""
    import torch
    from transformers import AutoModelForCausalLM

    from moekern.checkpoint import materialise_buffers

    dtype = dtype or torch.bfloat16
    config = preset_config(name, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    decoder = model.get_decoder()
    parts = [("embeddings", decoder.embed_tokens)]
    parts += [(f"layer {i}", layer) for i, layer in enumerate(decoder.layers)]
    parts += [("final norm", decoder.norm), ("lm_head", model.lm_head)]
    for label, part in parts:
        try:
            part.to_empty(device=device)
            _randomise(part, generator)
        except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            raise MoekernError(f"preset {name} does not fit on {device}: out of memory at {label} of "
                               f"{config.num_hidden_layers} layers; use --layers N to shrink it") from exc
    materialise_buffers(model, config)
    model.to(device)  # the rotary buffers rebuilt on the CPU
    return model.eval()


def _randomise(module, generator) -> None:
    """HF-like initialisation: weights N(0, 0.02), norms 1, biases 0. Drawn on the CPU per tensor (a seeded generator
    gives the same model on every device) and copied, so the CPU copy is one tensor at a time."""
    import torch

    with torch.no_grad():
        _fill(module, generator)


def _fill(module, generator) -> None:
    import torch

    for name, p in module.named_parameters():
        if "norm" in name.rsplit(".", 1)[0].lower() or name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator))
        else:
            p.zero_()
    for name, b in module.named_buffers():
        if b.is_floating_point() and b.device.type != "meta":
            b.zero_()  # e.g. DeepSeek's score correction bias
