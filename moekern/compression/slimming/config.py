"""The plain configs of moekern's Expert Slimming (torchao-like: `quantize_(model, QuantConfig(...))`), and their
validation, so a bad option fails before any calibration runs."""

from dataclasses import dataclass
from typing import Literal

from moekern.errors import MoekernError
from moekern.formats import layout


@dataclass
class QuantConfig:
    """Group-wise asymmetric 4-bit weight quantization.

    method:     "rtn" (round to nearest, no calibration), "awq" (activation-aware scale search) or "gptq" (Hessian
                error compensation); AWQ and GPTQ need calibration ids.
    group_size: one (scale, zero) per `group_size` input channels and output channel; must divide every quantized
                width (hidden and intermediate sizes).
    act_order:  GPTQ only: process columns by decreasing Hessian diagonal. Groups stay the contiguous blocks of
                `group_size` input channels (static groups), so g_idx is k // group_size and the kernel layout holds.
    sym:        GPTQ only: AutoGPTQ's symmetric grid (zero point 8 in every group; rtn.group_params).
    scheme:     "moekern" (default): AWQ and GPTQ judge a routed expert's error by the routing weights its tokens
                gave it (ffn.py). "autoawq" (AWQ): AutoAWQ's MoE scheme, one scale for every expert's
                gate/up folded into the post-attention norm and judged on the whole MoE output (autoawq.py).
                "autogptq" (GPTQ): AutoGPTQ's defaults as He et al. ran them: act-order, the symmetric grid, and each
                expert's Hessian over its routed tokens without routing weights.
    quantize_attention:      also quantize the attention projections (off by default, as the paper quantizes experts).
    quantize_lm_head:        also quantize the lm_head, by RTN whatever the method (a decode step reads all of it; a
                             tied lm_head gets a 4-bit copy and the embedding stays 16-bit). Off by default.
    quantize_shared_experts: also quantize the always-active FFNs: shared experts and the MLPs of dense layers.
    The router and lm_head always stay 16-bit.
    """

    method: Literal["rtn", "awq", "gptq"] = "rtn"
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = False
    scheme: Literal["moekern", "autoawq", "autogptq"] = "moekern"
    quantize_attention: bool = False
    quantize_shared_experts: bool = True
    quantize_lm_head: bool = False

    def validate(self) -> None:
        if self.method not in ("rtn", "awq", "gptq"):
            raise MoekernError(f"unknown quantization method {self.method!r}; choose 'rtn', 'awq' or 'gptq'")
        schemes = {"awq": ("moekern", "autoawq"), "gptq": ("moekern", "autogptq"), "rtn": ("moekern",)}
        if self.scheme not in schemes[self.method]:
            raise MoekernError(f"scheme {self.scheme!r} does not apply to {self.method}; it takes "
                               f"{' or '.join(map(repr, schemes[self.method]))}")
        if self.sym and self.method != "gptq":
            raise MoekernError("sym is a GPTQ option (AutoGPTQ's symmetric grid); use method='gptq' or sym=False")
        if self.bits != 4:
            raise MoekernError(
                f"moekern quantizes to 4 bits only (its kernels read 4-bit nibbles), got bits={self.bits}"
            )
        if not layout.valid_group_size(self.group_size):
            raise MoekernError(f"group_size must be a positive multiple of {layout.PACK} ({layout.GROUP_SIZES_TEXT}), "
                               f"got {self.group_size!r}")
        if self.act_order and self.method != "gptq":
            raise MoekernError("act_order is a GPTQ option; use method='gptq' or act_order=False")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    @property
    def gptq_options(self) -> dict:
        """How GPTQ runs: act_order, sym, and whether a routed expert's Hessian weights its tokens by their routing
        weights (moekern) or not (AutoGPTQ)."""
        autogptq = self.scheme == "autogptq"
        return {"act_order": self.act_order or autogptq, "sym": self.sym or autogptq, "routing_weights": not autogptq}

    def record(self) -> dict:
        """What goes into decisions(model)["quant"] (the options only where they are not the default)."""
        found = {"method": self.method, "bits": self.bits, "group_size": self.group_size}
        if self.method == "gptq":
            found.update({k: True for k in ("act_order", "sym") if self.gptq_options[k]})
        if self.scheme != "moekern":
            found["scheme"] = self.scheme
        return found


@dataclass
class PruneConfig:
    """Pruning of expert weights.

    method:   "wanda" (|W| x input-channel norm) or "sparsegpt" (OBS with Hessian error compensation).
    sparsity: fraction of zeros in every output row (unstructured); ignored when n and m are given.
    n, m:     semi-structured N:M sparsity: at most n non-zeros in every m consecutive input weights (NVIDIA's
              definition; 2:4 and 4:8 are 50% sparse).
    prune_shared_experts: also prune shared experts (off: the paper finds them less compressible).
    """

    method: Literal["wanda", "sparsegpt"] = "wanda"
    sparsity: float | None = 0.5
    n: int | None = None
    m: int | None = None
    prune_shared_experts: bool = False

    def validate(self) -> None:
        if self.method not in ("wanda", "sparsegpt"):
            raise MoekernError(f"unknown pruning method {self.method!r}; choose 'wanda' or 'sparsegpt'")
        if (self.n is None) != (self.m is None):
            raise MoekernError("give both n and m for N:M sparsity (e.g. n=2, m=4), or neither")
        if self.n is not None:
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise MoekernError(f"N:M sparsity needs integers 0 < n < m, got {self.n}:{self.m}")
        elif self.sparsity is None or not 0.0 <= float(self.sparsity) < 1.0:
            raise MoekernError(f"sparsity must be in [0, 1), got {self.sparsity!r}")

    @property
    def structured(self) -> bool:
        return self.n is not None

    def record(self) -> dict:
        """What goes into decisions(model)["prune"]."""
        if self.structured:
            return {"method": self.method, "n:m": f"{self.n}:{self.m}"}
        return {"method": self.method, "sparsity": float(self.sparsity)}
