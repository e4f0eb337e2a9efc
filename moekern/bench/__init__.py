"""The harness: end-to-end speed, memory and FLOPs (`moekern bench`), lm-eval and perplexity (`moekern eval`) and
the report that joins them (`moekern report`).

    presets.py    published shapes of MoE models, built with random weights layer by layer (no download)
    variants.py   the baseline (transformers as it is) and the moekern variant (patch, then a recipe)
    speed.py      prefill a context, decode with the KV cache, per batch size; out-of-memory caught per size
    flops.py      FLOPs of one forward (torch.utils.flop_counter)
    bandwidth.py  the device's copy bandwidth and the bytes a decode step must read (the floor)
    records.py    JSON lines appended as they are measured
    report.py     markdown (Table 3 of the paper), JSON and plots from the runs' records
    cli.py        the bench, eval and report subcommands
"""
