"""Expert Trimming (He et al., Sec. 4): what a model can lose, chosen on calibration data.

    stats.py        one calibration pass recording what every trimming method needs
    expert_drop.py  Expert Drop (layer-wise, global)      depth_drop.py  Layer Drop and Block Drop
    enum_prune.py   enumeration expert pruning            skip.py        dynamic skipping (beta)
"""
