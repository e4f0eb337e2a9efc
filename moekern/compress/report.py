"""The report of a compression, written beside its checkpoint:

    compress_report.md     the recipe, each step's decisions and time, sizes before and after
    compress_report.json   the same for machines, with the similarities and expert scores measured before trimming
    similarity.png         S^(M) and S^(NM) per MoE layer and block input/output similarity (paper, Figs. 4 and 7)
    dropped.png            mean expert scores, and which experts, MoE layers and blocks were dropped (Figs. 10, 12)

The plots need the statistics of a trimming step; a recipe with only slimming gets the markdown and JSON.
"""

import json
from pathlib import Path

import torch

REPORT_MD, REPORT_JSON = "compress_report.md", "compress_report.json"
SIMILARITY_PNG, DROPPED_PNG = "similarity.png", "dropped.png"


def model_size(model) -> dict:
    """Parameters (tied ones once; a packed 4-bit weight counts as the weights it holds, so quantization does not
    change the count), routed-expert parameters, and the bytes of the state dict (packed 4-bit weights and their
    scales included, each storage once): the memory figure."""
    from moekern import surgery

    weights = dict(model.named_parameters())
    packed = {n: b for n, b in model.named_buffers() if n.endswith("qweight")}  # moekern.quant's 4-bit layout
    if packed:
        from moekern.quant.layout import PACK  # 4-bit values per stored int32

        weights.update(packed)
    count = {n: t.numel() * (PACK if n in packed else 1) for n, t in weights.items()}
    unique = {t.data_ptr(): n for n, t in weights.items()}
    state = {t.data_ptr(): t for t in model.state_dict().values()}
    return {
        "parameters": sum(count[n] for n in unique.values()),
        "expert_parameters": sum(c for n, c in count.items() if ".experts." in n),
        "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
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
        "stats_before_trimming": None if result.stats is None else
        {"tokens_per_layer": result.stats.tokens, "layers": result.stats.summary()},
    }


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
        lines += ["", f"![similarity]({SIMILARITY_PNG})", "", f"![dropped]({DROPPED_PNG})", ""]
    return "\n".join(lines)


def plot(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    layers = data["stats_before_trimming"]["layers"]
    d = data["decisions"]
    ids = [int(i) for i in layers]
    moe = [i for i in ids if "s_nm" in layers[str(i)]]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.4
    left.bar([i - width / 2 for i in moe], [layers[str(i)]["s_m"] for i in moe], width, label="MoE: S(M)")
    bars = left.bar([i + width / 2 for i in moe], [layers[str(i)]["s_nm"] for i in moe], width, label="Norm+MoE: S(NM)")
    for i, bar in zip(moe, bars):
        if i in d["dropped_moe_layers"]:
            bar.set_edgecolor("red")
            bar.set_linewidth(2)
    left.set(title="Layer-wise similarity (red edge: MoE layer dropped)", xlabel="layer", ylabel="cosine similarity",
             xticks=moe)
    left.legend(loc="lower right")
    colors = ["tab:red" if i in d["dropped_blocks"] else "tab:blue" for i in ids]
    right.bar(ids, [layers[str(i)]["block_similarity"] for i in ids], color=colors)
    right.set(title="Block input/output similarity (red: block dropped)", xlabel="block", ylabel="cosine similarity",
              xticks=ids)
    fig.tight_layout()
    fig.savefig(out / SIMILARITY_PNG, dpi=110)
    plt.close(fig)

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
    fig.tight_layout()
    fig.savefig(out / DROPPED_PNG, dpi=110)
    plt.close(fig)
    return [out / SIMILARITY_PNG, out / DROPPED_PNG]
