"""The `moekern` command as a newcomer meets it: help, the main job, and mistakes answered without a traceback."""

import json
import subprocess
import sys

import pytest


def moekern(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moekern", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_help_names_the_commands():
    result = moekern("--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "shipped" in result.stdout and "paper" in result.stdout
    assert moekern().returncode == 0  # no command: the same help, not an error


@pytest.mark.parametrize(
    "args,message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["info", "/no/such/model"], "does not exist"),
        (["info", "--max-new-tokens", "0"], "expected a positive integer"),
        (["info", "--dtype", "int3"], "invalid choice: 'int3'"),
        (["paper", "--tasks", "nope"], "unknown task 'nope'"),
        (["paper", "--batch-sizes", "0"], "expected comma-separated positive integers"),
    ],
)
def test_bad_invocations_say_what_is_wrong(args, message):
    result = moekern(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_a_model(tmp_path):
    result = moekern("info", str(tmp_path))
    assert result.returncode == 2
    assert "has no config.json" in result.stderr and "Traceback" not in result.stderr


def test_info_reports_the_shipped_model(tmp_path, shipped):
    from moekern.perplexity import perplexity
    from moekern.shipped import heldout_text

    result = moekern("info", "--ppl-tokens", "1024", "--max-new-tokens", "8", "--json", str(tmp_path / "info.json"))
    assert result.returncode == 0, result.stderr
    facts = json.loads((tmp_path / "info.json").read_text())
    for key in ("parameters", "weights", "peak memory", "perplexity", "sample"):
        assert key in result.stdout
    model, tokenizer = shipped
    assert facts["heldout_tokens"] == 1024
    expected = perplexity(model, tokenizer, heldout_text(), seq_len=256, max_tokens=1024)
    assert abs(facts["perplexity"] - expected) <= 1e-4 * expected
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["layers"] == 8 and facts["experts"] == 8 and facts["top_k"] == 2
    assert facts["peak_memory_bytes"] > facts["weight_bytes"] > 0
    assert facts["sample"].startswith("The with statement") and len(facts["sample"]) > len("The with statement")
