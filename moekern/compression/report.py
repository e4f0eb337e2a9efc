"""The report of a compression, written beside its checkpoint:

    compress_report.md     the recipe, each step's decisions and time, sizes before and after
    compress_report.json   the same for machines, with the similarities and expert scores measured before trimming
    similarity.png         S^(M) and S^(NM) per MoE layer and block input/output similarity (paper, Fig. 4)
    block_matrix.png       cosine similarity between the hidden states after every two blocks (paper, Fig. 7), when
                           the statistics hold the block-wise matrix (trimming.stats.measure(block_tokens=N))
    dropped.png            mean expert scores, and which experts, MoE layers and blocks were dropped (Figs. 10, 12)

The plots need the statistics of a trimming step; a recipe with only slimming gets the markdown and JSON. The same
figure functions (plot_layer_similarity, plot_block_matrix, drop_sweeps and plot_drop_sweeps) serve moekern paper.
"""

import json
from pathlib import Path

import torch

from moekern.report.plots import pyplot, save

REPORT_MD, REPORT_JSON = "compress_report.md", "compress_report.json"
SIMILARITY_PNG, DROPPED_PNG, BLOCK_MATRIX_PNG = "similarity.png", "dropped.png", "block_matrix.png"


def model_size(model) -> dict:
    """model_info.describe's parameters (a packed 4-bit weight counts as the weights it holds) and weight bytes (the
    state dict, packed weights and scales included: the memory figure), with the layer counts a trimming report needs."""
    from moekern import surgery
    from moekern.model_info import describe

    facts = describe(model)
    return {
        "parameters": facts["parameters"],
        "expert_parameters": facts["expert_parameters"],
        "state_bytes": facts["weight_bytes"],
        "decoder_layers": len(surgery.decoder_layers(model)),
        "moe_layers": len(surgery.moe_layer_ids(model)),
    }


def report_data(result) -> dict:
    """Everything the report shows, JSON-ready."""
    from moekern import surgery

    d = surgery.decisions(result.model)
    return {
        "recipe": str(result.recipe),
        "order": result.order,
        "calibration_shape": list(result.calibration_shape) if result.calibration_shape else None,
        "steps": result.steps,
        "before": result.before,
        "after": result.after,
        "decisions": {k: d.get(k) for k in ("dropped_blocks", "dropped_moe_layers", "kept_experts", "skip_beta",
                                            "quant", "prune", "original_num_hidden_layers", "original_num_experts")},
        "stats_before_trimming": None if result.stats is None else stats_data(result.stats),
    }


def stats_data(stats) -> dict:
    """The figures of a TrimStats, JSON-ready: per layer the similarities and expert scores, and the block-wise
    similarity matrix (rows: the first block's input, then each block's output) where it was measured."""
    data = {"tokens_per_layer": stats.tokens, "layers": stats.summary()}
    if stats.block_matrix is not None:
        data["block_matrix"] = stats.block_matrix.tolist()
        data["block_matrix_tokens"] = stats.block_matrix_tokens
    return data


