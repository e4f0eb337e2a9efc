"""The report of `moekern paper`, written from its records (DIR/paper.jsonl) alone: every number in report.md and
report.json is read from there.

    report.md / report.json     the settings; the paper's comparison with held-out perplexity; the shape of the
                                paper's Table 3 (speedup against transformers' own model, FLOPs, memory, accuracy per
                                task, average, relative); the speed per batch size; the similarities; the drops
    ppl_vs_weights.png          held-out perplexity against weight bytes, one point per method
    speed_vs_batch.png, speedup_vs_memory.png, accuracy_vs_dropped.png      (moekern.bench.report.plot)
    layer_similarity.png        S(M), S(NM) and block input/output similarity per layer (paper, Fig. 4)
    block_similarity.png        the normalised block-wise similarity matrix (Fig. 7)
    drop_sweeps.png             what Layer Drop, Block Drop and global Expert Drop remove for every count (Figs. 10, 12)
    recipes_dropped.png         what each row of the table removed, per layer
    score_distribution.png, and with --figures / --tables: drop_accuracy.png, robustness.png and Tables 5-8
                                (moekern.bench.paper_figures)
"""

import json
import statistics
from pathlib import Path

from moekern.bench import paper_figures
from moekern.bench.records import read_records
from moekern.bench.report import table3_lines
from moekern.bench.variants import UNCOMPRESSED
from moekern.report.plots import annotate, pyplot, save
from moekern.report.speed import dropped, relative, speed_lines, speed_rows, speedups
from moekern.report.tables import TASK_LABELS, fmt, header
from moekern.eval.harness import HELDOUT_PPL, PAPER_TASKS
from moekern.model_info import human_bytes, human_count

PNG = {"ppl": "ppl_vs_weights.png", "layers": "layer_similarity.png", "matrix": "block_similarity.png",
       "sweeps": "drop_sweeps.png", "recipes": "recipes_dropped.png"}


def latest_run(records: list[dict]) -> str:
    runs = [r["run"] for r in records if r["kind"] == "run" and r.get("command") == "paper"]
    if not runs:
        raise ValueError("no `moekern paper` run in these records")
    return runs[-1]


