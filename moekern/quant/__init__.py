"""4-bit quantization (RTN, AWQ, GPTQ) and pruning (Wanda, SparseGPT) of MoE experts, calibrated one decoder layer
at a time, torchao-style:

    from moekern.quant import QuantConfig, quantize_, PruneConfig, prune_
    report = quantize_(model, QuantConfig(method="awq", group_size=128), calibration=ids)   # ids: LongTensor [n, L]
    report = prune_(model, PruneConfig(method="wanda", n=2, m=4), calibration=ids)

Both record their decision in moekern.surgery.decisions(model) ("quant": {method, bits, group_size}; "prune":
{method, sparsity or "n:m"}), so moekern.save / moekern.load round-trip the result.

    layout.py      moekern's own packed 4-bit layout (what the kernels read) and its reference dequantization
    formats.py     import / export of the AutoAWQ GEMM and GPTQ checkpoint layouts
    rtn.py         group-wise round to nearest (AutoAWQ's grid; AutoGPTQ's symmetric one)
    awq.py         activation-aware scale search and clipping  autoawq.py  AutoAWQ's MoE scheme (awq4:autoawq)
    gptq.py        Hessian-based error compensation            prune.py Wanda and SparseGPT masks
    hessian.py     H = 2/T X^T X and its dampened inverse (GPTQ, SparseGPT)
    calibrate.py   per-expert / per-linear inputs, streamed layer by layer (stream_layers + a tap in experts_forward)
    targets.py     which modules of a layer are compressed     ffn.py   one FFN or linear group by one method
    apply.py       quantize_ and prune_ over a model           rebuild.py  the 4-bit modules again at load time
    hub.py         whole AutoAWQ / GPTQ checkpoint folders of MoE models: load_quantized_folder, save_quantized_folder
"""

from importlib import import_module

# Imported on first use: moekern.modules.quant needs moekern.quant.layout, and moekern.quant.apply needs the modules.
_LAZY = {"QuantConfig": "config", "PruneConfig": "config", "quantize_": "apply", "prune_": "apply",
         "load_quantized_folder": "hub", "save_quantized_folder": "hub"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"moekern.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moekern.quant' has no attribute {name!r}")


__all__ = ["PruneConfig", "QuantConfig", "load_quantized_folder", "prune_", "quantize_", "save_quantized_folder"]
