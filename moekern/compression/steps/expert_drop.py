"""expert-drop=N: Expert Drop of N experts per MoE layer on average, by mean routing score
(moekern.compression.trimming.expert_drop)."""

from dataclasses import dataclass

from moekern.compression.steps.base import CountedStep, register
from moekern.errors import MoekernError


@register
@dataclass(frozen=True)
class ExpertDrop(CountedStep):
    n: int
    mode: str = "global"  # global | layerwise
    floor: bool = True  # False (":nofloor"): a layer may keep fewer than top_k experts, or none
    score: str = "softmax"  # softmax | topk (":topk")

    names = ("expert-drop",)
    options = ("global", "layerwise", "nofloor", "topk")
    exclusive = (frozenset({"global", "layerwise"}),)
    rank = 30
    example = "expert-drop=2:layerwise:topk"
    syntax = "expert-drop=N[:global|:layerwise][:nofloor][:topk]"
    help = """\
    expert-drop=N            Expert Drop of N experts per MoE layer on average, ":global" (default) or ":layerwise";
                             ":nofloor" lets a layer keep fewer than top_k experts, or none (Eq. 11 exactly: a layer
                             left without experts loses its MoE, as Layer Drop); ":topk" scores an expert by the mean
                             of its top-k routing weights (the authors' DeepSeek score) instead of its mean softmax"""

    @classmethod
    def from_count(cls, count, options):
        return cls(count, "layerwise" if "layerwise" in options else "global", floor="nofloor" not in options,
                   score="topk" if "topk" in options else "softmax")

    def __str__(self):
        return (f"expert-drop={self.n}" + ("" if self.mode == "global" else f":{self.mode}")
                + ("" if self.floor else ":nofloor") + ("" if self.score == "softmax" else f":{self.score}"))

    def check(self, model, worst, where):
        from moekern.compression.trimming.expert_drop import min_experts

        super().check(model, worst, where)
        experts, layerwise = worst.experts, self.mode == "layerwise"
        if not self.floor:
            # Eq. 11 without a floor: a layer may lose all its experts (and then its MoE), but not every layer
            total, drop = sum(experts), self.n * len(experts)
            if (min(experts) <= self.n) if layerwise else drop >= total:
                raise MoekernError(f"{where} would drop every expert of {'a' if layerwise else 'every'} "
                                   f"MoE layer (they have {experts} at worst); drop fewer, or use layer-drop")
            if layerwise:
                worst.experts = [e - self.n for e in experts]
            else:  # at worst the survivors sit in the fewest layers, one expert each: the strictest later checks
                worst.experts = [1] * -(-(total - drop) // max(experts))
            return
        floors = [min_experts(worst.top_k, e, worst.allow_fewer) for e in experts]
        room = [e - f for e, f in zip(experts, floors)]
        fits = (min(room) >= self.n) if layerwise else sum(room) >= self.n * len(experts)
        if not fits:
            raise MoekernError(
                f"{where}: the MoE layers have {experts} experts (at worst) and keep at least "
                f"{'top_k=' + str(worst.top_k) if not worst.allow_fewer else 1} each; drop fewer"
                + ("" if worst.allow_fewer else " or allow fewer experts than top_k (--allow-fewer-experts, or "
                   ":nofloor)"))
        worst.experts = [e - self.n for e in experts] if layerwise else floors

    def apply(self, model, stats, *, allow_fewer):
        from moekern.compression.trimming.expert_drop import expert_drop

        return {"kept_experts": expert_drop(model, stats, self.n, self.mode, allow_fewer, self.floor, self.score)}

    def label(self, shape):
        return f"E{self.n}/{shape.experts}" + (" layer-wise" if self.mode == "layerwise" else "")
