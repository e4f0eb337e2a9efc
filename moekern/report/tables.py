"""Markdown tables and their cells."""

TASK_LABELS = {"arc_challenge": "ARC-C", "boolq": "BoolQ", "hellaswag": "HellaSwag", "mmlu": "MMLU",
               "openbookqa": "OBQA", "piqa": "PIQA", "rte": "RTE", "winogrande": "WinoGrande",
               "moekern_heldout_mc": "Heldout-MC", "moekern_heldout_ppl": "Heldout PPL"}
MISSING = "—"


def fmt(value, spec: str, suffix: str = "") -> str:
    """A number by a format spec, or a dash where there is none."""
    return MISSING if value is None else f"{value:{spec}}{suffix}"


def flops_text(flops) -> str:
    if flops is None:
        return MISSING
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= size:
            return f"{flops / size:.2f}{unit}"
    return str(flops)


def header(columns) -> list[str]:
    """A markdown table's first two lines."""
    columns = list(columns)
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
