"""layer-drop=N and block-drop=N: remove the N MoE layers (post-attention Norm+MoE) or the N decoder layers whose
input and output are most alike on the calibration data (moekern.compression.trimming.depth_drop)."""

from dataclasses import dataclass

from moekern.compression.steps.base import CountedStep, register
from moekern.errors import MoekernError


class DepthDrop(CountedStep):
    options = ("oneshot", "iterative")
    exclusive = (frozenset(options),)

    @classmethod
    def from_count(cls, count, options):
        return cls(count, "iterative" in options)

    def __str__(self):
        return f"{self.names[0]}={self.n}" + (":iterative" if self.iterative else "")


@register
@dataclass(frozen=True)
class LayerDrop(DepthDrop):
    n: int
    iterative: bool = False

    names = ("layer-drop",)
    rank = 40
    example = "layer-drop=2:iterative"
    syntax = "layer-drop=N[:iterative]"
    help = """\
    layer-drop=N             Layer Drop of N MoE layers, ":oneshot" (default) or ":iterative\""""

    def check(self, model, worst, where):
        if self.n > len(worst.experts):
            raise MoekernError(f"{where}: only {len(worst.experts)} MoE layers (at worst) are left to drop; drop fewer")
        worst.experts = worst.experts[: len(worst.experts) - self.n]

    def apply(self, model, stats, *, allow_fewer):
        from moekern.compression.trimming.depth_drop import layer_drop

        return {"dropped_moe_layers": layer_drop(model, stats, self.n, self.iterative)}

    def label(self, shape):
        return f"L{self.n}/{shape.moe_layers}" + (" iterative" if self.iterative else "")


@register
@dataclass(frozen=True)
class BlockDrop(DepthDrop):
    n: int
    iterative: bool = False

    names = ("block-drop",)
    rank = 50
    example = "block-drop=1"
    syntax = "block-drop=N[:iterative]"
    help = """\
    block-drop=N             Block Drop of N decoder layers, ":oneshot" (default) or ":iterative\""""

    def check(self, model, worst, where):
        if self.n >= worst.blocks:
            raise MoekernError(f"{where} would leave no decoder layer (the model has {worst.blocks}); drop fewer")
        worst.blocks -= self.n
        worst.experts = worst.experts[: max(0, len(worst.experts) - self.n)]

    def apply(self, model, stats, *, allow_fewer):
        from moekern.compression.trimming.depth_drop import block_drop

        return {"dropped_blocks": block_drop(model, stats, self.n, self.iterative)}

    def label(self, shape):
        return f"B{self.n}/{shape.layers}" + (" iterative" if self.iterative else "")
