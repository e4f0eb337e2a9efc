"""4-bit quantization (RTN, AWQ, GPTQ) and pruning (Wanda, SparseGPT) of MoE experts, calibrated one decoder layer
at a time, torchao-style:

    from moekern import QuantConfig, quantize_, PruneConfig, prune_      # or from moekern.compression.slimming
    report = quantize_(model, QuantConfig(method="awq", group_size=128), calibration=ids)   # ids: LongTensor [n, L]
    report = prune_(model, PruneConfig(method="wanda", n=2, m=4), calibration=ids)

Both record their decision in moekern.surgery.decisions(model) ("quant": {method, bits, group_size}; "prune":
{method, sparsity or "n:m"}), so moekern.save / moekern.load round-trip the result.

The 4-bit layouts these methods write are moekern.formats; which modules of a layer they compress, moekern.targets.

    config.py      QuantConfig and PruneConfig, checked before any calibration runs
    rtn.py         group-wise round to nearest (AutoAWQ's grid; AutoGPTQ's symmetric one)
    awq.py         activation-aware scale search and clipping  autoawq.py  AutoAWQ's MoE scheme (awq4:autoawq)
    gptq.py        Hessian-based error compensation            prune.py Wanda and SparseGPT masks
    hessian.py     H = 2/T X^T X and its dampened inverse (GPTQ, SparseGPT)
    calibrate.py   per-expert / per-linear inputs, streamed layer by layer (stream_layers + a tap in experts_forward)
    linears.py     AWQ's input scale folded into a norm, a Linear replaced by its 4-bit module
    ffn.py         one FFN or linear group by one method   apply.py   quantize_ and prune_ over a model
"""

from importlib import import_module

# Imported on first use: apply.py imports the model classes.
_LAZY = {"QuantConfig": "config", "PruneConfig": "config", "quantize_": "apply", "prune_": "apply"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"moekern.compression.slimming.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moekern.compression.slimming' has no attribute {name!r}")


__all__ = list(_LAZY)
