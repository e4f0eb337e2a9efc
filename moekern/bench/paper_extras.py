"""The paper's artefacts that take more than one row each, for `moekern paper`: behind --figures and --tables, so
that the default run stays short. Each result is appended to DIR/paper.jsonl as it is made (kinds "sweep",
"robustness", "table"); moekern.bench.paper_figures draws and tabulates them from there.

  --figures sweeps        Figs. 3, 5, 6 and 13-15: held-out accuracy and perplexity against the number of experts
                          (Expert Drop, global and layer-wise), MoE layers (Layer Drop) or blocks (Block Drop) dropped,
                          one-shot and iterative; every count from 0 up to what the model allows
  --figures robustness    Fig. 9: the similarities and the drop decisions on (a) more and fewer calibration samples and
                          (b) a second calibration source (--calib2; default: the Python standard library's own
                          source files), with how many decisions the two sources share at each count
  --figures all           both (Fig. 11, the importance score distribution, is in every report: it needs no extra work)
  --tables 5,6,7,8 | all  Table 5 (Wanda and SparseGPT, 50% and 2:4), Table 6 (GPTQ and AWQ, moekern's and as the
                          paper ran them), Table 7 (slimming then trimming vs trimming then slimming), Table 8 (shared
                          experts pruned or not: models with shared experts only)

Every model here is a copy of the uncompressed model the rows start from, compressed by the same library calls as a
recipe (a count n of a one-shot sweep is exactly `layer-drop=n` on the same statistics; an iterative sweep removes
one more module after measuring again, exactly as `layer-drop=n:iterative`), and evaluated like a row: the tasks and
held-out perplexity of the run (--tasks, --limit). No speed is timed.
"""

import copy
import time

from moekern.errors import MoekernError

FIGURES = ("sweeps", "robustness")
TABLES = ("5", "6", "7", "8")
SAMPLE_COUNTS = (4, 8, 16, 32, 64)  # Fig. 9a: calibration blocks (of the run's length) behind the similarities
TABLE_RECIPES = {
    "5": [("Wanda 50%", "wanda=0.5"), ("SparseGPT 50%", "sparsegpt=0.5"), ("Wanda 2:4", "wanda=2:4"),
          ("SparseGPT 2:4", "sparsegpt=2:4")],
    "6": [("GPTQ (moekern)", "gptq4"), ("GPTQ as the paper ran it (AutoGPTQ: act-order, symmetric)", "gptq4:autogptq"),
          ("AWQ (moekern)", "awq4"), ("AWQ as the paper ran it (AutoAWQ's MoE scheme)", "awq4:autoawq")],
    "7": [(f"{what}, AWQ ({order[0]}+{order[1]})", f"awq4+{recipe}", order)
          for what, recipe in (("E2", "expert-drop=2"), ("L2", "layer-drop=2"), ("B2", "block-drop=2"))
          for order in ("ST", "TS")],
    "8": [(f"{name} {pattern}, {'with' if shared else 'without'} shared experts",
           f"{method}={pattern}" + (":shared" if shared else ""))
          for pattern in ("0.5", "2:4") for method, name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT"))
          for shared in (True, False)],
}


def run(paper) -> None:
    """After the rows: the figures and tables the arguments ask for."""
    args = paper.args
    figures, tables = getattr(args, "figures", []), getattr(args, "tables", [])
    if not figures and not tables:
        return
    extras = Extras(paper)
    if "sweeps" in figures:
        extras.sweeps()
    if "robustness" in figures:
        extras.robustness()
    for table in tables:
        extras.table(table)


