"""moekern report: the paper's Table 3 from bench and eval runs, every number read back from the runs' JSON lines."""

import json

import pytest

from moekern.bench.records import read_records
from moekern.bench.report import build, flops_text
from moekern.cli import main

RECIPE = "layer-drop=2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    bench_dir, eval_dir = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("eval")
    assert main(["bench", "shipped", "--recipe", RECIPE, "--calib-samples", "4", "--context", "32",
                 "--batch-sizes", "1,2", "--decode-tokens", "2", "--device", "cpu", "--out", str(bench_dir)]) == 0
    for extra in ([], ["--recipe", RECIPE, "--calib-samples", "4"]):
        assert main(["eval", "shipped", *extra, "--tasks", "moekern_heldout_mc,moekern_heldout_ppl", "--limit", "4",
                     "--device", "cpu", "--out", str(eval_dir)]) == 0
    return bench_dir, eval_dir


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_numbers_come_from_the_runs(runs, tmp_path):
    bench_dir, eval_dir = runs
    assert main(["report", str(bench_dir), str(eval_dir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    bench, evals = lines(bench_dir / "bench.jsonl"), lines(eval_dir / "eval.jsonl")
    step = {(r["variant"], r["batch"]): r["decode_step_median_s"] for r in bench if r["kind"] == "speed"}
    prefill = {(r["variant"], r["batch"]): r["prefill_s"] for r in bench if r["kind"] == "speed"}
    model = {r["variant"]: r for r in bench if r["kind"] == "model"}
    acc = {(r["recipe"], r["task"]): r["value"] for r in evals if r["kind"] == "eval"}

    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["transformers", f"moekern+{RECIPE}"]
    variant = rows[f"moekern+{RECIPE}"]
    assert variant["speedup_batch"] == 2  # the largest batch both completed
    assert variant["decode_speedup"] == pytest.approx(step[("transformers", 2)] / step[(f"moekern+{RECIPE}", 2)])
    assert variant["prefill_speedup"] == pytest.approx(prefill[("transformers", 2)] / prefill[(f"moekern+{RECIPE}", 2)])
    assert rows["transformers"]["decode_speedup"] == pytest.approx(1.0)
    assert variant["flops"] == model[f"moekern+{RECIPE}"]["flops"] < model["transformers"]["flops"]
    assert variant["weight_bytes"] == model[f"moekern+{RECIPE}"]["weight_bytes"]
    assert variant["dropped"] == {"blocks": 0, "moe_layers": 2, "experts": 0}
    assert variant["accuracy"]["moekern_heldout_mc"] == acc[(RECIPE, "moekern_heldout_mc")]
    assert variant["perplexity"] == acc[(RECIPE, "moekern_heldout_ppl")]
    assert rows["transformers"]["accuracy"]["moekern_heldout_mc"] == acc[("none", "moekern_heldout_mc")]
    base_acc = acc[("none", "moekern_heldout_mc")]
    if base_acc:
        assert variant["relative"] == pytest.approx(acc[(RECIPE, "moekern_heldout_mc")] / base_acc)

    # the markdown shows the same numbers
    assert f"{variant['decode_speedup']:.2f}x (b=2)" in markdown
    assert flops_text(variant["flops"]) in markdown
    assert f"{100 * variant['accuracy']['moekern_heldout_mc']:.1f}" in markdown
    assert f"{variant['perplexity']:.2f}" in markdown
    assert "say nothing about GPU kernels" in markdown
    for png in ("speed_vs_batch.png", "speedup_vs_memory.png", "accuracy_vs_dropped.png"):
        assert (tmp_path / png).stat().st_size > 0 and png in markdown


def test_out_of_memory_rows_and_torn_lines(tmp_path):
    run = {"kind": "run", "run": "r", "command": "bench", "context": 8, "notes": []}
    model = {"kind": "model", "run": "r", "model": "m", "recipe": "none", "flops": 10, "weight_bytes": 100,
             "decisions": None}
    ok = {"kind": "speed", "run": "r", "model": "m", "recipe": "none", "status": "ok", "batch": 1, "context": 8,
          "prefill_s": 1.0, "prefill_tok_s": 8.0, "decode_step_median_s": 0.5, "decode_tok_s": 2.0,
          "peak_memory_bytes": 1, "floor_step_s": 0.1, "times_floor": 5.0, "kv_cache_bytes": 1}
    oom = {"kind": "speed", "run": "r", "model": "m", "recipe": "none", "status": "oom", "batch": 2, "context": 8,
           "error": "out of memory"}
    records = [run, {**model, "variant": "transformers"}, {**ok, "variant": "transformers"},
               {**oom, "variant": "transformers"}, {**model, "variant": "moekern"},
               {**ok, "variant": "moekern", "decode_step_median_s": 0.25}, {**oom, "variant": "moekern"}]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "spe')  # an interrupted write
    content = build(read_records([tmp_path]))
    moekern_row = next(r for r in content["rows"] if r["method"] == "moekern")
    assert moekern_row["decode_speedup"] == pytest.approx(2.0) and moekern_row["speedup_batch"] == 1
    assert [s["status"] for s in content["speed"]] == ["ok", "oom", "ok", "oom"]
    assert main(["report", str(tmp_path)]) == 0
    assert "out of memory" in (tmp_path / "report.md").read_text()


def test_report_without_runs_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
