"""The report sections and plots of the paper's extra artefacts, from the records of a `moekern paper` run alone
(moekern.bench.paper_extras makes them; moekern.bench.paper_report calls this):

    score_distribution.png   Fig. 11: each layer's expert importance scores (mean routing probability), normalised so
                             that 1 is an even share, and which global Expert Drop count removes each (every report)
    drop_accuracy.png        Figs. 3, 5, 6, 13-15: held-out accuracy and perplexity against the number dropped
    robustness.png           Fig. 9: similarities on fewer or more calibration blocks and on a second source, and the
                             share of drop decisions the two sources agree on
and the markdown of Tables 5-8.
"""

from pathlib import Path

from moekern.report.plots import pyplot, save
from moekern.report.tables import fmt
from moekern.eval.harness import HELDOUT_MC, HELDOUT_PPL

PNG = {"scores": "score_distribution.png", "sweeps": "drop_accuracy.png", "robustness": "robustness.png"}
METHODS = {"expert-drop": "Expert Drop (experts per layer)", "layer-drop": "Layer Drop (MoE layers)",
           "block-drop": "Block Drop (blocks)"}
VARIANTS = {"global": "global", "layerwise": "layer-wise", "oneshot": "one-shot", "iterative": "iterative"}
TABLE_TITLES = {"5": "Table 5: pruning the experts (Wanda, SparseGPT)",
                "6": "Table 6: 4-bit quantization, moekern's and as the paper ran it",
                "7": "Table 7: the order of slimming (AWQ) and trimming",
                "8": "Table 8: shared experts pruned or not"}


def build(records: list[dict]) -> dict:
    """The extra artefacts of one run's records."""
    sweeps, tables = {}, {}
    for r in records:
        if r["kind"] == "sweep":
            sweeps.setdefault(r["method"], []).append(r)
        elif r["kind"] == "table":
            tables.setdefault(r["table"], []).append(r)
    robustness = [r for r in records if r["kind"] == "robustness"]
    return {"sweeps": {m: sorted(v, key=lambda r: r["n"]) for m, v in sweeps.items()}, "tables": tables,
            "robustness": {"samples": [r for r in robustness if r["part"] == "samples"],
                           "sources": [r for r in robustness if r["part"] == "sources"],
                           "agreement": agreement(robustness)}}


def agreement(robustness: list[dict]) -> dict:
    """For two sources: per method and count, the share of the dropped modules (layers, blocks, or (layer, expert)
    pairs) that both sources drop."""
    sources = [r for r in robustness if r["part"] == "sources"]
    if len(sources) != 2:
        return {}
    a, b = (s["sweeps"] for s in sources)
    out = {}
    for method in ("layer_drop", "block_drop"):
        out[method] = {n: len(set(a[method][n]) & set(b[method].get(n, []))) / max(len(a[method][n]), 1)
                       for n in a[method]}
    out["expert_drop"] = {}
    for n, layers in a["expert_drop"].items():
        mine = {(i, e) for i, dropped in layers.items() for e in dropped}
        theirs = {(i, e) for i, dropped in b["expert_drop"].get(n, {}).items() for e in dropped}
        out["expert_drop"][n] = len(mine & theirs) / max(len(mine), 1)
    return out


# ----------------------------------------------------------------------------------------------------------------------
def markdown(content: dict, plots: dict) -> list[str]:
    extras, stats = content.get("extras") or {}, content.get("stats")
    lines = []
    if stats and "scores" in plots:
        lines += ["## Expert importance scores (Fig. 11)", "",
                  "Each expert's mean routing probability on the calibration data, times the number of experts (1 is "
                  "an even share), per layer; the colour says from which count global Expert Drop removes it.", "",
                  f"![score distribution]({plots['scores'].name})", ""]
    if extras.get("sweeps"):
        lines += ["## Accuracy against the number dropped (Figs. 3, 5, 6, 13-15)", "", *sweep_lines(content), ""]
        if "sweeps" in plots:
            lines += [f"![accuracy against the number dropped]({plots['sweeps'].name})", ""]
    if extras.get("robustness", {}).get("sources"):
        lines += ["## Robustness to the calibration data (Fig. 9)", "", *robustness_lines(content), ""]
        if "robustness" in plots:
            lines += [f"![robustness to the calibration data]({plots['robustness'].name})", ""]
    for table in sorted(extras.get("tables") or {}):
        lines += [f"## {TABLE_TITLES[table]}", "", *table_lines(content, table), ""]
    return lines


