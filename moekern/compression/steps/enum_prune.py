"""enum-prune=R: keep the R experts per MoE layer whose subset reconstructs the layer's output best (Lu et al.;
moekern.compression.trimming.enum_prune)."""

from dataclasses import dataclass

from moekern.compression.steps.base import CountedStep, register
from moekern.errors import MoekernError


@register
@dataclass(frozen=True)
class EnumPrune(CountedStep):
    keep: int
    all_tokens: bool = False  # ":all": every subset on every calibration token, Lu et al.'s loss

    names = ("enum-prune",)
    options = ("all",)
    rank = 60
    example = "enum-prune=4:all"
    syntax = "enum-prune=R[:all]"
    help = """\
    enum-prune=R             keep R experts per MoE layer by enumeration pruning (Lu et al.); ":all" enumerates every
                             subset on every calibration token with Lu et al.'s loss instead of a token sample"""

    @classmethod
    def from_count(cls, count, options):
        return cls(count, all_tokens="all" in options)

    def __str__(self):
        return f"enum-prune={self.keep}" + (":all" if self.all_tokens else "")

    def measure_options(self):
        # a token sample of each layer's MoE inputs and outputs, or (":all") every subset's loss during the pass
        return {"record_tokens": not self.all_tokens, "enumerate_keep": self.keep if self.all_tokens else 0}

    def check(self, model, worst, where):
        super().check(model, worst, where)
        if self.keep >= worst.original_experts:
            raise MoekernError(f"{where}: keep fewer than the {worst.original_experts} experts a layer has")
        if self.keep < worst.top_k and not worst.allow_fewer:
            raise MoekernError(f"{where}: keeping {self.keep} experts is fewer than top_k={worst.top_k}; keep more "
                               f"or allow it (--allow-fewer-experts)")
        if self.all_tokens:
            from moekern.compression.trimming.enum_prune import check_enumeration

            check_enumeration(worst.experts, self.keep, where)
        worst.experts = [min(e, self.keep) for e in worst.experts]

    def apply(self, model, stats, *, allow_fewer):
        from moekern.compression.trimming.enum_prune import enum_prune

        return {"enum_prune": enum_prune(model, stats, self.keep, allow_fewer)}

    def label(self, shape):
        return f"keep {self.keep}/{shape.experts} (enumeration)"
