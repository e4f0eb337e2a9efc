"""One report from bench and eval runs: the paper's Table 3 (method, speedup, FLOPs, memory, per-task accuracy,
average, relative to the baseline), the speed per batch size, plots, and the same numbers as JSON. Every number is
read from the runs' records; nothing here is a measured constant."""

import json
import statistics
from pathlib import Path

from moekern.bench.variants import BASELINE, UNCOMPRESSED
from moekern.eval.harness import PAPER_TASKS
from moekern.model_info import human_bytes

TASK_LABELS = {"arc_challenge": "ARC-C", "boolq": "BoolQ", "hellaswag": "HellaSwag", "mmlu": "MMLU",
               "openbookqa": "OBQA", "piqa": "PIQA", "rte": "RTE", "winogrande": "WinoGrande",
               "moekern_heldout_mc": "Heldout-MC", "moekern_heldout_ppl": "Heldout PPL"}


def build(records: list[dict]) -> dict:
    """The report's content: rows of Table 3, the speed table, the task columns and the notes."""
    runs = {r["run"]: r for r in records if r["kind"] == "run"}
    models = [r for r in records if r["kind"] == "model"]
    speeds = [r for r in records if r["kind"] == "speed"]
    evals = [r for r in records if r["kind"] == "eval"]

    # accuracy: the latest result per (model, recipe, task)
    accuracy: dict[tuple, dict] = {}
    for r in evals:
        accuracy.setdefault((r["model"], r["recipe"]), {})[r["task"]] = r
    tasks = [t for t in [*PAPER_TASKS, "moekern_heldout_mc"] if any(t in v for v in accuracy.values())]
    has_ppl = any("moekern_heldout_ppl" in v for v in accuracy.values())

    def scores_for(model: str, recipe: str) -> dict:
        if (model, recipe) in accuracy:
            return accuracy[(model, recipe)]
        same_recipe = [v for (m, r), v in accuracy.items() if r == recipe]
        return same_recipe[0] if len(same_recipe) == 1 else {}

    rows, speed_rows, seen = [], [], set()
    bench_models = [m for m in models if runs.get(m["run"], {}).get("command") == "bench"]
    for m in bench_models:
        run = runs[m["run"]]
        key = (m["model"], m["variant"], m["recipe"])
        if m["variant"] == BASELINE and (m["model"], BASELINE) in seen:
            continue  # every bench run measures the baseline again: the table shows it once
        seen.add((m["model"], BASELINE) if m["variant"] == BASELINE else key)
        mine = {s["batch"]: s for s in speeds if s["run"] == m["run"] and s["variant"] == m["variant"]}
        base = {s["batch"]: s for s in speeds if s["run"] == m["run"] and s["variant"] == BASELINE}
        both = sorted(b for b in mine if mine[b]["status"] == "ok" and base.get(b, {}).get("status") == "ok")
        at = both[-1] if both else None
        decode_speedup = base[at]["decode_step_median_s"] / mine[at]["decode_step_median_s"] if at else None
        prefill_speedup = base[at]["prefill_s"] / mine[at]["prefill_s"] if at else None
        rows.append(_row(m, run, scores_for(m["model"], m["recipe"]), tasks, decode_speedup, prefill_speedup, at))
        for batch, s in sorted(mine.items()):
            b = base.get(batch, {})
            speed_rows.append({
                "model": m["model"], "method": m["variant"], "run": m["run"], "batch": batch,
                "status": s["status"], "context": s["context"],
                **({k: s[k] for k in ("prefill_tok_s", "decode_step_median_s", "decode_tok_s", "peak_memory_bytes",
                                      "floor_step_s", "times_floor", "kv_cache_bytes")} if s["status"] == "ok" else {}),
                "decode_speedup": (b["decode_step_median_s"] / s["decode_step_median_s"]
                                   if s["status"] == "ok" and b.get("status") == "ok" else None),
            })
    # evaluated models that were not benched: accuracy only
    benched = {(r["model"], r["recipe"]) for r in rows}
    for m in models:
        if runs.get(m["run"], {}).get("command") == "eval" and (m["model"], m["recipe"]) not in benched:
            benched.add((m["model"], m["recipe"]))
            rows.append(_row(m, runs[m["run"]], accuracy.get((m["model"], m["recipe"]), {}), tasks, None, None, None))
    _relative(rows)
    notes = sorted({n for r in runs.values() for n in r.get("notes", [])})
    notes += _fixed_notes(runs, rows)
    return {"rows": rows, "tasks": tasks, "perplexity": has_ppl, "speed": speed_rows, "notes": notes,
            "runs": sorted(runs), "environment": _environments(runs)}


