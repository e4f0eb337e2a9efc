"""DeepSeek-V2 and DeepSeek-V3: router in fp32, group-limited top-k, routed scaling, shared experts, and the first
first_k_dense_replace layers dense.

V2: softmax; greedy or group-limited ("group_limited_greedy", a group scored by its best expert); no renormalisation.
V3: sigmoid; experts chosen on score + e_score_correction_bias within the topk_group groups whose best two scores sum
highest; weights from the unbiased scores, renormalised with norm_topk_prob.
"""

import torch.nn.functional as F

from moekern.models.base import Family
from moekern.ops.reference import RouterSpec


class DeepSeek(Family):
    def router_logits(self, router, x):
        return F.linear(x.float(), router.weight.float())

    def shared_output(self, block, x):
        return block.shared_experts(x)

    def is_moe_layer(self, config, index: int) -> bool:
        return index >= (config.first_k_dense_replace or 0)

    def keep_dense_fields(self, config, kept_layers: list[int]) -> None:
        # Dense layers are a prefix; it shrinks by the dense layers that were removed.
        config.first_k_dense_replace = sum(1 for old in kept_layers if not self.is_moe_layer(config, old))


class DeepSeekV2(DeepSeek):
    def router_spec(self, config) -> RouterSpec:
        grouped = config.topk_method == "group_limited_greedy"
        return RouterSpec(
            "softmax",
            config.num_experts_per_tok,
            scaling=config.routed_scaling_factor,
            n_group=config.n_group if grouped else 1,
            topk_group=config.topk_group if grouped else 1,
            group_score="max",
        )


class DeepSeekV3(DeepSeek):
    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            "sigmoid",
            config.num_experts_per_tok,
            renormalize=bool(config.norm_topk_prob),
            scaling=config.routed_scaling_factor,
            n_group=config.n_group,
            topk_group=config.topk_group,
            group_score="top2_sum",
        )

    def correction_bias(self, router):
        return router.e_score_correction_bias


DEEPSEEK_V2 = DeepSeekV2("deepseek_v2", ("deepseek_v2",), "n_routed_experts")
DEEPSEEK_V3 = DeepSeekV3("deepseek_v3", ("deepseek_v3",), "n_routed_experts")