def build(records: list[dict], run: str | None = None) -> dict:
    """The report's content from the records of one paper run (default: the latest)."""
    run = run or latest_run(records)
    mine = [r for r in records if r.get("run") == run]
    settings = next(r for r in mine if r["kind"] == "run")
    stats = next((r for r in mine if r["kind"] == "stats"), None)
    prefixes = [r for r in mine if r["kind"] == "prefix"]
    tasks_run = [t for t in settings["tasks"] if t != HELDOUT_PPL]
    tasks = [t for t in [*PAPER_TASKS, *tasks_run] if t in tasks_run]
    tasks = list(dict.fromkeys(tasks))

    by_row: dict[int, dict] = {}
    for r in mine:
        if "row" in r and r["kind"] in ("model", "speed", "eval", "row"):
            entry = by_row.setdefault(r["row"], {"model": None, "speed": [], "eval": {}, "row": None})
            if r["kind"] in ("model", "row"):
                entry[r["kind"]] = r
            elif r["kind"] == "speed":
                if not r.get("repeat"):  # the baseline measured again at the end: steadiness, below
                    entry["speed"].append(r)
            else:
                entry["eval"][r["task"]] = r
    base = by_row.get(0, {"model": None, "speed": [], "eval": {}, "row": None})
    base_speed = {s["batch"]: s for s in base["speed"]}
    base_params = (base["model"] or {}).get("size", {}).get("parameters")

    again = {r["batch"]: r for r in mine if r["kind"] == "speed" and r.get("repeat") and r["status"] == "ok"}
    steadiness = None
    common = sorted(b for b in again if base_speed.get(b, {}).get("status") == "ok")
    if common:
        b = common[-1]
        first, last = base_speed[b]["decode_step_median_s"], again[b]["decode_step_median_s"]
        steadiness = {"batch": b, "start_s": first, "end_s": last, "change": last / first - 1}
    rows, speed = [], []
    for index in sorted(by_row):
        entry = by_row[index]
        m, status = entry["model"] or {}, entry["row"] or {}
        head = m or status
        mine_speed = {s["batch"]: s for s in entry["speed"]}
        decode_speedup, prefill_speedup, at = speedups(mine_speed, base_speed)
        acc = {t: entry["eval"][t]["value"] for t in tasks if t in entry["eval"]}
        size = m.get("size") or {}
        error = status.get("error")
        if error and len(error) > 160:  # the table gets the gist; the records keep the whole message
            error = error[:157].rsplit(" ", 1)[0] + " ..."
        row = {
            "row": index, "label": head.get("label"), "model": head.get("model"), "method": m.get("variant"),
            "recipe": head.get("recipe"), "run": run,
            "status": status.get("status") or ("interrupted" if m else "error"),
            "error": error, "stage": status.get("stage"), "seconds": status.get("seconds"),
            "decode_speedup": decode_speedup, "prefill_speedup": prefill_speedup,
            "speedup_batch": at, "context": settings["context"],
            "flops": m.get("flops"), "flops_tokens": m.get("flops_tokens"), "weight_bytes": m.get("weight_bytes"),
            "parameters": size.get("parameters"),
            "removed": (1 - size["parameters"] / base_params) if size.get("parameters") and base_params else None,
            "accuracy": acc, "average": statistics.mean(acc.values()) if acc else None,
            "perplexity": entry["eval"].get(HELDOUT_PPL, {}).get("value"),
            "perplexity_tokens": entry["eval"].get(HELDOUT_PPL, {}).get("n"),
            "dropped": dropped(m.get("decisions")), "decisions": m.get("decisions"),
            "compress_seconds": m.get("compress_seconds"),
            "reused": m.get("reused") or [],  # in words; `shared` says the same as {"what", "of", "seconds"}
            "shared": m.get("shared") or [],
        }
        rows.append(row)
        speed += speed_rows(mine_speed, base_speed, model=row["model"], method=row["label"], label=row["label"],
                            variant=row["method"], run=run)
    relative(rows, UNCOMPRESSED)  # against the first uncompressed row with accuracy: the baseline
    base_ppl = rows[0]["perplexity"] if rows and rows[0]["row"] == 0 else None
    for row in rows:
        row["perplexity_change"] = (row["perplexity"] / base_ppl - 1) if row["perplexity"] and base_ppl else None
    return {
        "run": run, "settings": {k: v for k, v in settings.items() if k not in ("kind", "run")},
        "tasks": tasks, "perplexity": any(r["perplexity"] is not None for r in rows),
        "rows": rows, "speed": speed, "prefixes": prefixes,
        "stats": None if stats is None else {k: v for k, v in stats.items() if k not in ("kind", "run")},
        "steadiness": steadiness, "notes": notes(settings, rows, steadiness), "extras": paper_figures.build(mine),
    }


def _shares(row: dict, what: str, of: str) -> bool:
    """Whether a row took `what` ("model" or "statistics") made once `of` a step or model (its `shared` records;
    a run recorded before they existed says so in words only, in `reused`)."""
    if row.get("shared"):
        return any(s["what"] == what and s["of"] == of for s in row["shared"])
    text = f"statistics of the {of}" if what == "statistics" else f"the {of} model"
    return any(text in u for u in row.get("reused") or [])


def notes(settings: dict, rows: list[dict], steadiness: dict | None = None) -> list[str]:
    busy = []
    if steadiness and abs(steadiness["change"]) > 0.25:
        busy = [f"The baseline's decode step changed by {100 * steadiness['change']:+.0f}% between the start and the "
                f"end of the run: the machine was busy, and the speedups are not reliable."]
    return [*busy,
        *settings.get("notes", []),
        "Speedup: the baseline's median decode step (prefill time) over the method's, at the largest batch size both "
        "completed; the baseline is transformers' own model without moekern, timed at the start of the same process "
        "(and again at the end, to show how steady the machine was). Prefill: the median of 3 prefills; decode: the "
        "median step. Other programs running on the machine at the same time make these times noisy.",
        "FLOPs: one forward of the context at batch 1, counted by torch.utils.flop_counter with transformers' eager "
        "experts (Triton kernels and torch._grouped_mm are invisible to the counter); skipped slots and dropped "
        "experts are not computed, so they are not counted.",
        "Memory: the bytes of the weights (parameters and persistent buffers, so 4-bit weights count). The speed "
        "table's peak memory is CUDA allocated memory on a GPU, and on the CPU the process's resident high-water mark, "
        "which never decreases within a run and so says nothing per row.",
        "Accuracy: zero-shot lm-eval; acc_norm for ARC-C, HellaSwag, OBQA, PIQA; acc elsewhere. Heldout-MC is "
        "moekern's offline 4-way continuation task on the shipped held-out corpus (chance: 25%). Avg. and Rel. (to "
        "the baseline) are over the accuracy columns present. Heldout PPL: perplexity on the shipped held-out text, "
        "windows of 256 tokens.",
        "Parameters: a packed 4-bit weight counts as the weights it holds, so quantization removes none; it shows in "
        "the weights' bytes.",
    ]


