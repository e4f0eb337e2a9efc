"""Tiny random models of every MoE family moekern knows, built from transformers configs (nothing downloaded).

HF initialises routers to zeros and weights with std 0.02, which makes routing ties and near-zero outputs; the
weights are re-drawn here so that routing is decided and every part of the block matters."""

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # DeepSeek's latent attention


def configs():
    return {
        "mixtral": MixtralConfig(**COMMON, intermediate_size=24, num_hidden_layers=3, num_local_experts=6,
                                 num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=36, num_hidden_layers=4, num_experts=6,
                                    num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1]),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=40, moe_intermediate_size=24,
                                    num_hidden_layers=4, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                                    decoder_sparse_step=2),
        "olmoe": OlmoeConfig(**COMMON, intermediate_size=24, num_hidden_layers=3, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=False),
        "deepseek_v2": DeepseekV2Config(**{**COMMON, **MLA}, intermediate_size=40, moe_intermediate_size=24,
                                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                        n_group=2, topk_group=1, routed_scaling_factor=2.5),
        "deepseek_v3": DeepseekV3Config(**{**COMMON, **MLA}, intermediate_size=40, moe_intermediate_size=24,
                                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=3,
                                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=1.5),
        "gpt_oss": GptOssConfig(**COMMON, head_dim=8, intermediate_size=24, num_hidden_layers=2,
                                num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"]),
    }


FAMILIES = list(configs())


def tiny_model(family: str, seed: int = 0, **overrides):
    config = configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return redraw_weights(model, 0.2)


def redraw_weights(model, matrix_std: float):
    """Matrices ~ N(0, matrix_std), norms ~ N(1, 0.1), other vectors and DeepSeek's correction bias ~ N(0, 0.1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, matrix_std)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
