"""The small model that ships inside the package: it loads offline, scores its held-out text as recorded, and
moekern's patched path gives transformers' own output on it."""

import json

import torch
from tiny_models import rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekern.perplexity import perplexity
from moekern.patching import patch, unpatch
from moekern.shipped import MODEL_DIR, heldout_text

# The recorded figure may move by this much between machines and library versions (fp32 summation order).
PPL_RELATIVE_BOUND = 0.01


def test_loads_with_plain_transformers_from_the_package_folder():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 8, 2)
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert tokenizer.decode(tokenizer("The with statement").input_ids) == "The with statement"


def test_heldout_perplexity_is_the_recorded_one(shipped):
    model, tokenizer = shipped
    recorded = json.loads((MODEL_DIR / "TRAINING.json").read_text())["heldout_perplexity"]
    measured = perplexity(model, tokenizer, heldout_text(), seq_len=256)
    assert abs(measured - recorded) <= PPL_RELATIVE_BOUND * recorded, (measured, recorded)


def test_patched_shipped_model_equals_transformers(shipped):
    model, tokenizer = shipped
    ids = tokenizer(heldout_text()[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        expected = model(ids).logits
        patch(model)
        try:
            got = model(ids).logits
        finally:
            unpatch(model)
    assert rel_err(got, expected) <= 1e-5


def test_training_script_runs_and_learns(tmp_path):
    """python -m moekern.shipped.train, on a 20-second budget: it trains, saves a model transformers loads, and the
    model already beats a uniform guess over the vocabulary on the held-out text."""
    from moekern.shipped import train

    train.main(["--out", str(tmp_path), "--minutes", "0.35", "--reserve-seconds", "12", "--experts-impls", "eager"])
    record = json.loads((tmp_path / "TRAINING.json").read_text())
    vocab = record["config"]["vocab_size"]
    assert record["steps"] > 0 and record["heldout_perplexity"] < vocab
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size == vocab
