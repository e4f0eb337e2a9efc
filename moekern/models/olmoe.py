"""OLMoE: softmax, top-k, renormalised only with norm_topk_prob; every layer is MoE."""

from moekern.models.base import softmax_family

OLMOE = softmax_family("olmoe", ("olmoe",), "num_experts")
