"""The fine-tuning section of `moekern paper` (He et al., Section 8 and Table 4): some rows' compressed models are
fine-tuned on the training data right after they are measured, and held-out perplexity before compression, after
it and after fine-tuning is recorded (kind "finetune" in paper.jsonl), with the gap to the baseline closed, in %.

The budget is small and stated (steps x global batch x tokens): on the shipped model the default is FINETUNE_STEPS
optimizer steps of 8 x 256 tokens, full fine-tuning (as the paper), learning rate FINETUNE_LR, cosine, warm-up 3%.
The paper's own settings (3 epochs at 8e-6) are `moekern finetune`'s defaults; 40 steps at 8e-6 move a model
little, so this section uses 1e-4, chosen on the shipped model (40 steps of 8 x 256): at 3e-4 the uncompressed
control got worse (held-out 75.02 -> 75.57) and so did Expert Drop 2/8 (75.53 -> 75.96); at 1e-4 the control holds
(74.75) and every trimmed row recovers. At 1e-3 even Block Drop 2/8 recovered less (92.09 -> 88.04, against 83.88
at 3e-4).

Rows:
  - a recipe of trimming steps only: its model is fine-tuned in full;
  - `none` (moekern, uncompressed): the control: the same budget on the uncompressed model tells how much of a
    recovery is only more training on the same data (the paper fine-tunes its baseline too, Table 4 "+SFT");
  - a recipe that starts with 4-bit quantization (awq4+block-drop=2): in the order trim, fine-tune, quantize: the
    fine-tuned model of its trimming steps (block-drop=2, fine-tuned in its own row) is quantized by the recipe's
    slimming step on the paper's calibration blocks. Where that model is not at hand, the 4-bit row model is
    fine-tuned by LoRA over its frozen 4-bit experts (QLoRA). The record says which.
"""

import copy
import json
import math
import time
from pathlib import Path

from moekern.errors import MoekernError

FINETUNE_RECIPES = ("none", "layer-drop=2", "block-drop=2", "expert-drop=2", "block-drop=4", "awq4+block-drop=2")
FINETUNE_STEPS = 40
FINETUNE_LR = 1e-4
FINETUNE_BATCH = 8
REPORT_MD, REPORT_JSON = "finetune.md", "finetune.json"


