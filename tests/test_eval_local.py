"""The paper's tasks on local dataset files (DATA_DIR/<task>/<split>.jsonl): lm-eval's own task definitions run on
the user's rows, and the accuracies equal an independent scoring of the same prompts with the shipped model."""

import json

import pytest
import torch

from moekern.cli import main
from moekern.errors import MoekernError
from moekern.eval import local_tasks

PIQA = [
    {"goal": "How do you open a file in Python?", "sol1": "Call open() with its name.",
     "sol2": "Call close() on the disk drive.", "label": 0},
    {"goal": "How do you print a value?", "sol1": "Delete the variable.", "sol2": "Call print() with it.", "label": 1},
    {"goal": "How do you import a module?", "sol1": "Use the import statement.", "sol2": "Use a return statement.",
     "label": 0},
    {"goal": "How do you define a function?", "sol1": "Write a comment.", "sol2": "Use the def keyword.", "label": 1},
    {"goal": "How do you loop over a list?", "sol1": "Use a for statement.", "sol2": "Raise an exception.",
     "label": 0},
]


def independent_piqa(model, tokenizer, rows):
    """acc and acc_norm as lm-eval defines them for PIQA, computed directly: the log-likelihood of " " + choice
    after "Question: {goal}\\nAnswer:", argmax (acc) and argmax of it over the choice's UTF-8 length (acc_norm)."""
    hits, hits_norm = [], []
    for row in rows:
        context = f"Question: {row['goal']}\nAnswer:"
        scores = []
        for choice in (row["sol1"], row["sol2"]):
            continuation = " " + choice
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            ll = sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
            scores.append((ll, ll / len(continuation.encode())))
        hits.append(max(range(2), key=lambda c: scores[c][0]) == row["label"])
        hits_norm.append(max(range(2), key=lambda c: scores[c][1]) == row["label"])
    return sum(hits) / len(rows), sum(hits_norm) / len(rows)


def test_piqa_from_a_local_file_matches_an_independent_scoring(tmp_path, shipped):
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in PIQA))
    assert main(["eval", "shipped", "--tasks", "piqa", "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                 "--dtype", "float32", "--out", str(tmp_path / "out")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    piqa = next(r for r in lines if r["kind"] == "eval" and r["task"] == "piqa")
    acc, acc_norm = independent_piqa(*shipped, PIQA)
    assert piqa["n"] == len(PIQA) and piqa["metric"] == "acc_norm"
    assert piqa["value"] == pytest.approx(acc_norm) and piqa["metrics"]["acc"] == pytest.approx(acc)


def test_local_file_errors(tmp_path):
    assert local_tasks.local_file("piqa", tmp_path) is None  # no folder for the task: the datasets cache is used
    (tmp_path / "piqa").mkdir()
    with pytest.raises(MoekernError, match="validation.jsonl"):
        local_tasks.local_file("piqa", tmp_path)  # a folder without the split the task is scored on
    (tmp_path / "mmlu").mkdir()
    with pytest.raises(MoekernError, match="datasets cache only"):
        local_tasks.local_file("mmlu", tmp_path)
    (tmp_path / "piqa" / "validation.parquet").write_bytes(b"")
    assert local_tasks.local_file("piqa", tmp_path).name == "validation.parquet"