def _row(m, run, scores, tasks, decode_speedup, prefill_speedup, batch) -> dict:
    acc = {t: scores[t]["value"] for t in tasks if t in scores}
    return {"model": m["model"], "method": m.get("variant", "checkpoint"), "recipe": m["recipe"], "run": m["run"],
            "decode_speedup": decode_speedup, "prefill_speedup": prefill_speedup, "speedup_batch": batch,
            "context": run.get("context"), "flops": m.get("flops"), "flops_tokens": m.get("flops_tokens"),
            "weight_bytes": m.get("weight_bytes"), "accuracy": acc,
            "average": statistics.mean(acc.values()) if acc else None,
            "perplexity": scores.get("moekern_heldout_ppl", {}).get("value"),
            "dropped": _dropped(m.get("decisions"))}


def _relative(rows) -> None:
    """Average accuracy relative to the uncompressed model's, of the same model, over the tasks both have."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["recipe"] == UNCOMPRESSED and r["accuracy"]),
                    None)
        common = [t for t in row["accuracy"] if base and t in base["accuracy"]]
        row["relative"] = (statistics.mean(row["accuracy"][t] for t in common)
                           / statistics.mean(base["accuracy"][t] for t in common)) if common else None


def _dropped(decisions) -> dict:
    d = decisions or {}
    original = d.get("original_num_experts") or 0
    experts = sum(original - len(k) for k in d.get("kept_experts") or [] if k is not None)
    return {"blocks": len(d.get("dropped_blocks") or []), "moe_layers": len(d.get("dropped_moe_layers") or []),
            "experts": experts}


def _fixed_notes(runs, rows) -> list[str]:
    notes = []
    if any(r.get("command") == "bench" for r in runs.values()):
        notes += [
            "Speedup: the baseline's median decode step (prefill time) over the method's, at the largest batch size "
            "both completed, measured in the same process (the baseline is transformers' model without moekern). Every bench run measures "
            "its own baseline; the table and the speed table show the first run's.",
            "FLOPs: one forward of the context at batch 1, counted by torch.utils.flop_counter with transformers' "
            "eager experts (Triton kernels and torch._grouped_mm are invisible to the counter).",
            "Memory: the bytes of the weights (parameters and persistent buffers, so 4-bit weights count); the speed table gives the peak (CUDA allocated, or the process's "
            "resident high-water mark on the CPU, which never decreases within a run).",
            "x floor: the median decode step over the bytes floor = (non-expert weights + the experts a batch selects, "
            "ESTIMATED from top_k and the batch size as if routing were uniform + the KV cache) / measured copy "
            "bandwidth.",
        ]
    if any(r["method"] != BASELINE and r["recipe"] == UNCOMPRESSED and r["accuracy"] for r in rows):
        notes.append("moekern without a recipe computes the same model: its accuracy is the uncompressed model's.")
    if any(r["accuracy"] for r in rows):
        notes.append("Accuracy: zero-shot lm-eval; acc_norm for ARC-C, HellaSwag, OBQA, PIQA; acc elsewhere. "
                     "Heldout-MC is moekern's offline 4-way continuation task on the shipped held-out corpus (chance: 25%). "
                     "Average and relative (to the uncompressed model) are over the accuracy columns present.")
    return notes


def _environments(runs) -> list[str]:
    return sorted({f"{r.get('device_name')} ({r.get('device')}, {r.get('dtype')}), torch {r.get('torch')}, "
                   f"transformers {r.get('transformers')}" for r in runs.values()})


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def flops_text(flops) -> str:
    if flops is None:
        return "—"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= size:
            return f"{flops / size:.2f}{unit}"
    return str(flops)


def table3_lines(content: dict) -> list[str]:
    """The paper's Table 3 as markdown rows: method, speedups, FLOPs, memory, accuracy per task, average, relative,
    and the held-out perplexity where it was measured. A row may carry its own `label` and an `error`."""
    tasks = content["tasks"]
    head = ["Method", "Speedup (decode)", "Speedup (prefill)", "FLOPs", "Memory",
            *(TASK_LABELS.get(t, t) for t in tasks), "Avg.", "Rel."]
    if content["perplexity"]:
        head.append("Heldout PPL")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in content["rows"]:
        at = f" (b={r['speedup_batch']})" if r["speedup_batch"] else ""
        label = r.get("label") or (f"{r['model']}: {r['method']}"
                                   + (f" [{r['recipe']}]" if r["method"] == "checkpoint" else ""))
        if r.get("error") and r.get("weight_bytes") is None:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [label, _fmt(r["decode_speedup"], ".2f", "x") + at, _fmt(r["prefill_speedup"], ".2f", "x"),
                 flops_text(r["flops"]), "—" if r["weight_bytes"] is None else human_bytes(r["weight_bytes"]),
                 *(_fmt(r["accuracy"].get(t) and 100 * r["accuracy"][t], ".1f") for t in tasks),
                 _fmt(r["average"] and 100 * r["average"], ".1f"), _fmt(r["relative"] and 100 * r["relative"], ".1f", "%")]
        if content["perplexity"]:
            cells.append(_fmt(r["perplexity"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_lines(content: dict) -> list[str]:
    """The speed per batch size as markdown rows."""
    lines = ["| Model | Method | Batch | Context | Prefill tok/s | Decode step | Decode tok/s | Speedup | "
             "Peak memory | Floor step | x floor |", "|" + "---|" * 11]
    for s in content["speed"]:
        if s["status"] != "ok":
            lines.append(f"| {s['model']} | {s['method']} | {s['batch']} | {s['context']} | out of memory |"
                         + " |" * 6)
            continue
        lines.append(
            f"| {s['model']} | {s['method']} | {s['batch']} | {s['context']} | {s['prefill_tok_s']:.1f} | "
            f"{s['decode_step_median_s'] * 1e3:.2f} ms | {s['decode_tok_s']:.1f} | "
            f"{_fmt(s['decode_speedup'], '.2f', 'x')} | {human_bytes(s['peak_memory_bytes'])} | "
            f"{s['floor_step_s'] * 1e3:.3f} ms | {s['times_floor']:.1f} |")
    return lines


def markdown(content: dict, plots: list[Path]) -> str:
    lines = ["# moekern report", "", f"Runs: {', '.join(content['runs'])}", "",
             *(f"Environment: {e}" for e in content["environment"]), "",
             "## Compression vs. speed, memory and accuracy (the paper's Table 3)", "", *table3_lines(content)]
    if content["speed"]:
        lines += ["", "## Speed per batch size", "", *speed_lines(content)]
    if plots:
        lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots)]
    lines += ["", "## Notes", "", *(f"- {n}" for n in content["notes"]), ""]
    return "\n".join(lines)


def plot(content: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if content["speed"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines: dict[tuple, list] = {}
        for s in content["speed"]:
            if s["status"] == "ok":
                key = (s.get("label") or f"{s['model']}: {s['method']}", s["run"])
                lines.setdefault(key, []).append((s["batch"], s["decode_tok_s"]))
        colors = plt.get_cmap("tab20").colors
        for index, ((label, _), points) in enumerate(lines.items()):
            ax.plot(*zip(*sorted(points)), marker="osD^v<>"[index // 20 % 7], color=colors[index % 20], label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="decode tokens/s", title="Decode speed vs batch")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(fig, out / "speed_vs_batch.png"))
    points = [r for r in content["rows"] if r["decode_speedup"] is not None and r["weight_bytes"]]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        unit, size = ("GB", 1e9) if max(r["weight_bytes"] for r in points) >= 1e9 else ("MB", 1e6)
        annotate(ax, [(r["weight_bytes"] / size, r["decode_speedup"], r.get("label") or f"{r['model']}: "
                       f"{r['method']}") for r in points])
        ax.margins(x=0.15, y=0.1)
        ax.set(xlabel=f"weights ({unit})", ylabel="decode speedup vs transformers", title="Speedup vs memory")
        written.append(_save(fig, out / "speedup_vs_memory.png"))
    evaluated = list({(r["model"], r["recipe"]): r for r in content["rows"] if r["average"] is not None}.values())
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        annotate(ax, [(r["dropped"]["blocks"] + r["dropped"]["moe_layers"], 100 * r["average"],
                       r.get("label") or f"{r['recipe']} ({r['dropped']['experts']} experts dropped)")
                      for r in evaluated])
        ax.margins(x=0.3, y=0.15)
        ax.set(xlabel="dropped modules (blocks + MoE layers, from the moekern decisions)",
               ylabel="average accuracy (%)", title="Accuracy vs dropped modules")
        written.append(_save(fig, out / "accuracy_vs_dropped.png"))
    return written


def annotate(ax, points: list[tuple[float, float, str]], log_y: bool = False) -> None:
    """Scatter labelled points; each label takes the nearest line, above or below its point, that no earlier label
    near it holds, so that labels of nearby points do not print over each other."""
    import math

    if not points:
        return
    ys = [math.log(y) if log_y and y > 0 else y for _, y, _ in points]
    xs = [x for x, _, _ in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    line = 0.035  # one label line (10 points), roughly, as a fraction of the spread of y
    taken: list[tuple[float, float]] = []  # label positions, normalised
    for (x, y, label), ly in zip(points, ys):
        nx, ny = (x - min(xs)) / span_x, (ly - min(ys)) / span_y
        for shift in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5):
            at = ny + shift * line
            if all(abs(tx - nx) > 0.2 or abs(ty - at) > 0.9 * line for tx, ty in taken):
                break
        taken.append((nx, at))
        ax.scatter(x, y)
        ax.annotate(label, (x, y), xytext=(8, -3 + shift * 10), textcoords="offset points", fontsize=7,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if shift else None)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(records: list[dict], out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    content = build(records)
    plots = plot(content, out)
    (out / "report.md").write_text(markdown(content, plots))
    (out / "report.json").write_text(json.dumps(content, indent=2, default=str) + "\n")
    return [out / "report.md", out / "report.json", *plots]
