"""vLLM model classes for moekern checkpoints that are not their family's standard architecture (a different expert
count per layer, masked experts, layers without their MoE, per-token skip), imported only inside vLLM's processes.

Each class is vLLM's own model class of the family (MixtralForCausalLM, ...) built with two substitutions in vLLM's
model module while it is constructed, so that attention, norms, embeddings, weight loading, tensor and pipeline
parallelism stay vLLM's:

- the family's MoE block class (MixtralMoE, Qwen2MoeSparseMoeBlock, ...) becomes a subclass that is built with the
  layer's own expert count and top-k (the count a layer stores, from moekern.serving.plan), or, for a layer whose MoE
  Layer Drop removed, a module that passes the residual on (its post-attention norm is replaced the same way);
- vLLM's FusedMoEFactory gets moekern's routing (plan.MoekernRouting as its custom routing function) in the layers
  where vLLM's own router would route differently (masked experts, skip, DeepSeek's groups after a drop).

Substituting a module's class while the model is built, instead of copying vLLM's model files, keeps every other line
of them vLLM's. The architectures are registered by moekern.serving.vllm_plugin.
"""

import contextlib
from dataclasses import dataclass

from torch import nn
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers import fused_moe
from vllm.model_executor.models import deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index

from moekern.architectures import architecture
from moekern.serving.plan import LayerPlan, MoekernRouting, layer_plans, stored_expert_counts


@dataclass(frozen=True)
class Family:
    module: object  # vLLM's model module of the family
    causal_lm: type  # vLLM's model class
    moe_block: str  # the MoE block class's name in `module`
    moe_attr: str  # the decoder layer's attribute that holds it
    count_field: str  # the config field of the number of routed experts
    # transformers' semantics of the family, where vLLM reads them from config fields transformers' config lacks
    defaults: tuple[tuple[str, object], ...] = ()


