"""GPT-OSS: router with a bias, top-k on the logits then a softmax over the k; experts stored (in, out) with gate and
up interleaved, biases, and a clamped SwiGLU. Its MoE block returns (hidden, router_scores)."""

import torch.nn.functional as F

from moekern.models.base import Family
from moekern.ops.reference import RouterSpec


class GptOss(Family):
    def router_spec(self, config) -> RouterSpec:
        return RouterSpec("topk_softmax", config.num_experts_per_tok)

    def router_logits(self, router, x):
        return F.linear(x, router.weight, router.bias)


GPT_OSS = GptOss("gpt_oss", ("gpt_oss",), "num_local_experts", router_attr="router", returns_router_scores=True)