def write_report(result, out_dir: str | Path) -> list[Path]:
    """Write the report files into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_data(result)
    written = [out / REPORT_JSON, out / REPORT_MD]
    (out / REPORT_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / REPORT_MD).write_text(markdown(data))
    if result.stats is not None:
        written += plot(data, out)
    return written


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def markdown(data: dict) -> str:
    b, a = data["before"], data["after"]
    lines = [f"# Compression report: `{data['recipe']}` (order {data['order']})", ""]
    if data["calibration_shape"]:
        n, length = data["calibration_shape"]
        lines += [f"Calibration: {n} blocks of {length} tokens.", ""]
    lines += ["| | before | after | change |", "|---|---|---|---|"]
    for key, label in (("parameters", "parameters"), ("expert_parameters", "routed-expert parameters"),
                       ("state_bytes", "weights (state dict)"), ("decoder_layers", "decoder layers"),
                       ("moe_layers", "MoE layers")):
        fmt = _mb if key == "state_bytes" else (lambda v: f"{v:,}")
        change = f"{(a[key] - b[key]) / b[key]:+.1%}" if b[key] else ""
        lines.append(f"| {label} | {fmt(b[key])} | {fmt(a[key])} | {change} |")
    lines += ["", "## Steps", "", "| step | kind | seconds | decision |", "|---|---|---|---|"]
    for step in data["steps"]:
        decided = {k: v for k, v in step.items() if k not in ("step", "kind", "seconds", "report")}
        text = json.dumps(decided, default=str) if decided else "see the JSON report"
        lines.append(f"| `{step['step']}` | {step['kind']} | {step['seconds']} | {text} |")
    d = data["decisions"]
    kept = ", ".join(f"layer {i}: {k}" for i, k in enumerate(d["kept_experts"] or []) if k is not None)
    betas = ", ".join(f"layer {i}: {b:.3f}" for i, b in enumerate(d["skip_beta"] or []) if b is not None)
    lines += ["", "## Decisions (original numbering)", "",
              f"- dropped blocks: {d['dropped_blocks'] or '-'}",
              f"- dropped MoE layers: {d['dropped_moe_layers'] or '-'}",
              f"- kept experts: {kept or 'all'}",
              f"- skip beta: {betas or '-'}",
              f"- quantization: {d['quant'] or '-'}", ""]
    stats = data["stats_before_trimming"]
    if stats:
        lines += ["## Similarities before trimming", "",
                  f"Averaged over {stats['tokens_per_layer']:,} tokens per layer. S(M) = cos(MoE input, MoE output); "
                  "S(NM) = cos(x', x' + MoE(Norm(x'))); block = cos(block input, block output).", "",
                  "| layer | block | S(M) | S(NM) |", "|---|---|---|---|"]
        for i, s in stats["layers"].items():
            sm = f"{s['s_m']:.4f}" if "s_m" in s else "-"
            snm = f"{s['s_nm']:.4f}" if "s_nm" in s else "-"
            lines.append(f"| {i} | {s['block_similarity']:.4f} | {sm} | {snm} |")
        lines += ["", f"![similarity]({SIMILARITY_PNG})", ""]
        if "block_matrix" in stats:
            lines += [f"Block-wise similarity: mean cosine between the hidden states after every two blocks, over "
                      f"{stats['block_matrix_tokens']:,} calibration tokens (colours normalised to the smallest and "
                      f"largest off-diagonal value).", "", f"![block matrix]({BLOCK_MATRIX_PNG})", ""]
        lines += [f"![dropped]({DROPPED_PNG})", ""]
    return "\n".join(lines)


def plot_layer_similarity(layers: dict, path: Path, dropped_moe_layers=(), dropped_blocks=(), title: str = "") -> Path:
    """Fig. 4: S(M) and S(NM) per MoE layer (bars), and block input/output similarity; `layers` as in
    stats_data()["layers"]. Dropped MoE layers get a red edge, dropped blocks a red bar."""
    plt = pyplot()
    ids = [int(i) for i in layers]
    moe = [i for i in ids if "s_nm" in layers[str(i)]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.4
    left.bar([i - width / 2 for i in moe], [layers[str(i)]["s_m"] for i in moe], width, label="MoE: S(M)")
    bars = left.bar([i + width / 2 for i in moe], [layers[str(i)]["s_nm"] for i in moe], width, label="Norm+MoE: S(NM)")
    for i, bar in zip(moe, bars):
        if i in dropped_moe_layers:
            bar.set_edgecolor("red")
            bar.set_linewidth(2)
    left.set(title="Layer-wise similarity" + (" (red edge: MoE layer dropped)" if dropped_moe_layers else ""),
             xlabel="layer", ylabel="cosine similarity", xticks=moe)
    left.set_ylim(top=1.25)
    left.legend(loc="upper left", ncol=2)
    colors = ["tab:red" if i in dropped_blocks else "tab:blue" for i in ids]
    right.bar(ids, [layers[str(i)]["block_similarity"] for i in ids], color=colors)
    right.set(title="Block input/output similarity" + (" (red: block dropped)" if dropped_blocks else ""),
              xlabel="block", ylabel="cosine similarity",
              xticks=ids)
    if title:
        fig.suptitle(title)
    save(fig, path)
    return path


def plot_block_matrix(matrix, path: Path, layer_ids=None, tokens: int | None = None, title: str = "") -> Path:
    """Fig. 7: the block-wise similarity matrix (stats_data()["block_matrix"]: rows and columns are the first block's
    input, then each block's output), drawn for the blocks' outputs: raw cosines written in the cells, colours
    normalised to the smallest and largest off-diagonal value, as the paper normalises its figure."""
    plt = pyplot()
    full = torch.as_tensor(matrix, dtype=torch.float64)
    outputs = full[1:, 1:]
    size = outputs.shape[0]
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(size))
    off = outputs[~torch.eye(size, dtype=torch.bool)]
    low, high = (float(off.min()), float(off.max())) if off.numel() else (0.0, 1.0)
    normalised = ((outputs - low) / max(high - low, 1e-12)).clamp(0, 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * size, 0.6 + 0.5 * size))
    image = ax.imshow(normalised.numpy(), cmap="viridis", vmin=0, vmax=1)
    if size <= 16:
        for a in range(size):
            for b in range(size):
                ax.text(b, a, f"{float(outputs[a, b]):.2f}", ha="center", va="center", fontsize=7,
                        color="white" if normalised[a, b] < 0.5 else "black")
    ax.set_xticks(range(size), layer_ids)
    ax.set_yticks(range(size), layer_ids)
    fig.colorbar(image, ax=ax, label=f"normalised cosine ({low:.2f} .. {high:.2f})")
    where = f", {tokens:,} tokens" if tokens else ""
    ax.set(xlabel="after block", ylabel="after block",
           title=title or f"Normalised block-wise similarity{where}")
    save(fig, path)
    return path


def drop_sweeps(stats, top_k: int, allow_fewer: bool = False) -> dict:
    """Figs. 10 and 12 from one set of statistics: what one-shot Layer Drop and Block Drop remove for every count n,
    and which experts global Expert Drop removes for every n per layer (original numbering; the same choice
    functions the methods use, so a recipe with that count on these statistics drops exactly these)."""
    from moekern.compression.trimming.depth_drop import block_scores, layer_scores, most_similar
    from moekern.compression.trimming.expert_drop import choose_kept_experts
    from moekern.errors import MoekernError

    moe = stats.moe_layers()
    sweeps = {
        "layer_drop": {n: most_similar(layer_scores(stats), n) for n in range(1, len(moe) + 1)},
        "block_drop": {n: most_similar(block_scores(stats), n) for n in range(1, len(stats.layers))},
        "expert_drop": {},
    }
    for n in range(1, max((int(stats.layers[i].alive.sum()) for i in moe), default=0)):
        try:
            kept = choose_kept_experts(stats, n, "global", top_k, allow_fewer)
        except MoekernError:
            break  # more than the layers can lose
        sweeps["expert_drop"][n] = {i: [e for e in stats.layers[i].alive.nonzero().flatten().tolist()
                                        if e not in kept[i]] for i in moe}
    return sweeps


def plot_drop_sweeps(sweeps: dict, num_layers: int, num_experts: int, path: Path, title: str = "") -> Path:
    """Fig. 10 (Layer Drop and Block Drop: kept in yellow, dropped in red, per count) and Fig. 12 (global Expert
    Drop: each expert coloured by the smallest count per layer that drops it, yellow to blue; grey: never)."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    def grid(chosen: dict) -> torch.Tensor:
        counts = sorted(int(n) for n in chosen)
        out = torch.zeros(len(counts), num_layers)
        for row, n in enumerate(counts):
            for i in chosen[n] if n in chosen else chosen[str(n)]:
                out[row, int(i)] = 1
        return out

    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.5, 0.3 * num_layers + 2)))
    yellow_red = ListedColormap(["#f2d94e", "#c0392b"])
    for ax, key, what in ((axes[0], "layer_drop", "Layer Drop"), (axes[1], "block_drop", "Block Drop")):
        chosen = sweeps[key]
        if not chosen:
            ax.axis("off")
            continue
        counts = sorted(int(n) for n in chosen)
        ax.imshow(grid(chosen).numpy(), aspect="auto", cmap=yellow_red, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(counts)), counts)
        ax.set_xticks(range(num_layers))
        ax.set(title=f"{what}: dropped (red) per count", xlabel="layer", ylabel="layers/blocks dropped")
    experts = sweeps["expert_drop"]
    first = torch.full((num_layers, num_experts), float("nan"))
    for n in sorted(int(k) for k in experts):
        for i, dropped in (experts[n] if n in experts else experts[str(n)]).items():
            for e in dropped:
                if torch.isnan(first[int(i), e]):
                    first[int(i), e] = n
    axes[2].set_facecolor("#bbbbbb")
    if experts:
        image = axes[2].imshow(first.numpy(), aspect="auto", cmap="viridis_r", interpolation="nearest")
        fig.colorbar(image, ax=axes[2], label="dropped from n experts per layer (global)")
    axes[2].set(title="Expert Drop (global): when each expert goes", xlabel="expert", ylabel="layer")
    axes[2].set_xticks(range(num_experts))
    axes[2].set_yticks(range(num_layers))
    if title:
        fig.suptitle(title)
    save(fig, path)
    return path


