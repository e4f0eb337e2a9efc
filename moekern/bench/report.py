"""One report from bench and eval runs: the paper's Table 3 (method, speedup, FLOPs, memory, per-task accuracy,
average, relative to the baseline), the speed per batch size, plots, and the same numbers as JSON. Every number is
read from the runs' records; nothing here is a measured constant."""

import json
import statistics
from pathlib import Path

from moekern.bench.variants import BASELINE, UNCOMPRESSED
from moekern.eval.harness import PAPER_TASKS
from moekern.model_info import human_bytes
from moekern.report.plots import annotate, pyplot, save
from moekern.report.speed import dropped, relative, speed_lines, speed_rows, speedups
from moekern.report.tables import TASK_LABELS, flops_text, fmt, header

__all__ = ["build", "write_report", "markdown", "plot", "table3_lines", "speed_lines", "flops_text", "annotate",
           "TASK_LABELS"]


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

    rows, speed_table, seen = [], [], set()
    bench_models = [m for m in models if runs.get(m["run"], {}).get("command") == "bench"]
    for m in bench_models:
        run = runs[m["run"]]
        key = (m["model"], m["variant"], m["recipe"])
        if m["variant"] == BASELINE and (m["model"], BASELINE) in seen:
            continue  # every bench run measures the baseline again: the table shows it once
        seen.add((m["model"], BASELINE) if m["variant"] == BASELINE else key)
        mine = {s["batch"]: s for s in speeds if s["run"] == m["run"] and s["variant"] == m["variant"]}
        base = {s["batch"]: s for s in speeds if s["run"] == m["run"] and s["variant"] == BASELINE}
        decode_speedup, prefill_speedup, at = speedups(mine, base)
        rows.append(_row(m, run, scores_for(m["model"], m["recipe"]), tasks, decode_speedup, prefill_speedup, at))
        speed_table += speed_rows(mine, base, model=m["model"], method=m["variant"], run=m["run"])
    # evaluated models that were not benched: accuracy only
    benched = {(r["model"], r["recipe"]) for r in rows}
    for m in models:
        if runs.get(m["run"], {}).get("command") == "eval" and (m["model"], m["recipe"]) not in benched:
            benched.add((m["model"], m["recipe"]))
            rows.append(_row(m, runs[m["run"]], accuracy.get((m["model"], m["recipe"]), {}), tasks, None, None, None))
    relative(rows, UNCOMPRESSED)
    notes = sorted({n for r in runs.values() for n in r.get("notes", [])})
    notes += _fixed_notes(runs, rows)
    return {"rows": rows, "tasks": tasks, "perplexity": has_ppl, "speed": speed_table, "notes": notes,
            "runs": sorted(runs), "environment": _environments(runs)}


def _row(m, run, scores, tasks, decode_speedup, prefill_speedup, batch) -> dict:
    acc = {t: scores[t]["value"] for t in tasks if t in scores}
    return {"model": m["model"], "method": m.get("variant", "checkpoint"), "recipe": m["recipe"], "run": m["run"],
            "decode_speedup": decode_speedup, "prefill_speedup": prefill_speedup, "speedup_batch": batch,
            "context": run.get("context"), "flops": m.get("flops"), "flops_tokens": m.get("flops_tokens"),
            "weight_bytes": m.get("weight_bytes"), "accuracy": acc,
            "average": statistics.mean(acc.values()) if acc else None,
            "perplexity": scores.get("moekern_heldout_ppl", {}).get("value"),
            "dropped": dropped(m.get("decisions"))}


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


def table3_lines(content: dict) -> list[str]:
    """The paper's Table 3 as markdown rows: method, speedups, FLOPs, memory, accuracy per task, average, relative,
    and the held-out perplexity where it was measured. A row may carry its own `label` and an `error`."""
    tasks = content["tasks"]
    head = ["Method", "Speedup (decode)", "Speedup (prefill)", "FLOPs", "Memory",
            *(TASK_LABELS.get(t, t) for t in tasks), "Avg.", "Rel."]
    if content["perplexity"]:
        head.append("Heldout PPL")
    lines = header(head)
    for r in content["rows"]:
        at = f" (b={r['speedup_batch']})" if r["speedup_batch"] else ""
        label = r.get("label") or (f"{r['model']}: {r['method']}"
                                   + (f" [{r['recipe']}]" if r["method"] == "checkpoint" else ""))
        if r.get("error") and r.get("weight_bytes") is None:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [label, fmt(r["decode_speedup"], ".2f", "x") + at, fmt(r["prefill_speedup"], ".2f", "x"),
                 flops_text(r["flops"]), "—" if r["weight_bytes"] is None else human_bytes(r["weight_bytes"]),
                 *(fmt(r["accuracy"].get(t) and 100 * r["accuracy"][t], ".1f") for t in tasks),
                 fmt(r["average"] and 100 * r["average"], ".1f"), fmt(r["relative"] and 100 * r["relative"], ".1f", "%")]
        if content["perplexity"]:
            cells.append(fmt(r["perplexity"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
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
    plt = pyplot()
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
        written.append(save(fig, out / "speed_vs_batch.png"))
    points = [r for r in content["rows"] if r["decode_speedup"] is not None and r["weight_bytes"]]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        unit, size = ("GB", 1e9) if max(r["weight_bytes"] for r in points) >= 1e9 else ("MB", 1e6)
        annotate(ax, [(r["weight_bytes"] / size, r["decode_speedup"], r.get("label") or f"{r['model']}: "
                       f"{r['method']}") for r in points])
        ax.margins(x=0.15, y=0.1)
        ax.set(xlabel=f"weights ({unit})", ylabel="decode speedup vs transformers", title="Speedup vs memory")
        written.append(save(fig, out / "speedup_vs_memory.png"))
    evaluated = list({(r["model"], r["recipe"]): r for r in content["rows"] if r["average"] is not None}.values())
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        annotate(ax, [(r["dropped"]["blocks"] + r["dropped"]["moe_layers"], 100 * r["average"],
                       r.get("label") or f"{r['recipe']} ({r['dropped']['experts']} experts dropped)")
                      for r in evaluated])
        ax.margins(x=0.3, y=0.15)
        ax.set(xlabel="dropped modules (blocks + MoE layers, from the moekern decisions)",
               ylabel="average accuracy (%)", title="Accuracy vs dropped modules")
        written.append(save(fig, out / "accuracy_vs_dropped.png"))
    return written


def write_report(records: list[dict], out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    content = build(records)
    plots = plot(content, out)
    (out / "report.md").write_text(markdown(content, plots))
    (out / "report.json").write_text(json.dumps(content, indent=2, default=str) + "\n")
    return [out / "report.md", out / "report.json", *plots]
