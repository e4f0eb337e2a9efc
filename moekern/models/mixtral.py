"""Mixtral: softmax in fp32, top-k, always renormalised; every layer is MoE; no shared expert."""

from moekern.models.base import softmax_family

MIXTRAL = softmax_family("mixtral", ("mixtral",), "num_local_experts", always_renormalize=True)
