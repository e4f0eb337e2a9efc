"""Rows of a speed table against the baseline measured in the same run, and the comparisons every report makes."""

import statistics

from moekern.model_info import human_bytes
from moekern.report.tables import fmt, header

OK_FIELDS = ("prefill_tok_s", "decode_step_median_s", "decode_tok_s", "peak_memory_bytes", "floor_step_s",
             "times_floor", "kv_cache_bytes")


def largest_common_batch(mine: dict, base: dict) -> int | None:
    """The largest batch size both the method and the baseline completed (their speed records by batch)."""
    both = sorted(b for b, s in mine.items() if s["status"] == "ok" and base.get(b, {}).get("status") == "ok")
    return both[-1] if both else None


def speedups(mine: dict, base: dict) -> tuple[float | None, float | None, int | None]:
    """(decode speedup, prefill speedup, at which batch): the baseline's time over the method's."""
    at = largest_common_batch(mine, base)
    if at is None:
        return None, None, None
    return (base[at]["decode_step_median_s"] / mine[at]["decode_step_median_s"],
            base[at]["prefill_s"] / mine[at]["prefill_s"], at)


def speed_rows(mine: dict, base: dict, **identity) -> list[dict]:
    """One row per batch size of the method's speed records, with the decode speedup over the baseline's record
    of the same batch; `identity` (model, method, ...) leads each row."""
    rows = []
    for batch, s in sorted(mine.items()):
        b = base.get(batch, {})
        rows.append({
            **identity, "batch": batch, "status": s["status"], "context": s["context"],
            **({k: s[k] for k in OK_FIELDS} if s["status"] == "ok" else {}),
            "decode_speedup": (b["decode_step_median_s"] / s["decode_step_median_s"]
                               if s["status"] == "ok" and b.get("status") == "ok" else None),
        })
    return rows


def speed_lines(content: dict) -> list[str]:
    """The speed per batch size as markdown rows."""
    lines = header(["Model", "Method", "Batch", "Context", "Prefill tok/s", "Decode step", "Decode tok/s", "Speedup",
                    "Peak memory", "Floor step", "x floor"])
    for s in content["speed"]:
        if s["status"] != "ok":
            lines.append(f"| {s['model']} | {s['method']} | {s['batch']} | {s['context']} | out of memory |"
                         + " |" * 6)
            continue
        lines.append(
            f"| {s['model']} | {s['method']} | {s['batch']} | {s['context']} | {s['prefill_tok_s']:.1f} | "
            f"{s['decode_step_median_s'] * 1e3:.2f} ms | {s['decode_tok_s']:.1f} | "
            f"{fmt(s['decode_speedup'], '.2f', 'x')} | {human_bytes(s['peak_memory_bytes'])} | "
            f"{s['floor_step_s'] * 1e3:.3f} ms | {s['times_floor']:.1f} |")
    return lines


def relative(rows: list[dict], uncompressed: str) -> None:
    """Each row's average accuracy relative to the uncompressed model's (its row of the same model whose recipe is
    `uncompressed`), over the tasks both have: row["relative"]."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["recipe"] == uncompressed and r["accuracy"]),
                    None)
        common = [t for t in row["accuracy"] if base and t in base["accuracy"]]
        row["relative"] = (statistics.mean(row["accuracy"][t] for t in common)
                           / statistics.mean(base["accuracy"][t] for t in common)) if common else None


def dropped(decisions) -> dict:
    """How many blocks, MoE layers and experts a model's moekern decisions removed."""
    d = decisions or {}
    original = d.get("original_num_experts") or 0
    experts = sum(original - len(k) for k in d.get("kept_experts") or [] if k is not None)
    return {"blocks": len(d.get("dropped_blocks") or []), "moe_layers": len(d.get("dropped_moe_layers") or []),
            "experts": experts}