class FinetuneSection:
    def __init__(self, paper):
        self.paper, self.args = paper, paper.args
        self.enabled = getattr(self.args, "finetune_steps", 0) > 0
        self.tuned: dict[str, object] = {}  # 16-bit fine-tuned models that a quantized row continues from

    def config(self, lora=None):
        from moekern.finetuning import FinetuneConfig

        limit = self.args.limit
        return FinetuneConfig(max_steps=self.args.finetune_steps, learning_rate=self.args.finetune_lr,
                              per_device_train_batch_size=self.args.finetune_batch, gradient_accumulation_steps=1,
                              warmup_ratio=0.03, seed=self.args.seed, lora=lora,
                              eval_tokens=None if limit is None else limit * 256)

    def after_row(self, index: int, text: str, model, info: dict) -> None:
        """Fine-tune the row's model (in place: the row is done with it) when its recipe is one of the section's."""
        if not self.enabled or text not in self.args.finetune_recipes:
            return
        started = time.perf_counter()
        base = {"row": index, "recipe": text, "label": info.get("label", text), "model": self.paper.model_name}
        try:
            record = self._run(text, model)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the record says what failed; the next row goes on
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self.paper.writer.write("finetune", **base, status="error", error=error,
                                    seconds=round(time.perf_counter() - started, 2))
            print(f"    fine-tuning failed: {error}", flush=True)
            return
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.paper.writer.write("finetune", **base, status="ok", **record)
        ppl = record["perplexity"]
        print(f"    fine-tuned ({record['order']}): held-out perplexity {ppl['before']:.2f} -> {ppl['after']:.2f} "
              f"({record['seconds']:.0f} s)", flush=True)

    def _run(self, text: str, model) -> dict:
        from moekern.compression.recipe import Quantize, Recipe
        from moekern.finetuning import LoraSpec
        from moekern.finetuning.run import finetune

        steps = [] if text.lower() == "none" else Recipe.parse(text).ordered(self.args.order)
        slimming = [s for s in steps if s.slimming]
        rest = "+".join(str(s) for s in steps if not s.slimming) or "none"
        budget = {"steps": self.args.finetune_steps, "global_batch": self.args.finetune_batch,
                  "lr": self.args.finetune_lr}
        tokenizer, data = self.paper.tokenizer, self.args.finetune_data
        if slimming and rest in self.tuned:
            return self._quantize_tuned(text, slimming, rest, model, budget)
        lora = LoraSpec() if slimming and isinstance(slimming[0], Quantize) else None
        result = finetune(model, data, None, self.config(lora), tokenizer=tokenizer, inplace=True, progress=False)
        report = result.report
        if not slimming and text in _continued_from(self.args.finetune_recipes, self.args.order):
            self.tuned[text] = result.model  # a quantized row continues from it (trim, fine-tune, quantize)
        return {"order": "QLoRA on the 4-bit model" if lora else "fine-tune", "method": report["method"],
                "how": report["how"], "perplexity": report["perplexity"], "budget": budget,
                "tokens_per_step": self.args.finetune_batch * report["seq_len"], "seq_len": report["seq_len"],
                "loss_first": report["log"][0]["loss"], "loss_last": report["log"][-1]["loss"],
                "train_seconds": report["train_seconds"], "trainable_parameters": report["trainable_parameters"],
                "skip": report["skip"], "eval_tokens": report["eval"]["tokens"]}

    def _quantize_tuned(self, text, slimming, rest, model, budget) -> dict:
        """Trim, fine-tune, quantize: the fine-tuned `rest` model, quantized by the recipe's slimming step."""
        import moekern
        from moekern import surgery
        from moekern.compression.recipe import Recipe, compress
        from moekern.perplexity import mean_nll
        from moekern.finetuning.data import heldout_windows
        from moekern.finetuning.run import default_seq_len

        tuned = self.tuned.pop(rest)
        seq_len = default_seq_len(model, self.paper.tokenizer)
        windows, _ = heldout_windows(self.paper.tokenizer, None, seq_len, self.config().eval_tokens)
        before = math.exp(mean_nll(model, windows))
        quantized = copy.deepcopy(tuned)
        compress(quantized, Recipe(tuple(slimming)), self.paper.calibration, inplace=True, seed=self.args.seed)
        surgery.decisions(quantized)["recipe"] = text
        moekern.patch(quantized)
        after = math.exp(mean_nll(quantized, windows))
        return {"order": f"trim, fine-tune, quantize ({rest} fine-tuned in its row, then {slimming[0]})",
                "method": "full", "how": f"the fine-tuned {rest} model quantized by {slimming[0]} after fine-tuning",
                "perplexity": {"before": before, "after": after}, "budget": budget,
                "tokens_per_step": self.args.finetune_batch * seq_len, "seq_len": seq_len,
                "eval_tokens": int(windows.numel())}


def _continued_from(recipes: list[str], order: str) -> set[str]:
    """The trimming-only recipes that a fine-tuned quantized recipe continues from."""
    from moekern.compression.recipe import Recipe

    found = set()
    for text in recipes:
        try:
            steps = Recipe.parse(text).ordered(order)
        except MoekernError:
            continue
        if steps and steps[0].slimming and len(steps) > 1:
            found.add("+".join(str(s) for s in steps[1:]))
    return found


