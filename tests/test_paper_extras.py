"""moekern paper --figures all --tables 5,8 on the shipped model with the smallest settings. lm-eval is replaced by
a direct score of the model (perplexity and next-token accuracy on two held-out windows), so the test is quick and
every recorded number can be recomputed here: each sweep point is the model a recipe makes from scratch, the
robustness agreement is the overlap of the two sources' decisions, and the report shows the records."""

import copy
import json
import math

import pytest
import torch

from moekern import surgery
from moekern.cli import main
from moekern.compression.calibration import calibration_blocks
from moekern.compression.recipe import run_recipe
from moekern.eval import harness

SETTINGS = ["--recipes", "none", "--samples", "4", "--seq-len", "32", "--context", "16", "--batch-sizes", "1",
            "--decode-tokens", "2", "--limit", "2", "--matrix-tokens", "64", "--device", "cpu"]


def direct_scores(model, tokenizer) -> dict:
    """Perplexity and next-token accuracy of the model on the first two held-out windows of 64 tokens."""
    from moekern.perplexity import token_windows
    from moekern.shipped import heldout_text

    windows = token_windows(tokenizer, heldout_text(), 64, max_tokens=128)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    accuracy = (logits.argmax(-1) == windows[:, 1:]).double().mean()
    return {harness.HELDOUT_PPL: math.exp(float(nll)), harness.HELDOUT_MC: float(accuracy)}


@pytest.fixture(scope="module")
def extras_run(tmp_path_factory, shipped):
    _, tokenizer = shipped
    out = tmp_path_factory.mktemp("paper-extras")

    def fake_evaluate(model, tok, tasks, **kwargs):
        scores = direct_scores(model, tok)
        for task in tasks:
            yield {"task": task, "metric": harness.metric_of(task), "value": scores[task], "stderr": None, "n": 128,
                   "metrics": {}, "higher_is_better": task != harness.HELDOUT_PPL}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "evaluate", fake_evaluate)
        assert main(["paper", *SETTINGS, "--out", str(out), "--figures", "all", "--tables", "5,8"]) == 0
    lines = [json.loads(line) for line in (out / "paper.jsonl").read_text().splitlines()]
    return out, lines


def test_every_sweep_point_is_the_model_its_recipe_makes(extras_run, shipped):
    import moekern

    out, lines = extras_run
    model, tokenizer = shipped
    sweeps = {}
    for r in lines:
        if r["kind"] == "sweep":
            sweeps.setdefault(r["method"], {})[r["n"]] = r
    assert {m: sorted(v) for m, v in sweeps.items()} == {
        "none": [0], "expert-drop:global": [1, 2, 3, 4, 5, 6], "expert-drop:layerwise": [1, 2, 3, 4, 5, 6],
        "layer-drop:oneshot": list(range(1, 9)), "layer-drop:iterative": list(range(1, 9)),
        "block-drop:oneshot": list(range(1, 8)), "block-drop:iterative": list(range(1, 8))}
    ids = calibration_blocks(tokenizer, None, 4, 32, 0)
    base = moekern.patch(copy.deepcopy(model))
    for method, n, recipe in (("layer-drop:iterative", 3, "layer-drop=3:iterative"),
                              ("block-drop:iterative", 2, "block-drop=2:iterative"),
                              ("block-drop:oneshot", 4, "block-drop=4"),
                              ("expert-drop:global", 3, "expert-drop=3"),
                              ("expert-drop:layerwise", 2, "expert-drop=2:layerwise")):
        made = run_recipe(base, recipe, ids).model
        d = surgery.decisions(made)
        point = sweeps[method][n]
        assert point["dropped"] == {k: d[k] for k in ("dropped_blocks", "dropped_moe_layers", "kept_experts")}
        expected = direct_scores(made, tokenizer)
        assert point["results"][harness.HELDOUT_PPL] == pytest.approx(expected[harness.HELDOUT_PPL], rel=1e-5)


