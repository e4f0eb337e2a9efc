"""`moekern compress` killed with SIGTERM and SIGKILL at 20 points of its save (each step of moekern.folders'
replacement, and random moments while the files are written), with the atomic exchange and with the two-rename
fallback. After each kill the target holds exactly its earlier content or the complete new content (in the
fallback's window between its renames, once moekern.load's first step has put the earlier content back), a SIGTERM
leaves nothing behind, and the next run leaves no hidden folder."""

import hashlib
import json
import os
import random
import signal

import pytest
from forked import run_forked
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

import moekern
from moekern import folders
from moekern.checkpoint import resolve_model_dir
from moekern.cli import main
from moekern.shipped import MODEL_DIR

RECIPES = ("rtn4:g32", "rtn4:g64")  # two different contents of the same files
REPORTS = ("compress_report.md", "compress_report.json")  # carry timings: checked for their recipe, not byte-equal
KILL, TERM = signal.SIGKILL, signal.SIGTERM
# (step where the child kills itself, signal, atomic exchange?): every step of both ways to replace a folder
AT_STEPS = [
    ("writing", KILL, True), ("written", TERM, True), ("sealed", KILL, True), ("swapped", KILL, True),
    ("swapped", TERM, True), ("cleaned", KILL, True),
    ("writing", TERM, False), ("sealed", TERM, False), ("old-moved", KILL, False), ("old-moved", TERM, False),
    ("swapped", KILL, False), ("cleaned", KILL, False),
]
RANDOM_KILLS = 8  # and at random moments while the checkpoint is written


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small Mixtral with the shipped tokenizer: one compress takes a fraction of a second."""
    config = MixtralConfig(vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("source") / "tiny"
    moekern.save(AutoModelForCausalLM.from_config(config), folder, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR))
    return folder


def files(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def hidden_leftovers(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


def test_kills_during_the_save_leave_the_old_or_the_new_checkpoint(source, tmp_path):
    target = tmp_path / "out"

    def compress(recipe: str):
        return lambda: main(["compress", str(source), "--recipe", recipe, "--out", str(target), "--overwrite",
                             "--device", "cpu"])

    # the two complete contents, from runs nothing interrupted (the last one is where the kills start from)
    reference, seconds = {}, []
    for recipe in (RECIPES[1], RECIPES[0]):
        assert run_forked(compress(recipe), save_seconds=seconds) == 0
        reference[recipe] = files(target)
        assert hidden_leftovers(tmp_path) == []
    assert reference[RECIPES[0]]["model.safetensors"] != reference[RECIPES[1]]["model.safetensors"]

    def complete(recipe: str) -> bool:
        now = files(target)
        expected = reference[recipe]
        if set(now) != set(expected):
            return False
        same = all(now[name] == expected[name] for name in expected if name not in (*REPORTS, folders.MARKER))
        report = json.loads((target / "compress_report.json").read_text())
        marker = json.loads((target / folders.MARKER).read_text())
        return same and report["recipe"] == recipe and marker["kind"] == folders.MODEL

    rng = random.Random(0)
    longest = max(seconds)  # from the start of the save to the end of the process
    cases = AT_STEPS + [(None, rng.choice((KILL, TERM)), rng.random() < 0.5) for _ in range(RANDOM_KILLS)]
    current = RECIPES[0]
    outcomes = []
    for step, sig, exchange in cases:
        new = RECIPES[1 - RECIPES.index(current)]
        before = files(target)
        delay = None if step else rng.uniform(0.0, 0.8 * longest)
        status = run_forked(compress(new), kill_at=step, sig=sig, delay=delay, exchange=exchange)
        where = f"killed by {signal.Signals(sig).name} at {step or f'{delay:.3f} s'} (exchange={exchange})"
        if not target.exists():  # only the fallback, between its two renames: moekern.load puts it back first
            assert not exchange and step in (None, "old-moved"), where
            assert any(".out.moekern-old-" in n for n in os.listdir(tmp_path)), where
            resolve_model_dir(target)
        if files(target) == before:
            outcome = "old"
        else:
            assert complete(new), where
            outcome, current = "new", new
        outcomes.append(outcome)
        if status == 128 + TERM:  # SIGTERM unwound: nothing of the save is left
            assert hidden_leftovers(tmp_path) == [], where
        # the next run finds whatever the kill left, cleans it up, and writes its own content
        new = RECIPES[1 - RECIPES.index(current)]
        assert run_forked(compress(new)) == 0, where
        assert complete(new) and hidden_leftovers(tmp_path) == [], where
        current = new
    # the kills fell on both sides of the swap
    assert "old" in outcomes and "new" in outcomes


def test_sigterm_before_the_swap_exits_143_and_removes_the_temporary_folder(source, tmp_path):
    target = tmp_path / "fresh"
    status = run_forked(lambda: main(["compress", str(source), "--recipe", "rtn4:g32", "--out", str(target),
                                      "--device", "cpu"]), kill_at="written", sig=TERM)
    assert status == 143
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary folder, no lock file
