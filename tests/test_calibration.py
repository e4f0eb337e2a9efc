"""Calibration blocks: every source format gives the same documents, blocks are the documents joined by EOS and cut,
the seed decides the choice, and a user's mistake gets a message that says what to do."""

import gzip
import json

import pytest
import torch

from moekern.compression.calibration import calibration_blocks, read_documents
from moekern.errors import MoekernError

DOCS = [f"Document number {i} talks about the with statement and context managers, line {i}." * 3 for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from moekern.shipped import MODEL_DIR

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def write_all_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["txt"] = tmp_path / "docs.txt"
    paths["txt"].write_text("<|endoftext|>".join(DOCS))
    lines = "\n".join(json.dumps({"text": d, "url": "x"}) for d in DOCS) + "\n"
    paths["jsonl"] = tmp_path / "docs.jsonl"
    paths["jsonl"].write_text(lines)
    paths["json.gz"] = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(paths["json.gz"], "wt") as handle:
        handle.write(lines)
    paths["json list"] = tmp_path / "docs.json"
    paths["json list"].write_text(json.dumps([{"text": d} for d in DOCS]))
    paths["parquet"] = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS}), paths["parquet"])
    paths["saved dataset"] = tmp_path / "saved"
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})})
    saved.save_to_disk(str(paths["saved dataset"]))
    return paths


def test_every_format_reads_the_same_documents(tmp_path):
    for kind, path in write_all_formats(tmp_path).items():
        assert read_documents(path) == DOCS, kind


def test_blocks_are_the_documents_joined_by_eos_and_cut(tmp_path, tokenizer):
    paths = write_all_formats(tmp_path)
    blocks = calibration_blocks(tokenizer, paths["jsonl"], samples=5, seq_len=32, seed=3)
    assert blocks.shape == (5, 32) and blocks.dtype == torch.long
    assert torch.equal(blocks, calibration_blocks(tokenizer, paths["parquet"], samples=5, seq_len=32, seed=3))
    # Between two EOS tokens lies one whole document, tokenized on its own.
    stream = blocks.flatten().tolist()
    eos = tokenizer.eos_token_id
    cuts = [i for i, t in enumerate(stream) if t == eos]
    assert len(cuts) >= 2
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    for a, b in zip(cuts, cuts[1:]):
        assert stream[a + 1 : b] in encoded


def test_one_document_gives_its_own_tokens(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text(DOCS[0] * 4)
    ids = tokenizer(DOCS[0] * 4, add_special_tokens=False)["input_ids"]
    blocks = calibration_blocks(tokenizer, path, samples=2, seq_len=40)
    assert blocks.flatten().tolist() == ids[:80]


def test_the_seed_decides_the_blocks(tokenizer):
    a = calibration_blocks(tokenizer, samples=4, seq_len=64, seed=0)  # the shipped corpus
    assert a.shape == (4, 64)
    assert torch.equal(a, calibration_blocks(tokenizer, samples=4, seq_len=64, seed=0))
    assert not torch.equal(a, calibration_blocks(tokenizer, samples=4, seq_len=64, seed=1))


def test_a_short_corpus_gives_what_it_has_with_a_warning(tmp_path, tokenizer):
    path = write_all_formats(tmp_path)["txt"]
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS) + len(DOCS) - 1
    with pytest.warns(UserWarning, match="not the 1000 asked for"):
        blocks = calibration_blocks(tokenizer, path, samples=1000, seq_len=64)
    assert blocks.shape == (total // 64, 64)


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("data.csv", "text\nhello\n", "unknown format"),
    ("data.jsonl", '{"content": "no text field"}\n', "no string field 'text'"),
    ("data.jsonl", "not json\n", "is not JSON lines"),
    ("tiny.txt", "just a few words", "fewer than one calibration block of 2048"),
])
def test_mistakes_say_what_to_do(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(MoekernError, match=message) as caught:
        calibration_blocks(tokenizer, path, samples=8, seq_len=2048)
    if "block" in message:
        tokens = len(tokenizer(content, add_special_tokens=False)["input_ids"])
        assert f"has {tokens} tokens" in str(caught.value) and "--seq-len" in str(caught.value)


def test_a_folder_that_is_not_a_saved_dataset(tmp_path, tokenizer):
    with pytest.raises(MoekernError, match="not a dataset saved by datasets.save_to_disk"):
        calibration_blocks(tokenizer, tmp_path, samples=1, seq_len=8)