# ----------------------------------------------------------------------------------------------------------------------
def paper_table_lines(content: dict) -> list[str]:
    """The paper's comparison: parameters, weights, held-out perplexity (and accuracy) per method."""
    tasks = content["tasks"]
    head = ["Method", "Recipe", "Parameters", "Removed", "Weights", "Held-out PPL", "vs baseline",
            *(TASK_LABELS.get(t, t) for t in tasks)]
    lines = header(head)
    for r in content["rows"]:
        recipe = f"`{r['recipe']}`" if r["recipe"] not in (None, "none") else "-"
        if r["status"] == "error" and r["weight_bytes"] is None:
            lines.append(f"| {r['label']} | {recipe} | failed ({r['stage']}): {r['error']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["label"], recipe, "—" if r["parameters"] is None else human_count(r["parameters"]),
                 fmt(r["removed"] and 100 * r["removed"], ".1f", "%") if r["removed"] is not None else "—",
                 "—" if r["weight_bytes"] is None else human_bytes(r["weight_bytes"]),
                 fmt(r["perplexity"], ".2f"),
                 fmt(r["perplexity_change"] and 100 * r["perplexity_change"], "+.1f", "%")
                 if r["row"] else "—",
                 *(fmt(r["accuracy"].get(t) and 100 * r["accuracy"][t], ".1f") for t in tasks)]
        if r["status"] == "error":
            cells[0] += f" (failed at {r['stage']}: {r['error']})"
        elif r["status"] == "interrupted":
            cells[0] += " (interrupted)"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _settings_lines(content: dict) -> list[str]:
    s = content["settings"]
    cal = s["calibration"]
    base = next((r for r in content["rows"] if r["row"] == 0), None)
    ppl_tokens = base and base["perplexity_tokens"]
    lines = [
        f"Command: `{' '.join(s.get('argv') or ['moekern', 'paper'])}`; moekern commit "
        f"{s.get('commit') or 'unknown'}; {s.get('machine')}, {s.get('device_name')}; torch {s.get('torch')}, "
        f"transformers {s.get('transformers')}; run {content['run']}.",
        "",
        f"Settings: model `{s['model']}` on {s['device']} in {s['dtype']}; calibration {cal['samples']} x "
        f"{cal['seq_len']} tokens of the {cal['source']} (seed {cal['seed']}), order {s['order']}; held-out "
        f"perplexity on {f'{ppl_tokens:,}' if ppl_tokens else '?'} tokens (windows of 256); tasks "
        f"{', '.join(s['tasks'])}" + (f" (limit {s['limit']})" if s.get("limit") else "") + f"; speed at context "
        f"{s['context']}, batch {', '.join(map(str, s['batch_sizes']))}, {s['decode_tokens']} decode tokens.",
    ]
    reuse = []
    if content["stats"]:
        sharing = [r["label"] for r in content["rows"] if _shares(r, "statistics", "uncompressed")]
        reuse.append(f"one calibration pass on the uncompressed model ({content['stats']['seconds']} s) gave the "
                     f"figures below and the statistics of {len(sharing)} row(s)")
    for p in content["prefixes"]:
        users = [r["label"] for r in content["rows"] if _shares(r, "model", p["step"])]
        reuse.append(f"`{p['step']}` ran once ({p['seconds']} s) for {len(users)} row(s)")
    if reuse:
        lines += ["", "Shared work (exact): " + "; ".join(reuse) + "."]
    total = sum(r["seconds"] or 0 for r in content["rows"])
    lines += ["", f"Rows measured in {total:.0f} s."]
    steady = content.get("steadiness")
    if steady:
        lines[-1] += (f" The baseline's decode step at batch {steady['batch']}: {steady['start_s'] * 1e3:.2f} ms at "
                      f"the start, {steady['end_s'] * 1e3:.2f} ms at the end ({100 * steady['change']:+.0f}%), "
                      f"a measure of how steady the machine was.")
    return lines


