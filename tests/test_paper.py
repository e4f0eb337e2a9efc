"""moekern paper end to end on the shipped model with the smallest settings, every number of its report traced back to
its JSON lines; the block-wise similarity matrix against an independent computation; the calibration statistics
shared across recipes only where that is exact."""

import copy
import json
import math

import pytest
import torch
from tiny_models import tiny_model

from moekern import surgery
from moekern.cli import main

RECIPES = "layer-drop=2,rtn4+block-drop=1,rtn4,bogus=3"


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def table(markdown: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose first column is headed `first_header`: {first cell: the other cells}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    assert main(["paper", "shipped", "--recipes", RECIPES, "--samples", "4", "--seq-len", "32", "--context", "16",
                 "--batch-sizes", "1", "--decode-tokens", "2", "--limit", "4", "--matrix-tokens", "64",
                 "--device", "cpu", "--finetune-steps", "2", "--finetune-batch", "2", "--out", str(out)]) == 0
    return out


def test_paper_report_numbers_come_from_the_records(paper_run):
    out = paper_run
    lines = records(out / "paper.jsonl")
    (run,) = [r for r in lines if r["kind"] == "run"]
    assert run["command"] == "paper" and run["calibration"]["samples"] == 4 and run["context"] == 16
    models = {r["row"]: r for r in lines if r["kind"] == "model"}
    status = {r["row"]: r for r in lines if r["kind"] == "row"}
    speed = {r["row"]: r for r in lines if r["kind"] == "speed" and not r.get("repeat")}
    (again,) = [r for r in lines if r["kind"] == "speed" and r.get("repeat")]  # the baseline, timed at the end too
    evals = {(r["row"], r["task"]): r["value"] for r in lines if r["kind"] == "eval"}
    assert sorted(models) == [0, 1, 2, 3] and [status[i]["status"] for i in range(5)] == ["ok"] * 4 + ["error"]
    assert "unknown recipe step 'bogus=3'" in status[4]["error"] and status[4]["stage"] == "compress"
    assert models[0]["variant"] == "transformers" and models[1]["decisions"]["dropped_moe_layers"] != []
    assert models[2]["recipe"] == "rtn4+block-drop=1" and len(models[2]["decisions"]["dropped_blocks"]) == 1

    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    rows = {r["row"]: r for r in report["rows"]}
    paper = table(markdown, "Method")  # the first table: the paper's comparison
    table3 = dict(list(table(markdown.split("## Speed, FLOPs")[1], "Method").items()))
    base_params = models[0]["size"]["parameters"]
    for i in range(4):
        ppl = evals[(i, "moekern_heldout_ppl")]
        mc = evals[(i, "moekern_heldout_mc")]
        speedup = speed[0]["decode_step_median_s"] / speed[i]["decode_step_median_s"]
        removed = 1 - models[i]["size"]["parameters"] / base_params
        assert rows[i]["perplexity"] == ppl and rows[i]["accuracy"]["moekern_heldout_mc"] == mc
        assert rows[i]["decode_speedup"] == pytest.approx(speedup)
        assert rows[i]["weight_bytes"] == models[i]["weight_bytes"] and rows[i]["flops"] == models[i]["flops"]
        label = models[i]["label"]
        cells = paper[label]
        assert cells[4] == f"{ppl:.2f}" and cells[2] == f"{100 * removed:.1f}%"
        assert cells[6] == f"{100 * mc:.1f}"
        if i:
            assert cells[5] == f"{100 * (ppl / evals[(0, 'moekern_heldout_ppl')] - 1):+.1f}%"
        t3 = table3[label]
        assert t3[0] == f"{speedup:.2f}x (b=1)" and t3[-1] == f"{ppl:.2f}"
    assert report["steadiness"]["end_s"] == again["decode_step_median_s"]
    assert report["steadiness"]["start_s"] == speed[0]["decode_step_median_s"]
    assert "failed (compress)" in paper["bogus=3"][1]
    assert "say nothing about GPU kernels" in markdown
    for png in ("ppl_vs_weights", "speed_vs_batch", "speedup_vs_memory", "accuracy_vs_dropped", "layer_similarity",
                "block_similarity", "drop_sweeps", "recipes_dropped"):
        assert (out / f"{png}.png").stat().st_size > 0 and f"({png}.png)" in markdown

    # the report follows the file: change a recorded number and write the report again
    doubled = [{**r, "value": 2 * r["value"]} if r["kind"] == "eval" and r["row"] == 1
               and r["task"] == "moekern_heldout_ppl" else r for r in lines]
    edited = out / "edited"
    edited.mkdir()
    (edited / "paper.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doubled))
    assert main(["report", str(edited)]) == 0
    again = table((edited / "report.md").read_text(), "Method")
    assert again[models[1]["label"]][4] == f"{2 * evals[(1, 'moekern_heldout_ppl')]:.2f}"


def test_paper_statistics_are_shared_exactly(paper_run, shipped):
    """The rows reuse one calibration pass; the decisions are those of compressing from scratch."""
    import moekern
    from moekern.compression.calibration import calibration_blocks
    from moekern.compression.recipe import run_recipe

    lines = records(paper_run / "paper.jsonl")
    models = {r["row"]: r for r in lines if r["kind"] == "model"}
    (stats,) = [r for r in lines if r["kind"] == "stats"]
    assert any("statistics of the uncompressed model" in u for u in models[1]["reused"])
    assert any("the rtn4 model" in u for u in models[2]["reused"])
    (prefix,) = [r for r in lines if r["kind"] == "prefix"]  # rtn4 made once for rows 2 and 3
    assert prefix["step"] == "rtn4"

    model, tokenizer = shipped
    ids = calibration_blocks(tokenizer, None, 4, 32, 0)
    for row, recipe in ((1, "layer-drop=2"), (2, "rtn4+block-drop=1")):
        fresh = moekern.patch(copy.deepcopy(model))
        d = surgery.decisions(run_recipe(fresh, recipe, ids, inplace=True).model)
        for key in ("dropped_moe_layers", "dropped_blocks", "kept_experts"):
            assert models[row]["decisions"][key] == d[key]
    # the sweep of Layer Drop counts holds the recipe's choice
    assert stats["sweeps"]["layer_drop"]["2"] == models[1]["decisions"]["dropped_moe_layers"]
    matrix = torch.tensor(stats["block_matrix"])
    assert matrix.shape == (9, 9) and stats["block_matrix_tokens"] == 64
    assert torch.allclose(matrix, matrix.T) and torch.allclose(matrix.diagonal(), torch.ones(9, dtype=matrix.dtype))


def test_block_matrix_matches_an_independent_computation():
    from moekern.compression.trimming.stats import measure

    model = tiny_model("mixtral")  # 3 layers
    ids = torch.randint(3, 97, (5, 12), generator=torch.Generator().manual_seed(1))
    states = []

    def grab_input(module, args, kwargs):
        states.append(kwargs.get("hidden_states", args[0] if args else None).flatten(0, 1).double())

    def grab_output(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output).flatten(0, 1).double())

    layers = surgery.decoder_layers(model)
    handles = [layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(grab_output) for layer in layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # one ordinary forward of every block, all calibration rows at once
    for handle in handles:
        handle.remove()
    hidden = torch.stack(states)  # [4, 60, H]: the input, then after each of the 3 blocks

    def expected(tokens):
        h = hidden[:, tokens]
        return torch.tensor([[torch.nn.functional.cosine_similarity(h[a], h[b], dim=-1).mean().item()
                              for b in range(len(h))] for a in range(len(h))], dtype=torch.float64)

    plain = measure(model, ids, batch_size=2, record_tokens=False)
    full = measure(model, ids, batch_size=2, record_tokens=False, block_tokens=10_000)  # three uneven batches
    assert plain.block_matrix is None and full.block_matrix_tokens == 60
    assert torch.allclose(full.block_matrix, expected(torch.arange(60)), atol=1e-6)
    for i, layer in full.layers.items():  # its first off-diagonal is Block Drop's score; nothing else changes
        assert full.block_matrix[i, i + 1].item() == pytest.approx(layer.block_similarity, abs=1e-6)
        assert (layer.s_m, layer.s_nm, layer.block_similarity) == (plain.layers[i].s_m, plain.layers[i].s_nm,
                                                                   plain.layers[i].block_similarity)
        assert torch.equal(layer.expert_scores, plain.layers[i].expert_scores)
    few = measure(model, ids, batch_size=2, record_tokens=False, block_tokens=7)  # 7 evenly spaced tokens
    tokens = torch.linspace(0, 59, 7).round().long()
    assert few.block_matrix_tokens == 7 and torch.allclose(few.block_matrix, expected(tokens), atol=1e-6)


def test_run_recipe_reuses_statistics_only_when_exact():
    from moekern.compression.recipe import run_recipe
    from moekern.compression.trimming.stats import measure

    model = tiny_model("mixtral")
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    stats = measure(model, ids, record_tokens=False, block_tokens=16)
    shared = run_recipe(copy.deepcopy(model), "layer-drop=1", ids, base_stats=stats)
    alone = run_recipe(copy.deepcopy(model), "layer-drop=1", ids)
    assert shared.stats is stats and alone.stats is not stats
    assert surgery.decisions(shared.model)["dropped_moe_layers"] == surgery.decisions(alone.model)["dropped_moe_layers"]
    # measured otherwise: enumeration pruning records tokens; another calibration tensor; a step after slimming
    assert run_recipe(copy.deepcopy(model), "enum-prune=4", ids, base_stats=stats).stats is not stats
    assert run_recipe(copy.deepcopy(model), "layer-drop=1", ids.clone(), base_stats=stats).stats is not stats
    assert run_recipe(copy.deepcopy(model), "wanda=0.5+layer-drop=1", ids, base_stats=stats).stats is not stats


def test_compress_report_has_the_block_matrix(tmp_path):
    out = tmp_path / "l1"
    assert main(["compress", "shipped", "--recipe", "layer-drop=1", "--samples", "2", "--seq-len", "32",
                 "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "compress_report.json").read_text())
    matrix = data["stats_before_trimming"]["block_matrix"]
    assert len(matrix) == 9 and data["stats_before_trimming"]["block_matrix_tokens"] == 64
    assert all(math.isclose(matrix[i][i], 1.0) for i in range(9))
    assert (out / "block_matrix.png").stat().st_size > 0 and "block_matrix.png" in (out / "compress_report.md").read_text()


def test_an_interrupted_paper_run_keeps_what_it_measured(tmp_path, monkeypatch):
    from moekern.bench import paper

    measure_row = paper.Paper._measure_row

    def interrupted(self, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return measure_row(self, index, *args, **kwargs)

    monkeypatch.setattr(paper.Paper, "_measure_row", interrupted)
    assert main(["paper", "--recipes", "block-drop=1,layer-drop=1", "--samples", "2", "--seq-len", "16",
                 "--context", "8", "--batch-sizes", "1", "--decode-tokens", "1", "--limit", "2", "--device", "cpu",
                 "--out", str(tmp_path)]) == 130
    lines = records(tmp_path / "paper.jsonl")
    assert [r["row"] for r in lines if r["kind"] == "row"] == [0, 1]
    rows = table((tmp_path / "report.md").read_text(), "Method")  # written on the way out
    assert list(rows) == ["Baseline (transformers)", "+ B1/8"]


def test_paper_finetune_section(paper_run):
    """Section 8: the rows of FINETUNE_RECIPES among --recipes are fine-tuned after they are measured, and
    finetune.md gives held-out perplexity before compression, after it and after fine-tuning."""
    from moekern.bench.paper_finetune import FINETUNE_LR

    out = paper_run
    lines = records(out / "paper.jsonl")
    (tuned,) = [r for r in lines if r["kind"] == "finetune"]  # layer-drop=2 is the one fine-tuned row here
    assert tuned["recipe"] == "layer-drop=2" and tuned["status"] == "ok", tuned
    assert tuned["budget"] == {"steps": 2, "global_batch": 2, "lr": FINETUNE_LR} and tuned["eval_tokens"] == 4 * 256
    evals = {(r["row"], r["task"]): r["value"] for r in lines if r["kind"] == "eval"}
    report = json.loads((out / "finetune.json").read_text())
    (row,) = report["rows"]
    assert row["baseline"] == evals[(0, "moekern_heldout_ppl")] and row["compressed"] == tuned["perplexity"]["before"]
    assert abs(row["compressed"] - evals[(tuned["row"], "moekern_heldout_ppl")]) <= 1e-3 * row["compressed"]
    closed = 100 * (row["compressed"] - row["finetuned"]) / (row["compressed"] - row["baseline"])
    assert abs(row["gap_closed_pct"] - closed) < 1e-9
    rows = table((out / "finetune.md").read_text(), "Method")
    assert rows[tuned["label"]][0] == "`layer-drop=2`" and rows[tuned["label"]][3] == f"{row['finetuned']:.2f}"

