"""moekern eval: lm-eval on the in-memory shipped model through the offline task, held-out perplexity, and clear
messages for an unknown task or a dataset that is not on disk."""

import json

import pytest

from moekern.cli import main
from moekern.errors import MoekernError
from moekern.eval import harness
from moekern.eval.tasks import heldout_mc


def test_eval_offline_tasks_on_the_shipped_model(tmp_path, capsys):
    assert main(["eval", "shipped", "--tasks", "moekern_heldout_mc,moekern_heldout_ppl", "--limit", "4",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    results = {r["task"]: r for r in lines if r["kind"] == "eval"}
    mc, ppl = results["moekern_heldout_mc"], results["moekern_heldout_ppl"]
    assert mc["metric"] == "acc" and 0.0 <= mc["value"] <= 1.0 and mc["n"] == 4 and mc["recipe"] == "none"
    assert ppl["metric"] == "perplexity" and ppl["n"] == 4 * harness.PPL_SEQ_LEN

    # the same number as moekern.perplexity on the same windows
    from moekern.perplexity import perplexity
    from moekern.shipped import heldout_text, load_model

    model, tokenizer = load_model()
    expected = perplexity(model, tokenizer, heldout_text(), harness.PPL_SEQ_LEN, max_tokens=4 * harness.PPL_SEQ_LEN)
    assert ppl["value"] == pytest.approx(expected, rel=1e-4)
    assert "moekern_heldout_mc" in capsys.readouterr().out


def test_unknown_task_lists_the_known_ones(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is moekern-runs in the current folder: not the checkout's
    assert main(["eval", "shipped", "--tasks", "arc_easy", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'arc_easy'" in err and "winogrande" in err and "moekern_heldout_mc" in err
    assert "Traceback" not in err


def test_a_missing_dataset_names_the_task_and_where_to_put_it(tmp_path):
    class NothingOnDisk:  # what lm-eval's TaskManager does offline when the dataset is absent
        def load(self, names):
            raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    with pytest.raises(MoekernError) as error:
        harness._check_dataset(NothingOnDisk(), "arc_challenge", tmp_path)
    message = str(error.value)
    assert "arc_challenge" in message and "allenai/ai2_arc" in message and "ARC-Challenge" in message
    assert f"--data-dir {tmp_path}" in message and "downloads nothing" in message


def test_data_dir_must_be_a_folder(tmp_path, capsys):
    assert main(["eval", "shipped", "--tasks", "boolq", "--data-dir", str(tmp_path / "nope"), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_every_paper_task_has_its_metric():
    assert set(harness.PAPER_TASKS) == {"arc_challenge", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte",
                                        "winogrande"}
    assert harness.metric_of("hellaswag") == "acc_norm" and harness.metric_of("boolq") == "acc"


def test_heldout_mc_is_seeded_and_well_formed(tmp_path):
    from moekern.shipped import heldout_text

    text = heldout_text()
    examples = heldout_mc.build_examples(text, seed=0)
    assert examples == heldout_mc.build_examples(text, seed=0)
    assert examples != heldout_mc.build_examples(text, seed=1)
    truth = {context: (doc, continuation) for doc, context, continuation in heldout_mc.passages(text)}
    owner = {continuation: doc for doc, _, continuation in heldout_mc.passages(text)}
    for example in examples:
        doc, continuation = truth[example["context"]]
        assert len(example["choices"]) == 4 and example["choices"][example["label"]] == continuation
        others = [c for i, c in enumerate(example["choices"]) if i != example["label"]]
        assert all(owner[c] != doc for c in others)  # distractors come from other documents
    folder = heldout_mc.write_task(tmp_path)
    assert (folder / "moekern_heldout_mc.yaml").read_text().startswith("task: moekern_heldout_mc")
    assert len((folder / "moekern_heldout_mc.jsonl").read_text().splitlines()) == len(examples)