def markdown(content: dict, plots: dict) -> str:
    s = content["settings"]
    cpu = not str(s["device"]).startswith("cuda")
    lines = [f"# The paper's comparison on `{s['model']}` (moekern paper)", "", *_settings_lines(content), ""]
    lines += ["## Compression methods and held-out perplexity", "", *paper_table_lines(content), ""]
    if "ppl" in plots:
        lines += [f"![held-out perplexity vs weights]({plots['ppl'].name})", ""]
    lines += ["## Speed, FLOPs, memory and accuracy (the shape of the paper's Table 3)", ""]
    if cpu:
        ran = next((n.split("on the CPU moekern runs ", 1)[1].rstrip(")") for n in s.get("notes", [])
                    if "on the CPU moekern runs " in n), "its PyTorch reference")
        lines += ["**Measured on the CPU: these times say nothing about GPU kernels** (moekern's Triton/CUDA path runs "
                  f"only on a GPU; here moekern runs {ran}).", ""]
    lines += [*table3_lines(content), ""]
    for key in ("speed_vs_batch", "speedup_vs_memory", "accuracy_vs_dropped"):
        if key in plots:
            lines += [f"![{key}]({plots[key].name})", ""]
    if content["speed"]:
        lines += ["## Speed per batch size", "", *speed_lines(content), ""]
    stats = content["stats"]
    if stats:
        lines += ["## Similarity before trimming (Figs. 4 and 7)", "",
                  f"From the calibration pass on the uncompressed model ({stats['tokens_per_layer']:,} tokens per "
                  f"layer). S(M) = cos(MoE input, MoE output); S(NM) = cos(x', x' + MoE(Norm(x'))), Layer Drop's "
                  f"score; block = cos(block input, block output), Block Drop's score. The matrix: mean cosine between "
                  f"the hidden states after every two blocks over {stats.get('block_matrix_tokens', 0):,} tokens.", "",
                  "| layer | block | S(M) | S(NM) |", "|---|---|---|---|"]
        for i, layer in stats["layers"].items():
            sm = fmt(layer.get("s_m"), ".4f").replace("—", "-")
            snm = fmt(layer.get("s_nm"), ".4f").replace("—", "-")
            lines.append(f"| {i} | {layer['block_similarity']:.4f} | {sm} | {snm} |")
        lines.append("")
        for key in ("layers", "matrix"):
            if key in plots:
                lines += [f"![{key}]({plots[key].name})", ""]
        lines += ["## What each method dropped (Figs. 10 and 12)", "", *_dropped_lines(content), ""]
        for key in ("recipes", "sweeps"):
            if key in plots:
                lines += [f"![{key}]({plots[key].name})", ""]
    lines += paper_figures.markdown(content, plots.get("extras", {}))
    lines += ["## Notes", "", *(f"- {n}" for n in content["notes"]), ""]
    return "\n".join(lines)


def _dropped_lines(content: dict) -> list[str]:
    lines = ["| Method | dropped blocks | dropped MoE layers | experts kept per layer |", "|---|---|---|---|"]
    for r in content["rows"]:
        d = r["decisions"]
        if not d or not (d.get("dropped_blocks") or d.get("dropped_moe_layers") or any(d.get("kept_experts") or [])):
            continue
        kept = d.get("kept_experts") or []
        counts = ", ".join(f"{i}: {len(k)}" for i, k in enumerate(kept) if k is not None)
        lines.append(f"| {r['label']} | {d.get('dropped_blocks') or '-'} | {d.get('dropped_moe_layers') or '-'} | "
                     f"{counts or 'all'} |")
    sweeps = (content["stats"] or {}).get("sweeps") or {}
    for key, what in (("layer_drop", "Layer Drop"), ("block_drop", "Block Drop")):
        if sweeps.get(key):
            order = []
            for n in sorted(sweeps[key], key=int):
                order += [i for i in sweeps[key][n] if i not in order]
            lines += ["", f"{what} on these statistics removes, as the count grows, in this order: "
                          f"{', '.join(map(str, order))}."]
    return lines


