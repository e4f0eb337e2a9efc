"""Qwen2-MoE and Qwen3-MoE: softmax, top-k, renormalised only with norm_topk_prob; dense layers chosen by
mlp_only_layers / decoder_sparse_step. Qwen2-MoE adds a shared expert behind a sigmoid gate."""

import torch

from moekern.models.base import Family
from moekern.ops.reference import RouterSpec


class QwenMoe(Family):
    def router_spec(self, config) -> RouterSpec:
        return RouterSpec("softmax", config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))

    def is_moe_layer(self, config, index: int) -> bool:
        return (
            index not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (index + 1) % config.decoder_sparse_step == 0
        )

    def keep_dense_fields(self, config, kept_layers: list[int]) -> None:
        # decoder_sparse_step is a pattern over layer indices that removal breaks: list the dense layers instead.
        dense = [new for new, old in enumerate(kept_layers) if not self.is_moe_layer(config, old)]
        config.mlp_only_layers = dense
        config.decoder_sparse_step = 1


class Qwen2Moe(QwenMoe):
    def shared_output(self, block, x):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


QWEN2_MOE = Qwen2Moe("qwen2_moe", ("qwen2_moe",), "num_experts")
QWEN3_MOE = QwenMoe("qwen3_moe", ("qwen3_moe",), "num_experts")
