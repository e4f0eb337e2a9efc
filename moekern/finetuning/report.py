"""The report of a fine-tuning run, written beside the fine-tuned model: finetune_report.json (everything) and
finetune_report.md (what a person reads: how it was trained, held-out perplexity before and after, the loss)."""

import json
from pathlib import Path

REPORT_MD, REPORT_JSON = "finetune_report.md", "finetune_report.json"


def write_report(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / REPORT_MD).write_text(markdown(report))
    return [out / REPORT_MD, out / REPORT_JSON]


def markdown(report: dict) -> str:
    ppl = report["perplexity"]
    data, plan, settings = report["data"], report.get("plan") or {}, report["settings"]
    lines = [
        f"# Fine-tuning of {report['model']}",
        "",
        f"**{report['method']}**: {report['how']}.",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data['source']} ({data['kind']}: {data['examples']:,} examples, {data['target_tokens']:,} target "
        f"tokens{', ' + str(data['dropped']) + ' dropped' if data.get('dropped') else ''}) |",
        f"| steps | {report['steps']} of {plan.get('total_steps', '?')} ({plan.get('steps_per_epoch', '?')} per epoch), "
        f"global batch {plan.get('global_batch', '?')} x {report['seq_len']} tokens |",
        f"| schedule | lr {settings['learning_rate']:g}, {settings['lr_scheduler_type']}, warm-up ratio "
        f"{settings['warmup_ratio']:g}, weight decay {settings['weight_decay']:g}, grad clip "
        f"{settings['max_grad_norm']:g} |",
        f"| trainable | {report['trainable_parameters']:,} parameters (the model has {report['parameters']:,}, a "
        f"4-bit weight counted as the weights it holds) |",
        f"| frozen check | {report['frozen_check']['tensors']} tensors (router, 4-bit weights) bit-identical: "
        f"{'yes' if report['frozen_check']['bit_identical'] else 'NO'} |",
        f"| time | {report['train_seconds']:.1f} s training, {report['seconds']:.1f} s in all on {report['device']} |",
        "",
        f"Held-out perplexity ({report['eval']['source']}, {report['eval']['tokens']:,} tokens, windows of "
        f"{report['eval']['seq_len']}):",
        "",
        "| before | after |" + (" after, adapters unmerged |" if "after_unmerged" in ppl else ""),
        "|---|---|" + ("---|" if "after_unmerged" in ppl else ""),
        f"| {ppl['before']:.2f} | {ppl['after']:.2f} |"
        + (f" {ppl['after_unmerged']:.2f} |" if "after_unmerged" in ppl else ""),
    ]
    skip = report.get("skip")
    if skip:
        layers = sorted(skip["after"], key=int)
        lines += ["", f"Skip thresholds (quantile {skip['quantile']}) measured again on the training data after "
                      f"training; largest move {skip['max_abs_change']:.4f}:", "",
                  "| layer | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers),
                  "| before | " + " | ".join(f"{skip['before'].get(i, float('nan')):.4f}" for i in layers) + " |",
                  "| after | " + " | ".join(f"{skip['after'][i]:.4f}" for i in layers) + " |"]
    log = report.get("log") or []
    if log:
        picks = log if len(log) <= 12 else [log[round(i * (len(log) - 1) / 11)] for i in range(12)]
        lines += ["", "Training loss (mean next-token NLL of each global batch):", "",
                  "| step | " + " | ".join(str(e["step"]) for e in picks) + " |", "|---|" + "---|" * len(picks),
                  "| loss | " + " | ".join(f"{e['loss']:.3f}" for e in picks) + " |"]
    if (report.get("extra") or {}).get("command"):
        lines += ["", f"Command: `{report['extra']['command']}`."]
    if report.get("resumed_from"):
        lines += ["", f"Resumed from {report['resumed_from']}."]
    return "\n".join(lines) + "\n"