def test_robustness_and_tables(extras_run):
    out, lines = extras_run
    samples = [r for r in lines if r["kind"] == "robustness" and r["part"] == "samples"]
    sources = [r for r in lines if r["kind"] == "robustness" and r["part"] == "sources"]
    assert [r["samples"] for r in samples] == [4, 8, 16, 32, 64]
    assert [r["source"] for r in sources] == ["shipped training corpus", "Python standard library source"]
    a, b = (s["sweeps"] for s in sources)
    report = json.loads((out / "report.json").read_text())
    agree = report["extras"]["robustness"]["agreement"]
    for n, layers in a["block_drop"].items():
        assert agree["block_drop"][n] == len(set(layers) & set(b["block_drop"][n])) / len(layers)
    for n, layers in a["expert_drop"].items():
        mine = {(i, e) for i, dropped in layers.items() for e in dropped}
        theirs = {(i, e) for i, dropped in b["expert_drop"][n].items() for e in dropped}
        assert agree["expert_drop"][n] == len(mine & theirs) / len(mine)

    tables = [r for r in lines if r["kind"] == "table"]
    assert [(r["table"], r.get("recipe"), r["status"]) for r in tables] == [
        ("5", "wanda=0.5", "ok"), ("5", "sparsegpt=0.5", "ok"), ("5", "wanda=2:4", "ok"),
        ("5", "sparsegpt=2:4", "ok"), ("8", None, "skipped")]
    markdown = (out / "report.md").read_text()
    for header in ("## Expert importance scores (Fig. 11)", "## Accuracy against the number dropped",
                   "## Robustness to the calibration data (Fig. 9)", "## Table 5: pruning the experts",
                   "## Table 8: shared experts pruned or not"):
        assert header in markdown
    assert "Not made: the model has no shared experts" in markdown
    wanda = tables[0]["results"][harness.HELDOUT_PPL]
    assert f"| Wanda 50% | `wanda=0.5` | ST | " in markdown and f"| {wanda:.2f} |" in markdown
    for png in ("score_distribution", "drop_accuracy", "robustness"):
        assert (out / f"{png}.png").stat().st_size > 0 and f"({png}.png)" in markdown


def test_bad_figure_or_table_names_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["paper", "--figures", "everything"])
    assert exit_info.value.code == 2 and "--figures takes all, none or sweeps, robustness" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["paper", "--tables", "9"])


def test_table_rows_share_their_slimming_step_exactly(shipped, monkeypatch):
    from types import SimpleNamespace

    import moekern
    from moekern.bench import paper_extras
    from moekern.compression import recipe as recipe_module
    from moekern.compression.trimming.stats import measure

    model, tokenizer = shipped
    ids = calibration_blocks(tokenizer, None, 4, 32, 0)
    base = moekern.patch(copy.deepcopy(model))
    paper = SimpleNamespace(args=SimpleNamespace(allow_fewer_experts=False, seed=0), calibration=ids,
                            base=SimpleNamespace(model=base),
                            _stats=lambda root, record_tokens: measure(root.model, ids, record_tokens=record_tokens))
    extras = paper_extras.Extras(paper)
    slimming_runs = []
    original = recipe_module._slim
    monkeypatch.setattr(recipe_module, "_slim", lambda *a, **k: slimming_runs.append(1) or original(*a, **k))
    shared_slimming = 0
    for recipe, order in (("rtn4+layer-drop=2", "ST"), ("rtn4+block-drop=2", "ST"), ("rtn4+block-drop=2", "TS")):
        before = len(slimming_runs)
        shared = extras._compress(recipe, order)
        shared_slimming += len(slimming_runs) - before
        alone = run_recipe(base, recipe, ids, order).model
        for key in ("dropped_moe_layers", "dropped_blocks", "quant", "recipe", "recipe_order"):
            assert surgery.decisions(shared)[key] == surgery.decisions(alone)[key]
        x = ids[:1]
        with torch.no_grad():
            assert torch.equal(shared(input_ids=x).logits, alone(input_ids=x).logits)
    assert shared_slimming == 2  # rtn4 once for both ST rows, and once after trimming in the TS row


def test_the_sweep_figure_has_a_row_per_metric_that_was_run(tmp_path, monkeypatch):
    """A perplexity-only run (--tasks moekern_heldout_ppl) draws perplexity alone, not an empty accuracy row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekern.bench import paper_figures

    shapes = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda rows, cols, **k: shapes.append((rows, cols)) or subplots(rows, cols, **k))
    point = {"n": 1, "results": {harness.HELDOUT_PPL: 80.0, harness.HELDOUT_MC: 0.3}}
    for tasks, rows in (([], 1), ([harness.HELDOUT_MC], 2)):
        content = {"tasks": tasks, "settings": {"model": "shipped"}, "rows": [{"row": 0, "perplexity": 75.0}],
                   "extras": {"sweeps": {"none": [{"n": 0, "results": {harness.HELDOUT_PPL: 75.0}}],
                                         "layer-drop:oneshot": [point]}}}
        assert paper_figures.plot_sweeps(content, tmp_path / f"{rows}.png").stat().st_size > 0
        assert shapes[-1] == (rows, 3)
