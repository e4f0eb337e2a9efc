"""wanda=S, sparsegpt=S (or N:M): unstructured or N:M pruning of the experts' weights (moekern.compression.slimming)."""

import re
from dataclasses import dataclass

from moekern.compression.steps.base import SlimmingStep, number, quant_configs, register
from moekern.errors import MoekernError

NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}


@register
@dataclass(frozen=True)
class Prune(SlimmingStep):
    method: str  # wanda | sparsegpt
    sparsity: float | None = 0.5  # unstructured; None for N:M
    n: int | None = None
    m: int | None = None
    shared: bool = False  # ":shared": the shared experts are pruned too

    names = tuple(NAMES)
    rank = 20
    example = "sparsegpt=2:4:shared"
    syntax = "wanda=0.5[:shared], sparsegpt=2:4[:shared]"
    help = """\
    wanda=0.5, sparsegpt=0.5 unstructured pruning to that sparsity;  wanda=2:4, sparsegpt=4:8 for N:M sparsity
      ...:shared             prune the shared experts too (the paper's Table 5 and "w/" rows of Table 8)"""

    @classmethod
    def split_value(cls, rest, raw):
        # the value holds N:M, so ":shared" is only ever its last part
        shared = rest.endswith(":shared")
        return rest.removesuffix(":shared"), ["shared"] if shared else []

    @classmethod
    def parse(cls, name, value, options, raw):
        if value is None:
            raise MoekernError(f"recipe step {raw!r}: give a sparsity, e.g. {name}=0.5 or {name}=2:4")
        shared = options == ["shared"]
        nm = re.fullmatch(r"(\d+):(\d+)", value)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise MoekernError(f"recipe step {raw!r}: N:M sparsity needs 0 < N < M, e.g. 2:4")
            return cls(name, None, n, m, shared)
        if ":" in value:
            raise MoekernError(f"recipe step {raw!r}: {name} takes a sparsity (0.5) or N:M (2:4), then optionally "
                               f":shared")
        sparsity = number(value, raw, "a sparsity such as 0.5, or N:M such as 2:4")
        if not 0.0 < sparsity < 1.0:
            raise MoekernError(f"recipe step {raw!r}: sparsity must be between 0 and 1 (exclusive)")
        return cls(name, sparsity, shared=shared)

    def __str__(self):
        pattern = f"{self.n}:{self.m}" if self.n is not None else repr(self.sparsity)
        return f"{self.method}={pattern}" + (":shared" if self.shared else "")

    def config(self):
        _, prune_config = quant_configs(self)
        if self.n is not None:
            return prune_config(method=self.method, sparsity=None, n=self.n, m=self.m,
                                prune_shared_experts=self.shared)
        return prune_config(method=self.method, sparsity=self.sparsity, prune_shared_experts=self.shared)

    def apply(self, model, calibration, *, batch_size, device):
        from moekern.compression.slimming import prune_

        return prune_(model, self.config(), calibration=calibration, device=device, batch_size=batch_size)

    def label(self, shape):
        return f"w/ {NAMES[self.method]} " + (f"{self.n}:{self.m}" if self.n else f"{self.sparsity:.0%}")