def _baseline(content: dict) -> dict:
    row = next((r for r in content["rows"] if r["row"] == 0), None) or {}
    return {HELDOUT_PPL: row.get("perplexity"), **(row.get("accuracy") or {})}


def _columns(content: dict) -> list[str]:
    return [HELDOUT_PPL, *content["tasks"]]


def _cells(results: dict, columns: list[str]) -> list[str]:
    return [fmt(results.get(t), ".2f") if t == HELDOUT_PPL else fmt(results.get(t) and 100 * results[t], ".1f")
            for t in columns]


def _labels(columns: list[str]) -> list[str]:
    from moekern.report.tables import TASK_LABELS

    return ["Held-out PPL" if t == HELDOUT_PPL else TASK_LABELS.get(t, t) for t in columns]


def sweep_lines(content: dict) -> list[str]:
    columns = _columns(content)
    lines = ["| Method | n | " + " | ".join(_labels(columns)) + " | what is gone |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for method, points in content["extras"]["sweeps"].items():
        for p in points:
            lines.append(f"| {method} | {p['n']} | " + " | ".join(_cells(p["results"], columns))
                         + f" | {_what_dropped(p['dropped'])} |")
    return lines


def _what_dropped(d: dict) -> str:
    if d.get("dropped_blocks"):
        return "blocks " + ", ".join(map(str, d["dropped_blocks"]))
    if d.get("dropped_moe_layers"):
        return "MoE layers " + ", ".join(map(str, d["dropped_moe_layers"]))
    kept = [len(k) for k in d.get("kept_experts") or [] if k is not None]
    return "experts kept per layer " + ", ".join(map(str, kept)) if kept else "-"


def robustness_lines(content: dict) -> list[str]:
    r = content["extras"]["robustness"]
    names = [s["source"] for s in r["sources"]]
    lines = [f"Sources: {' and '.join(f'`{n}`' for n in names)} ({r['sources'][0]['samples']} blocks of "
             f"{r['sources'][0]['seq_len']} tokens each); sample counts {', '.join(str(s['samples']) for s in r['samples'])}"
             f" blocks of the first. Agreement: the share of the modules one-shot dropping removes on the first "
             f"source that it also removes on the second.", "",
             "| n | Layer Drop | Block Drop | Expert Drop (global) |", "|---|---|---|---|"]
    agree = r["agreement"]
    counts = sorted({int(n) for m in agree.values() for n in m})
    for n in counts:
        cells = [fmt(agree.get(m, {}).get(str(n), agree.get(m, {}).get(n)), ".0%") for m in
                 ("layer_drop", "block_drop", "expert_drop")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def table_lines(content: dict, table: str) -> list[str]:
    from moekern.model_info import human_bytes

    rows = content["extras"]["tables"][table]
    if rows and rows[0].get("status") == "skipped":
        return [f"Not made: {rows[0]['note']}."]
    columns = _columns(content)
    base = _baseline(content)
    lines = ["| Method | Recipe | Order | Weights | " + " | ".join(_labels(columns)) + " | PPL vs baseline |",
             "|---|---|---|---|" + "---|" * len(columns) + "---|",
             "| Baseline (transformers) | - | - | — | " + " | ".join(_cells(base, columns)) + " | — |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | `{r['recipe']}` | {r['order']} | failed: {r.get('error')} |"
                         + " |" * len(columns) + " |")
            continue
        ppl, base_ppl = r["results"].get(HELDOUT_PPL), base.get(HELDOUT_PPL)
        change = fmt(ppl / base_ppl - 1 if ppl and base_ppl else None, "+.1%")
        lines.append(f"| {r['label']} | `{r['recipe']}` | {r['order']} | {human_bytes(r['size']['state_bytes'])} | "
                     + " | ".join(_cells(r["results"], columns)) + f" | {change} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
def plot(content: dict, out: Path) -> dict:
    plots = {}
    stats = content.get("stats")
    if stats and any(v.get("expert_scores") for v in stats["layers"].values()):
        plots["scores"] = plot_score_distribution(stats, out / PNG["scores"])
    extras = content.get("extras") or {}
    if extras.get("sweeps"):
        plots["sweeps"] = plot_sweeps(content, out / PNG["sweeps"])
    if extras.get("robustness", {}).get("sources"):
        plots["robustness"] = plot_robustness(extras["robustness"], out / PNG["robustness"])
    return plots


def plot_score_distribution(stats: dict, path: Path) -> Path:
    """Fig. 11: per layer, the normalised scores as dots coloured by the smallest global Expert Drop count that
    removes them (grey: none of the counts), with the pooled histogram beside."""
    plt = pyplot()

    layers = {int(i): v["expert_scores"] for i, v in stats["layers"].items() if v.get("expert_scores")}
    sweeps = (stats.get("sweeps") or {}).get("expert_drop") or {}
    first = {}
    for n in sorted(sweeps, key=int):
        for i, dropped in sweeps[n].items():
            for e in dropped:
                first.setdefault((int(i), e), int(n))
    top = max(first.values(), default=1)
    cmap = plt.get_cmap("viridis_r")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    pooled, colours = [], []
    for i, scores in sorted(layers.items()):
        alive = [s for s in scores]
        norm = [s * len(alive) for s in alive]
        for e, value in enumerate(norm):
            n = first.get((i, e))
            colour = "#999999" if n is None else cmap((n - 1) / max(top - 1, 1))
            left.scatter(i + (e - len(norm) / 2) * 0.04, value, color=colour, s=22, edgecolor="black", linewidth=0.3)
            pooled.append(value)
            colours.append(n)
    left.axhline(1.0, color="black", linestyle=":", linewidth=1)
    left.set(xlabel="layer", ylabel="normalised importance score (x number of experts)",
             title="Expert importance per layer (colour: dropped from this global count on)", xticks=sorted(layers))
    left.set_yscale("log")
    kept = [v for v, n in zip(pooled, colours) if n is None]
    groups = [[v for v, c in zip(pooled, colours) if c == n] for n in range(1, top + 1)]
    import numpy as np

    positive = [v for v in pooled if v > 0] or [1.0]
    bins = np.logspace(np.log10(min(positive)), np.log10(max(positive)), 21)
    right.hist([*groups, kept], bins=bins, stacked=True, orientation="horizontal",
               color=[cmap((n - 1) / max(top - 1, 1)) for n in range(1, top + 1)] + ["#999999"],
               label=[f"dropped at n={n}" for n in range(1, top + 1)] + ["kept"])
    right.set_yscale("log")
    right.set(xlabel="experts", title="All layers")
    right.legend(fontsize=7)
    fig.suptitle("Distribution of expert importance scores (Fig. 11)")
    fig.tight_layout()
    return save(fig, path)


def plot_sweeps(content: dict, path: Path) -> Path:
    plt = pyplot()

    sweeps = content["extras"]["sweeps"]
    tasks = list(content["tasks"])  # only what was run: a perplexity-only run (--tasks moekern_heldout_ppl) has one row
    base = _baseline(content)
    none = (sweeps.get("none") or [{}])[0].get("results", {})
    fig, axes = plt.subplots(1 + len(tasks), 3, figsize=(15, 3.6 * (1 + len(tasks))), squeeze=False)
    styles = {"global": "-", "oneshot": "-", "layerwise": ":", "iterative": "--"}
    for column, (prefix, title) in enumerate(METHODS.items()):
        for row, metric in enumerate([HELDOUT_PPL, *tasks]):
            ax = axes[row][column]
            for method, points in sweeps.items():
                if not method.startswith(prefix + ":"):
                    continue
                variant = method.split(":")[1]
                xs = [0] + [p["n"] for p in points]
                ys = [none.get(metric)] + [p["results"].get(metric) for p in points]
                ax.plot(xs, [y if y is None else (y if metric == HELDOUT_PPL else 100 * y) for y in ys],
                        styles.get(variant, "-"), marker="o", markersize=3, label=VARIANTS.get(variant, variant))
            if base.get(metric) is not None:
                value = base[metric] if metric == HELDOUT_PPL else 100 * base[metric]
                ax.axhline(value, color="grey", linestyle=":", linewidth=1, label="baseline")
            if metric == HELDOUT_MC:
                ax.axhline(25.0, color="red", linestyle=":", linewidth=1, label="random guess")
            if metric == HELDOUT_PPL:
                ax.set_yscale("log")
            ax.set(xlabel=f"dropped: {title.split('(')[1].rstrip(')')}",
                   ylabel="held-out perplexity" if metric == HELDOUT_PPL else f"{metric} accuracy (%)",
                   title=title if row == 0 else "")
            ax.legend(fontsize=7)
    fig.suptitle(f"{content['settings']['model']}: accuracy against the number dropped (Figs. 3, 5, 6, 13-15)")
    fig.tight_layout()
    return save(fig, path)


def plot_robustness(robustness: dict, path: Path) -> Path:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    # 1 - cosine on a log scale: the first layer's similarity is far below the others', which a linear axis flattens
    for record in robustness["samples"]:
        layers = record["layers"]
        ids = [int(i) for i in layers if "s_nm" in layers[i]]
        axes[0].plot(ids, [1 - layers[str(i)]["s_nm"] for i in ids], marker="o", markersize=3,
                     label=f"{record['samples']} blocks")
    axes[0].set(title="(a) Layer Drop's score by calibration size", xlabel="layer", ylabel="1 - S(NM)",
                yscale="log")
    axes[0].legend(fontsize=7)
    for record, colour in zip(robustness["sources"], ("tab:blue", "tab:orange")):
        layers = record["layers"]
        ids = [int(i) for i in layers]
        name = record["source"][:36]
        axes[1].plot(ids, [1 - layers[str(i)]["block_similarity"] for i in ids], "-", marker="o", markersize=3,
                     color=colour, label=f"{name}: block")
        moe = [i for i in ids if "s_nm" in layers[str(i)]]
        axes[1].plot(moe, [1 - layers[str(i)]["s_nm"] for i in moe], "--", marker="s", markersize=3, color=colour,
                     label=f"{name}: S(NM)")
    axes[1].set(title="(b) the scores on two calibration sources", xlabel="layer / block",
                ylabel="1 - cosine similarity", yscale="log")
    axes[1].legend(fontsize=7)
    for method, label in (("layer_drop", "Layer Drop"), ("block_drop", "Block Drop"), ("expert_drop", "Expert Drop")):
        values = robustness["agreement"].get(method) or {}
        counts = sorted(values, key=int)
        axes[2].plot([int(n) for n in counts], [100 * values[n] for n in counts], marker="o", markersize=3,
                     label=label)
    axes[2].set(title="(c) decisions shared by the two sources", xlabel="number dropped",
                ylabel="dropped on both (%)", ylim=(0, 105))
    axes[2].legend(fontsize=7)
    fig.suptitle("Robustness of the similarities and drop decisions to the calibration data (Fig. 9)")
    fig.tight_layout()
    return save(fig, path)