def plot(data: dict, out: Path) -> list[Path]:
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    stats = data["stats_before_trimming"]
    layers = stats["layers"]
    d = data["decisions"]
    written = [plot_layer_similarity(layers, out / SIMILARITY_PNG, d["dropped_moe_layers"], d["dropped_blocks"])]
    if "block_matrix" in stats:
        written.append(plot_block_matrix(stats["block_matrix"], out / BLOCK_MATRIX_PNG, [int(i) for i in layers],
                                         stats["block_matrix_tokens"]))

    experts = d["original_num_experts"]
    total = d["original_num_hidden_layers"]
    scores = torch.full((total, experts), float("nan"))
    status = torch.zeros(total, experts)  # 0 kept, 1 expert dropped, 2 MoE layer dropped, 3 block dropped, 4 dense
    for i in range(total):
        entry = layers.get(str(i))
        if entry and "expert_scores" in entry:
            scores[i] = torch.tensor(entry["expert_scores"])
            if entry.get("alive"):
                status[i] = (~torch.tensor(entry["alive"])).float()  # dropped before the measured trimming step
        elif entry is None or "s_nm" not in entry:
            status[i] = 4
        if d["kept_experts"][i] is not None:
            row = torch.ones(experts)
            row[d["kept_experts"][i]] = 0
            status[i] = row
        if i in d["dropped_moe_layers"]:
            status[i] = 2
        if i in d["dropped_blocks"]:
            status[i] = 3
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * total + 1.5)))
    image = left.imshow(scores.numpy(), aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=left, label="mean routing score")
    left.set(title="Expert importance before trimming", xlabel="expert", ylabel="layer")
    palette = ["#f2d94e", "#3b6fb6", "#e07b39", "#c0392b", "#bbbbbb"]
    right.imshow(status.numpy(), aspect="auto", cmap=ListedColormap(palette), vmin=-0.5, vmax=4.5,
                 interpolation="nearest")
    right.set(title="What remains", xlabel="expert", ylabel="layer")
    right.legend(handles=[Patch(color=c, label=t) for c, t in zip(palette, (
        "kept", "expert dropped", "MoE layer dropped", "block dropped", "dense layer"))],
        loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, out / DROPPED_PNG)
    return [*written, out / DROPPED_PNG]
