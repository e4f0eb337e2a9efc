"""Calibration token blocks for the methods that look at data (similarities, routing scores, AWQ, GPTQ...).

    ids = calibration_blocks(tokenizer)                          # 128 x 2048 tokens of the shipped corpus
    ids = calibration_blocks(tokenizer, "c4-train.00000-of-01024.json.gz", samples=128, seq_len=2048, seed=0)

Where the text comes from (nothing is ever downloaded):
  None                    the shipped training corpus (moekern.shipped.train_text(), documents split on
                          <|endoftext|>)
  a .txt file             plain text; documents separated by <|endoftext|> if the file has it, else one document
  a .jsonl / .json file   JSON lines with a "text" field (C4's shards, the paper's choice), or a JSON list of such
                          records; also gzip-compressed (.jsonl.gz, .json.gz)
  a .parquet file         its "text" column
  a folder                a `datasets` dataset saved with save_to_disk (its "train" split if it is a DatasetDict)

How blocks are made: the documents are shuffled with `seed`, tokenized one by one (no special tokens) and joined with
the tokenizer's EOS token, until there are enough tokens for `samples` blocks; the stream is then cut into
consecutive blocks of `seq_len`. Only as many documents as needed are tokenized, so a large C4 shard costs little.
The same source, tokenizer, samples, seq_len and seed give the same blocks. A corpus with fewer tokens than
samples x seq_len gives all the whole blocks it has (with a warning); one shorter than one block is an error.
"""

import gzip
import json
import random
import warnings
from pathlib import Path

import torch

from moekern.errors import MoekernError

DEFAULT_SAMPLES = 128  # the paper's (and GPTQ's, AWQ's, Wanda's) calibration size
DEFAULT_SEQ_LEN = 2048
DOC_SEPARATOR = "<|endoftext|>"  # how the shipped corpus (and GPT-2-style dumps) separate documents
TEXT_FIELD = "text"
FORMATS = ".txt, .jsonl, .json (optionally .gz), .parquet, or a folder saved by datasets.save_to_disk"


def calibration_blocks(
    tokenizer,
    source: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids LongTensor [n, seq_len] with n = samples (fewer only if the corpus is short; see the module doc)."""
    if samples <= 0 or seq_len <= 1:
        raise MoekernError(f"calibration needs samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    documents = read_documents(source)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    needed = samples * seq_len
    stream: list[int] = []
    for start in range(0, len(order), 64):  # tokenize in small batches: fast, and stops early on a big corpus
        batch = [documents[i] for i in order[start : start + 64]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(ids)
        if len(stream) >= needed:
            break
    have = len(stream) // seq_len
    name = "the shipped corpus" if source is None else repr(str(source))
    if have == 0:
        raise MoekernError(
            f"{name} has {len(stream)} tokens, fewer than one calibration block of {seq_len}; "
            f"lower --seq-len (and --samples), or give a larger corpus with --calib"
        )
    if have < samples:
        warnings.warn(
            f"{name} has {len(stream)} tokens: {have} blocks of {seq_len}, not the {samples} asked for; using {have} "
            f"(lower --samples or --seq-len to silence this)",
            stacklevel=2,
        )
    n = min(have, samples)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_documents(source: str | Path | None) -> list[str]:
    """The documents of a calibration source (see the module doc), empty ones left out."""
    if source is None:
        from moekern.shipped import train_text

        return _split(train_text())
    path = Path(source).expanduser()
    if not path.exists():
        raise MoekernError(f"calibration data {str(path)!r} does not exist; give a local file or folder ({FORMATS})")
    if path.is_dir():
        return _from_saved_dataset(path)
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if kind == ".parquet" and not compressed:
        return _from_parquet(path)
    if kind not in (".txt", ".text", ".jsonl", ".json"):
        raise MoekernError(f"calibration data {str(path)!r} has an unknown format; use {FORMATS}")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise MoekernError(f"cannot read calibration data {str(path)!r}: {exc}") from exc
    if kind in (".txt", ".text"):
        return _split(text)
    return _from_json(text, path)


def _split(text: str) -> list[str]:
    return [doc.strip() for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def _texts(records, where: str) -> list[str]:
    texts = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
            raise MoekernError(f"{where}: record {number} has no string field {TEXT_FIELD!r}; every record needs one")
        if record[TEXT_FIELD].strip():
            texts.append(record[TEXT_FIELD])
    return texts


def _from_json(text: str, path: Path) -> list[str]:
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):  # one JSON list of records
            records = json.loads(text)
        else:  # JSON lines
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise MoekernError(f"calibration data {str(path)!r} is not JSON lines ({exc})") from exc
    return _texts(records, repr(str(path)))


def _from_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid (a ValueError) or OSError
        raise MoekernError(f"cannot read parquet file {str(path)!r}: {exc}") from exc
    if TEXT_FIELD not in table.column_names:
        raise MoekernError(f"{str(path)!r} has no {TEXT_FIELD!r} column (columns: {table.column_names})")
    return [t for t in table.column(TEXT_FIELD).to_pylist() if isinstance(t, str) and t.strip()]


def _from_saved_dataset(path: Path) -> list[str]:
    import datasets

    try:
        found = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise MoekernError(
            f"{str(path)!r} is a folder but not a dataset saved by datasets.save_to_disk ({exc}); "
            f"give such a folder or a file ({FORMATS})"
        ) from exc
    if isinstance(found, datasets.DatasetDict):
        split = "train" if "train" in found else next(iter(found))
        found = found[split]
    if TEXT_FIELD not in found.column_names:
        raise MoekernError(f"dataset {str(path)!r} has no {TEXT_FIELD!r} column (columns: {found.column_names})")
    return [t for t in found[TEXT_FIELD] if isinstance(t, str) and t.strip()]
