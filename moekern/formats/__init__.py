"""The 4-bit weight formats: moekern's own layout (the one its kernels read) and the published AutoAWQ GEMM and GPTQ
layouts, converted to and from it. Tensors only: nothing here knows a model.

    layout.py       pack, unpack, dequantize; the group sizes the kernels take
    published.py    AutoAWQ GEMM and GPTQ tensors <-> moekern's layout, per linear and per stacked experts
    hub_config.py   a published folder's quantization_config, and one 4-bit linear of it read and checked
"""