class Extras:
    def __init__(self, paper):
        self.paper, self.args = paper, paper.args
        self.base = paper.base.model
        self.stats = paper._stats(paper.base, record_tokens=False)
        from moekern.compression.shared import SharedCompression

        # a slimming step that comes first is made once for every table row that starts with it
        self.shared = SharedCompression(self.base, paper.calibration, allow_fewer=self.args.allow_fewer_experts,
                                        seed=self.args.seed, share_stats=False)

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, model) -> dict:
        from moekern.eval.harness import HELDOUT_PPL, evaluate

        args = self.args
        return {r["task"]: r["value"] for r in evaluate(model, self.paper.tokenizer, [*self.paper.tasks, HELDOUT_PPL],
                                                        limit=args.limit, data_dir=args.data_dir,
                                                        batch_size=args.eval_batch_size, seed=args.seed)}

    def _point(self, method: str, n: int, model, started: float) -> None:
        from moekern import surgery
        from moekern.compression.report import model_size

        d = surgery.decisions(model)
        results = self.evaluate(model)
        self.paper.writer.write(
            "sweep", method=method, n=n, results=results, size=model_size(model),
            dropped={k: d.get(k) for k in ("dropped_blocks", "dropped_moe_layers", "kept_experts")},
            seconds=round(time.perf_counter() - started, 2))
        scores = ", ".join(f"{k.removeprefix('moekern_')} {v:.4g}" for k, v in results.items())
        print(f"  {method} n={n}: {scores}", flush=True)

    def sweeps(self) -> None:
        """Figs. 3, 5, 6, 13-15."""
        from moekern.compression.trimming.depth_drop import (block_drop, block_scores, layer_drop, layer_scores,
                                                              most_similar)
        from moekern.compression.trimming.expert_drop import choose_kept_experts, expert_drop
        from moekern.models import family_of
        from moekern import surgery

        print("sweeps (Figs. 3, 5, 6, 13-15): accuracy against the number of modules dropped", flush=True)
        started = time.perf_counter()
        self._point("none", 0, self.base, started)
        top_k = family_of(self.base).router_spec(self.base.config).top_k
        allow = self.args.allow_fewer_experts
        for mode in ("global", "layerwise"):
            n = 1
            while True:
                try:
                    choose_kept_experts(self.stats, n, mode, top_k, allow)
                except MoekernError:
                    break
                started = time.perf_counter()
                model = copy.deepcopy(self.base)
                expert_drop(model, self.stats, n, mode, allow)
                self._point(f"expert-drop:{mode}", n, model, started)
                n += 1
        moe, blocks = len(self.stats.moe_layers()), len(self.stats.layers)
        for what, count, drop, scores, remove in (
                ("layer-drop", moe, layer_drop, layer_scores, surgery.remove_moe_layers),
                ("block-drop", blocks - 1, block_drop, block_scores, surgery.remove_blocks)):
            for n in range(1, count + 1):  # one-shot: the n most similar on the uncompressed model's statistics
                started = time.perf_counter()
                model = copy.deepcopy(self.base)
                drop(model, self.stats, n)
                self._point(f"{what}:oneshot", n, model, started)
            model, stats = copy.deepcopy(self.base), self.stats  # iterative: one more after measuring again
            for n in range(1, count + 1):
                started = time.perf_counter()
                if n > 1:
                    stats = stats.remeasure(model, record_tokens=False)
                remove(model, most_similar(scores(stats), 1))
                self._point(f"{what}:iterative", n, model, started)

    # ------------------------------------------------------------------------------------------------------------
    def robustness(self) -> None:
        """Fig. 9: (a) the similarities on more or fewer calibration blocks; (b) on a second source, and how many
        drop decisions the two sources share."""
        from moekern.compression.calibration import blocks_from_documents, calibration_blocks, stdlib_sources
        from moekern.compression.report import drop_sweeps
        from moekern.compression.trimming.stats import measure
        from moekern.models import family_of

        args, tokenizer = self.args, self.paper.tokenizer
        seq_len = int(self.paper.calibration.shape[1])
        print("robustness (Fig. 9): similarities and decisions on other calibration data", flush=True)
        for samples in SAMPLE_COUNTS:
            started = time.perf_counter()
            ids = calibration_blocks(tokenizer, args.calib, samples, seq_len, args.seed)
            stats = measure(self.base, ids, record_tokens=False, seed=args.seed)
            self.paper.writer.write("robustness", part="samples", samples=int(ids.shape[0]), seq_len=seq_len,
                                    source=args.calib or "shipped training corpus", layers=stats.summary(),
                                    seconds=round(time.perf_counter() - started, 2))
        top_k = family_of(self.base).router_spec(self.base.config).top_k
        samples = int(self.paper.calibration.shape[0])
        second = args.calib2 or "Python standard library source"
        ids2 = (calibration_blocks(tokenizer, args.calib2, samples, seq_len, args.seed) if args.calib2
                else blocks_from_documents(tokenizer, stdlib_sources(), samples, seq_len, args.seed, second))
        for source, stats in ((args.calib or "shipped training corpus", self.stats),
                              (second, measure(self.base, ids2, record_tokens=False, seed=args.seed))):
            self.paper.writer.write("robustness", part="sources", source=source, samples=samples, seq_len=seq_len,
                                    layers=stats.summary(), sweeps=drop_sweeps(stats, top_k, args.allow_fewer_experts))
        print(f"  similarities on {len(SAMPLE_COUNTS)} sample counts and 2 sources", flush=True)

    # ------------------------------------------------------------------------------------------------------------
    def table(self, table: str) -> None:
        from moekern.compression.report import model_size

        rows = TABLE_RECIPES[table]
        if table == "8" and not self._has_shared_experts():
            self.paper.writer.write("table", table=table, status="skipped",
                                    note="the model has no shared experts (Table 8 is DeepSeek-MoE's)")
            print("table 8: skipped, the model has no shared experts", flush=True)
            return
        print(f"table {table}", flush=True)
        for row in rows:
            label, recipe, order = (*row, "ST")[:3]
            started = time.perf_counter()
            try:
                model = self._compress(recipe, order)
                results = self.evaluate(model)
            except Exception as exc:  # noqa: BLE001 - the row says what failed; the next goes on
                self.paper.writer.write("table", table=table, label=label, recipe=recipe, order=order,
                                        status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                print(f"  {label}: failed: {exc}", flush=True)
                continue
            self.paper.writer.write("table", table=table, label=label, recipe=recipe, order=order, status="ok",
                                    results=results, size=model_size(model),
                                    seconds=round(time.perf_counter() - started, 2))
            scores = ", ".join(f"{k.removeprefix('moekern_')} {v:.4g}" for k, v in results.items())
            print(f"  {label}: {scores}", flush=True)

    def _compress(self, text: str, order: str):
        """A copy of the uncompressed model compressed by the recipe (moekern.compression.shared: a slimming step that
        comes first is the same model a fresh run would make, since it only depends on the step)."""
        return self.shared.compress(text, order).model

    def _has_shared_experts(self) -> bool:
        from moekern import surgery
        from moekern import targets

        return any(targets.routed_experts(layer) is not None and targets.always_active_linears(self.base, layer)
                   for layer in surgery.decoder_layers(self.base))