# ----------------------------------------------------------------------------------------------------------------------
def plot(content: dict, out: Path) -> dict:
    from moekern.bench.report import plot as bench_plot
    from moekern.compression.report import plot_block_matrix, plot_drop_sweeps, plot_layer_similarity

    plots = {p.stem: p for p in bench_plot(content, out)}
    plt = pyplot()
    points = [r for r in content["rows"] if r["perplexity"] is not None and r["weight_bytes"]]
    if points:
        fig, ax = plt.subplots(figsize=(8, 5))
        annotate(ax, [(r["weight_bytes"] / 1e6, r["perplexity"], r["label"]) for r in points], log_y=True)
        ax.set_yscale("log")
        ax.margins(x=0.15, y=0.1)
        ax.set(xlabel="weights (MB)", ylabel="held-out perplexity",
               title=f"{content['settings']['model']}: compression methods (lower left is better)")
        plots["ppl"] = save(fig, out / PNG["ppl"])
    stats = content["stats"]
    if stats:
        plots["layers"] = plot_layer_similarity(stats["layers"], out / PNG["layers"],
                                                title="Layer-wise similarity of the uncompressed model (Fig. 4)")
        if stats.get("block_matrix"):
            plots["matrix"] = plot_block_matrix(stats["block_matrix"], out / PNG["matrix"],
                                                [int(i) for i in stats["layers"]], stats["block_matrix_tokens"])
        layers, experts = _shape(content)
        if layers and experts:
            plots["sweeps"] = plot_drop_sweeps(stats["sweeps"], layers, experts, out / PNG["sweeps"],
                                               title="Drop patterns by count, one-shot on the uncompressed model's "
                                               "statistics (Figs. 10 and 12)")
            recipes = _plot_recipes(content, layers, experts, out / PNG["recipes"])
            if recipes:
                plots["recipes"] = recipes
    plots["extras"] = paper_figures.plot(content, out)
    return plots


def _shape(content: dict) -> tuple[int, int]:
    stats = content["stats"]
    layers = len(stats["layers"])
    experts = max((len(v.get("expert_scores") or []) for v in stats["layers"].values()), default=0)
    return layers, experts


def _plot_recipes(content: dict, layers: int, experts: int, path: Path):
    """One row per compressed method, one column per layer: kept, experts dropped (the count kept is written),
    MoE layer dropped, block dropped."""
    import torch
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = [r for r in content["rows"] if r["decisions"] and (r["decisions"].get("dropped_blocks")
            or r["decisions"].get("dropped_moe_layers") or any(r["decisions"].get("kept_experts") or []))]
    if not rows:
        return None
    grid = torch.zeros(len(rows), layers)
    fig, ax = pyplot().subplots(figsize=(1.5 + 0.6 * layers, 1.2 + 0.4 * len(rows)))
    for y, r in enumerate(rows):
        d = r["decisions"]
        for i in range(layers):
            kept = (d.get("kept_experts") or [None] * layers)[i]
            if i in (d.get("dropped_blocks") or []):
                grid[y, i] = 3
            elif i in (d.get("dropped_moe_layers") or []):
                grid[y, i] = 2
            elif kept is not None and len(kept) < experts:
                grid[y, i] = 1
                ax.text(i, y, str(len(kept)), ha="center", va="center", fontsize=8, color="white")
    palette = ["#f2d94e", "#3b6fb6", "#e07b39", "#c0392b"]
    ax.imshow(grid.numpy(), aspect="auto", cmap=ListedColormap(palette), vmin=-0.5, vmax=3.5, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.set_xticks(range(layers))
    ax.set(xlabel="layer", title="What each method removed (number: experts kept)")
    ax.legend(handles=[Patch(color=c, label=t) for c, t in zip(palette, (
        "kept", "experts dropped", "MoE layer dropped", "block dropped"))], loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
def write_report(records, out: Path, run: str | None = None) -> list[Path]:
    """report.md, report.json and the plots of one paper run (default: the latest) into `out`. `records`: the
    records, or the paper.jsonl file (or folder) to read them from."""
    if isinstance(records, (str, Path)):
        records = read_records([records])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    content = build(records, run)
    plots = plot(content, out)
    (out / "report.md").write_text(markdown(content, plots))
    extras = plots.pop("extras", {})
    plots.update({f"extras_{k}": p for k, p in extras.items()})
    (out / "report.json").write_text(json.dumps({**content, "plots": {k: p.name for k, p in plots.items()}},
                                                indent=2, default=str) + "\n")
    return [out / "report.md", out / "report.json", *plots.values()]