FAMILIES = {
    "mixtral": Family(mixtral, mixtral.MixtralForCausalLM, "MixtralMoE", "block_sparse_moe", "num_local_experts"),
    "qwen2_moe": Family(qwen2_moe, qwen2_moe.Qwen2MoeForCausalLM, "Qwen2MoeSparseMoeBlock", "mlp", "num_experts"),
    "qwen3_moe": Family(qwen3_moe, qwen3_moe.Qwen3MoeForCausalLM, "Qwen3MoeSparseMoeBlock", "mlp", "num_experts"),
    "olmoe": Family(olmoe, olmoe.OlmoeForCausalLM, "OlmoeMoE", "mlp", "num_experts"),
    "deepseek_v2": Family(deepseek_v2, deepseek_v2.DeepseekV2ForCausalLM, "DeepseekV2MoE", "mlp", "n_routed_experts"),
    "deepseek_v3": Family(deepseek_v2, deepseek_v2.DeepseekV3ForCausalLM, "DeepseekV2MoE", "mlp", "n_routed_experts",
                          (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"))),  # V3: always, in transformers
}


class PassResidual(nn.Module):
    """Stands in for the post-attention norm and the MoE of a layer whose MoE was removed: the norm returns the
    attention output and the residual untouched, the MoE returns its input, so the next layer's fused add-and-norm
    computes residual + attention output, exactly the layer without its MoE."""

    def forward(self, hidden_states, residual=None, *args, **kwargs):
        return hidden_states if residual is None else (hidden_states, residual)


class _Build:
    """The plans of the model being built, and the plan of the MoE block being built."""

    plans: dict[int, LayerPlan] = {}
    config = None
    block: LayerPlan | None = None
    routings: list = []


@contextlib.contextmanager
def _attributes(obj, **values):
    """Set attributes of `obj` (a config, a module) for the duration of the block."""
    saved = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def _moekern_block(family: Family) -> type:
    """A subclass of the family's MoE block built per layer from its plan (or a PassResidual where removed)."""
    base = getattr(family.module, family.moe_block)

    class MoekernMoE(base):
        def __new__(cls, *args, **kwargs):
            plan = _plan_of(kwargs)
            return PassResidual() if plan.removed else super().__new__(cls)

        def __init__(self, *args, **kwargs):
            plan = _plan_of(kwargs)
            count, top_k = len(plan.rows), plan.top_k
            if "num_experts" in kwargs:  # Mixtral, OLMoE: passed by the decoder layer
                kwargs.update(num_experts=count, top_k=top_k)
            config = _Build.config
            _Build.block = plan
            try:  # Qwen, DeepSeek: read from the config
                with _attributes(config, **{family.count_field: count, "num_experts_per_tok": top_k}):
                    super().__init__(*args, **kwargs)
            finally:
                _Build.block = None

    MoekernMoE.__name__ = MoekernMoE.__qualname__ = f"Moekern{base.__name__}"
    return MoekernMoE


def _plan_of(kwargs) -> LayerPlan:
    layer = extract_layer_index(kwargs["prefix"])
    plan = _Build.plans[layer]
    if not plan.moe:
        raise RuntimeError(f"vLLM builds a MoE block in layer {layer}, where the checkpoint's config has none")
    return plan


def _factory_with_moekern_routing(*args, **kwargs):
    """vLLM's FusedMoEFactory, with moekern's routing in the layers whose plan needs it."""
    plan = _Build.block
    if plan is not None and not plan.native_routing:
        routing = MoekernRouting(plan, _Build.config, correction_bias=kwargs.get("e_score_correction_bias"))
        kwargs.update(custom_routing_function=routing, use_grouped_topk=False, num_expert_group=None,
                      topk_group=None, e_score_correction_bias=None, scoring_func="softmax")
        if kwargs.get("routed_scaling_factor", 1.0) != 1.0:
            kwargs["apply_routed_scale_to_output"] = True  # the routing's weights are unscaled
        _Build.routings.append(routing)
    return fused_moe.FusedMoEFactory(*args, **kwargs)


def _plans_for(vllm_config) -> list[LayerPlan]:
    config = vllm_config.model_config.hf_text_config
    if (getattr(config, "moekern", None) or {}).get("quant"):
        raise ValueError(
            "this checkpoint holds moekern's own 4-bit experts, which vLLM cannot read. Export the 16-bit "
            "compressed model and quantize it for vLLM, or write a standard 4-bit model with "
            "moekern.quantized_folders.save_quantized_folder (AWQ/GPTQ) and serve that with plain vLLM on a GPU")
    if vllm_config.parallel_config.enable_eplb:
        raise ValueError("moekern checkpoints have a different expert count per layer: EPLB cannot balance them")
    return layer_plans(config, stored_expert_counts(vllm_config.model_config.model))


def _init(self, family: Family, *, vllm_config, prefix: str = ""):
    plans = _plans_for(vllm_config)
    for field, value in family.defaults:
        if getattr(vllm_config.model_config.hf_text_config, field, None) is None:
            setattr(vllm_config.model_config.hf_text_config, field, value)
    _Build.plans, _Build.config, _Build.routings = {p.layer: p for p in plans}, vllm_config.model_config.hf_text_config, []
    block = _moekern_block(family)
    try:
        with _attributes(family.module, **{family.moe_block: block, "FusedMoEFactory": _factory_with_moekern_routing}):
            family.causal_lm.__init__(self, vllm_config=vllm_config, prefix=prefix)
    finally:
        routings = _Build.routings
        _Build.plans, _Build.config, _Build.block, _Build.routings = {}, None, None, []
    for layer in self.model.layers:
        if isinstance(layer, PPMissingLayer):
            continue
        if isinstance(getattr(layer, family.moe_attr, None), PassResidual):
            layer.post_attention_layernorm = PassResidual()
    # the routing functions are held by vLLM's routers: keep them as modules so .to(device) moves their tables
    self.moekern_routing = nn.ModuleList(routings)


def _model_class(base: str) -> type:
    family = FAMILIES[base]

    def __init__(self, *, vllm_config, prefix: str = ""):
        _init(self, family, vllm_config=vllm_config, prefix=prefix)

    name = architecture(base)
    return type(name, (family.causal_lm,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


for _base in FAMILIES:
    globals()[architecture(_base)] = _model_class(_base)

__all__ = [architecture(base) for base in FAMILIES]
