"""rtn4, awq4, gptq4: 4-bit group-wise weight quantization of the experts (moekern.compression.slimming)."""

import re
from dataclasses import dataclass

from moekern.compression.steps.base import SlimmingStep, quant_configs, register
from moekern.errors import MoekernError

GROUP_SIZES = (128, 64, 32)
DEFAULT_GROUP = 128
# the options each method takes besides :g<group size>, :attn and :head (which every method takes)
FLAGS = {"rtn": (), "awq": ("autoawq",), "gptq": ("act", "sym", "autogptq")}


@register
@dataclass(frozen=True)
class Quantize(SlimmingStep):
    method: str  # rtn | awq | gptq
    bits: int = 4
    group_size: int = DEFAULT_GROUP
    act_order: bool = False  # gptq ":act"
    sym: bool = False  # gptq ":sym"
    scheme: str = "moekern"  # awq: "moekern" | "autoawq"
    attention: bool = False  # ":attn": the attention projections are quantized too
    lm_head: bool = False  # ":head": the lm_head too, by RTN

    rank = 10
    example = "gptq4:g64:act:attn"
    quantizes = True
    syntax = ("rtn4, awq4[:autoawq], gptq4[:act][:sym] or gptq4:autogptq (each optionally :g128/:g64/:g32, :attn "
              "and :head)")
    help = """\
    rtn4, awq4, gptq4        4-bit quantization, group size 128; ":g64" or ":g32" for smaller groups
      awq4:autoawq           AutoAWQ's MoE scheme (one scale for every expert's gate/up, folded into the
                             post-attention norm, judged on the whole MoE output;
                             moekern.compression.slimming.autoawq) instead of moekern's per-expert,
                             routing-weighted AWQ
      gptq4:act, gptq4:sym   act-order (columns by decreasing Hessian diagonal) and AutoGPTQ's symmetric grid
      gptq4:autogptq         AutoGPTQ's defaults as He et al. ran them: act-order, symmetric, and each expert's
                             Hessian without moekern's routing weights
      ...:attn               quantize the attention projections too (as llama.cpp's Q4_0 does): a decode step then
                             reads 4-bit attention as well; the paper, and the default, quantize the experts only
      ...:head               quantize the lm_head too, by RTN whatever the method (llama.cpp keeps its output
                             tensor in 6 bits): a decode step reads all of it; a tied lm_head gets a 4-bit copy"""

    @classmethod
    def accepts(cls, name):
        return re.fullmatch(r"(rtn|awq|gptq)\d*", name) is not None

    @classmethod
    def parse(cls, name, value, options, raw):
        method, bits = re.fullmatch(r"(rtn|awq|gptq)(\d*)", name).groups()
        if bits != "4":
            raise MoekernError(f"recipe step {raw!r}: moekern quantizes to 4 bits; write {method}4")
        if value is not None:
            raise MoekernError(f"recipe step {raw!r}: {method}4 takes no value; write {method}4 or {method}4:g64")
        group, flags = DEFAULT_GROUP, []
        for option in options:
            found = re.fullmatch(r"g(\d+)", option)
            if found:
                if int(found.group(1)) not in GROUP_SIZES:
                    raise MoekernError(f"recipe step {raw!r}: the group option is :g128, :g64 or :g32")
                group = int(found.group(1))
            elif option in FLAGS[method] or option in ("attn", "head"):
                flags.append(option)
            else:
                allowed = ", ".join(f":{o}" for o in ("g128", "g64", "g32", *FLAGS[method]))
                raise MoekernError(f"recipe step {raw!r}: {method}4 takes {allowed}, not :{option} (and :attn and "
                                   f":head, as every 4-bit step)")
        if "autogptq" in flags and len(set(flags) - {"attn", "head"}) > 1:
            raise MoekernError(f"recipe step {raw!r}: :autogptq already means act-order and the symmetric grid; "
                               f"write gptq4:autogptq")
        scheme = next((f for f in flags if f in ("autoawq", "autogptq")), "moekern")
        return cls(method, 4, group, act_order="act" in flags, sym="sym" in flags, scheme=scheme,
                   attention="attn" in flags, lm_head="head" in flags)

    def __str__(self):
        return (f"{self.method}{self.bits}" + ("" if self.group_size == DEFAULT_GROUP else f":g{self.group_size}")
                + (":act" if self.act_order else "") + (":sym" if self.sym else "")
                + ("" if self.scheme == "moekern" else f":{self.scheme}") + (":attn" if self.attention else "")
                + (":head" if self.lm_head else ""))

    @property
    def needs_calibration(self):
        return self.method != "rtn"

    def config(self):
        quant_config, _ = quant_configs(self)
        return quant_config(method=self.method, bits=self.bits, group_size=self.group_size, act_order=self.act_order,
                            sym=self.sym, scheme=self.scheme, quantize_attention=self.attention,
                            quantize_lm_head=self.lm_head)

    def check(self, model, worst, where):
        from moekern import surgery

        config = self.config()
        config.validate()
        if surgery.decisions(model).get("quant"):
            raise MoekernError(f"{where}: the model is already quantized; start from the 16-bit model")
        # moekern.compression.slimming's own width check (group size vs. the quantized widths), before any work
        from moekern.compression.slimming.apply import check_widths

        check_widths(model, config)

    def apply(self, model, calibration, *, batch_size, device):
        from moekern.compression.slimming import quantize_

        config = self.config()
        return quantize_(model, config, calibration=calibration if config.needs_calibration else None, device=device,
                         batch_size=batch_size)

    def label(self, shape):
        return (f"w/ {self.method.upper()}" + ("" if self.group_size == 128 else f" g{self.group_size}")
                + (" + attention" if self.attention else "") + (" + lm_head" if self.lm_head else ""))
