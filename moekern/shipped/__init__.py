"""The small Mixtral-style MoE model (and its corpus) shipped with ``moekern``.

The model (8 layers, 8 experts, top-2, ~9M parameters, byte-level BPE vocab 4096)
is trained on CPU in under 15 minutes by ``python -m moekern.shipped.train`` on
English text from CPython's documentation (``pydoc_data.topics``) and stdlib
docstrings.  The corpus files are shipped so that every machine evaluates on the
same text.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["MODEL_DIR", "CORPUS_DIR", "heldout_text", "train_text", "load_model"]

MODEL_DIR = Path(__file__).resolve().parent / "model"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

_RETRAIN_HINT = "run `python -m moekern.shipped.train` to (re)create it"


def _read_corpus(name: str) -> str:
    path = CORPUS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped corpus file {path} is missing; {_RETRAIN_HINT}")
    return path.read_text(encoding="utf-8")


def heldout_text() -> str:
    """The held-out evaluation text (documents separated by ``<|endoftext|>``)."""
    return _read_corpus("heldout.txt")


def train_text() -> str:
    """The training text (documents separated by ``<|endoftext|>``)."""
    return _read_corpus("train.txt")


def load_model(dtype: torch.dtype = torch.float32, **kwargs):
    """Load the shipped model and tokenizer; returns ``(model, tokenizer)``: ``moekern.load("shipped")`` with a
    dtype that defaults to float32.

    The model is in eval mode.  Extra keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``experts_implementation=``).
    """
    required = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in required if not (MODEL_DIR / f).is_file()]
    if missing:
        raise FileNotFoundError(f"shipped model files {missing} not found in {MODEL_DIR}; {_RETRAIN_HINT}")

    from moekern.checkpoint import load_pretrained

    return load_pretrained(MODEL_DIR, dtype, **kwargs)
