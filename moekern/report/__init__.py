"""What every moekern report is made of, shared by the report writers (moekern.compression.report beside a compressed
checkpoint, moekern.bench.report for bench and eval runs, moekern.bench.paper_report for `moekern paper`):

    tables.py  markdown tables and the cells in them (numbers, FLOPs, task names)
    speed.py   speed rows against the baseline, accuracy relative to it, what a model's decisions dropped
    plots.py   matplotlib, imported only when a plot is drawn: the Agg backend, saving, labelled scatter plots

The writers decide what a report says; these modules only how it is laid out. Nothing here imports matplotlib at
import time (it is an optional dependency: moekern[report])."""