# ----------------------------------------------------------------------------------------------------------------------
# The section's report: finetune.md and finetune.json, from paper.jsonl alone
# ----------------------------------------------------------------------------------------------------------------------
def write_finetune_report(records_path, out: Path) -> list[Path]:
    """finetune.md and finetune.json in `out`, from the last run in a paper.jsonl (or in each of several, whose
    rows are then put together: one section split over processes)."""
    from moekern.bench.records import read_records

    paths = records_path if isinstance(records_path, (list, tuple)) else [records_path]
    tuned, metas, baselines = [], [], []
    for path in paths:
        records = read_records([path])
        runs = [r for r in records if r["kind"] == "run"]
        run = runs[-1]["run"] if runs else None
        records = [r for r in records if r.get("run") == run]
        tuned += [r for r in records if r["kind"] == "finetune"]
        metas += runs[-1:]
        baselines += [r["value"] for r in records if r["kind"] == "eval" and r.get("row") == 0
                      and r.get("task") == "moekern_heldout_ppl"]
    if not tuned:
        return []
    baseline = baselines[0] if baselines else None
    control = next((r for r in tuned if r["recipe"] == "none" and r["status"] == "ok"), None)
    control_after = control["perplexity"]["after"] if control else None
    rows = []
    for r in tuned:
        row = {k: r.get(k) for k in ("row", "label", "recipe", "status", "error", "order", "method", "how", "budget",
                                     "tokens_per_step", "seconds", "train_seconds", "eval_tokens", "skip")}
        if r["status"] == "ok":
            before, after = r["perplexity"]["before"], r["perplexity"]["after"]
            row.update(baseline=baseline, compressed=before, finetuned=after)
            if "after_unmerged" in r["perplexity"]:
                row["finetuned_unmerged"] = r["perplexity"]["after_unmerged"]
            if baseline is not None and r["recipe"] != "none":
                row["gap_before_pct"] = 100 * (before / baseline - 1)
                row["gap_after_pct"] = 100 * (after / baseline - 1)
                row["gap_closed_pct"] = 100 * (before - after) / (before - baseline) if before != baseline else None
                row["closer_to_baseline"] = abs(after - baseline) < abs(before - baseline)
                if control_after is not None:
                    row["gap_to_finetuned_baseline_pct"] = 100 * (after / control_after - 1)
        rows.append(row)
    order = {"none": -1, **{text: i for i, text in enumerate(FINETUNE_RECIPES)}}
    rows.sort(key=lambda row: order.get(row["recipe"], len(order)))
    meta = metas[-1] if metas else {}
    data = {"runs": [m["run"] for m in metas], "baseline_heldout_ppl": baseline, "baselines_measured": baselines,
            "control_finetuned_ppl": control_after, "rows": rows,
            "commands": [" ".join(m.get("argv") or []) for m in metas], "commits": [m.get("commit") for m in metas],
            "machine": meta.get("machine"), "threads": meta.get("threads"),
            "versions": {k: meta.get(k) for k in ("torch", "transformers", "python") if meta.get(k)},
            "section_seconds": round(sum(r.get("seconds") or 0 for r in tuned), 1)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / REPORT_MD).write_text(finetune_markdown(data))
    return [out / REPORT_MD, out / REPORT_JSON]


def finetune_markdown(data: dict) -> str:
    rows = data["rows"]
    budget = next((r["budget"] for r in rows if r.get("budget")), None)
    tokens = next((r["tokens_per_step"] for r in rows if r.get("tokens_per_step")), None)
    lines = ["# Post-finetuning (the paper's Section 8, Table 4)", ""]
    if budget:
        lines += [f"Budget per fine-tuned row: {budget['steps']} steps x {budget['global_batch']} blocks x "
                  f"{tokens // budget['global_batch']} tokens ({budget['steps'] * tokens:,} training tokens), "
                  f"learning rate {budget['lr']:g} (cosine, warm-up 3%), full fine-tuning unless the row says "
                  f"otherwise; held-out perplexity on the shipped held-out text.", ""]
    lines += ["| Method | Recipe | Held-out PPL: baseline | compressed | fine-tuned | gap to baseline | gap closed | "
              "vs fine-tuned baseline | how |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | `{r['recipe']}` | failed: {r.get('error')} | | | | | | |")
            continue
        if r["recipe"] == "none":
            lines.append(f"| {r['label']} (control) | - | {_f(r['baseline'])} | {_f(r['compressed'])} | "
                         f"{_f(r['finetuned'])} | - | - | - | {r['order']} |")
            continue
        gap = (f"{r['gap_before_pct']:+.1f}% -> {r['gap_after_pct']:+.1f}%" if "gap_before_pct" in r else "")
        closed = f"{r['gap_closed_pct']:.0f}%" if r.get("gap_closed_pct") is not None else ""
        versus = (f"{r['gap_to_finetuned_baseline_pct']:+.1f}%" if "gap_to_finetuned_baseline_pct" in r else "")
        lines.append(f"| {r['label']} | `{r['recipe']}` | {_f(r.get('baseline'))} | {_f(r['compressed'])} | "
                     f"{_f(r['finetuned'])} | {gap} | {closed} | {versus} | {r['order']} |")
    commands = [c for c in data.get("commands") or [] if c]
    if commands:
        lines += ["", f"Command{'s (one section split over processes run side by side)' if len(commands) > 1 else ''}"
                      f" ({data.get('machine')}, {data.get('threads')} threads, commit "
                      f"{', '.join(sorted({str(c) for c in data.get('commits') or []}))}):", "",
                  *[f"    {c}" for c in commands], "",
                  f"The section took {data['section_seconds']:.0f} s in all (fine-tuning and perplexity, summed over "
                  f"its rows)."]
    lines += ["", "Gap closed: (compressed - fine-tuned) / (compressed - baseline), the share of the perplexity that "
              "compression cost and fine-tuning won back (over 100%: better than the baseline). The control row "
              "fine-tunes the uncompressed model with the same budget: 'vs fine-tuned baseline' compares each "
              "fine-tuned model with it, which separates recovery from plain extra training on the same data."]
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "" if value is None else f"{value:.2f}"
