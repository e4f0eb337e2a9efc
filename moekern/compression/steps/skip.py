"""skip, skip=qQ: dynamic skipping, per token, of a selected expert whose routing weight over the top weight is under
a per-layer beta (moekern.compression.trimming.skip)."""

from dataclasses import dataclass

from moekern.compression.steps.base import TrimmingStep, number, register
from moekern.errors import MoekernError


@register
@dataclass(frozen=True)
class Skip(TrimmingStep):
    quantile: float = 0.5

    names = ("skip",)
    once = True
    rank = 70
    example = "skip=q0.3"
    syntax = "skip or skip=q0.3"
    help = """\
    skip, skip=q0.3          dynamic skipping with beta the median (or the 0.3 quantile) weight ratio per layer"""

    @classmethod
    def parse(cls, name, value, options, raw):
        if options:
            raise MoekernError(f"recipe step {raw!r}: skip takes no option; write skip or skip=q0.3")
        if value is None:
            return cls()
        if not value.startswith("q"):
            raise MoekernError(f"recipe step {raw!r}: write skip=q<quantile>, e.g. skip=q0.3 (skip alone: median)")
        q = number(value[1:], raw, "a quantile between 0 and 1, e.g. skip=q0.3")
        if not 0.0 <= q <= 1.0:
            raise MoekernError(f"recipe step {raw!r}: the quantile must be between 0 and 1")
        return cls(q)

    def __str__(self):
        return "skip" if self.quantile == 0.5 else f"skip=q{self.quantile!r}"

    def check(self, model, worst, where):
        super().check(model, worst, where)
        if worst.top_k < 2:
            raise MoekernError(f"{where}: skipping needs top_k >= 2 (this model routes to {worst.top_k} expert)")

    def apply(self, model, stats, *, allow_fewer):
        from moekern.compression.trimming.skip import dynamic_skip

        return {"skip_beta": dynamic_skip(model, stats, self.quantile)}

    def label(self, shape):
        return "skip (beta " + ("median" if self.quantile == 0.5 else f"q{self.quantile}") + ")"
