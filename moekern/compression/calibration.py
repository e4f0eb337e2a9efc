"""Calibration token blocks for the methods that look at data (similarities, routing scores, AWQ, GPTQ...).

    ids = calibration_blocks(tokenizer)                          # 128 x 2048 tokens of the shipped corpus
    ids = calibration_blocks(tokenizer, "c4:c4-train.00000-of-01024.json.gz", samples=128, seq_len=2048, seed=0)

Where the text comes from (nothing is ever downloaded):
  None                    the shipped training corpus (moekern.shipped.train_text(), documents split on
                          <|endoftext|>)
  a .txt file             plain text; documents separated by <|endoftext|> if the file has it, else one document
  a .jsonl / .json file   JSON lines with a "text" field, or a JSON list of such records; also compressed
                          (.jsonl.gz, .json.gz, .jsonl.zst, .json.zst); records with "instruction" and "output" and no
                          "text" are Alpaca's (below)
  a .parquet file         its "text" column
  a folder                a `datasets` dataset saved with save_to_disk (its "train" split if it is a DatasetDict)

The paper's sources, named (He et al., App. A.1-A.2: C4 for trimming and pruning, Pile for AWQ, Alpaca for GPTQ), in
the formats they are published in; the name checks that the file is what it says:
  c4:PATH       a shard of allenai/c4 as published, e.g. en/c4-train.00000-of-01024.json.gz: JSON lines with "text"
                (and "url", "timestamp")
  pile:PATH     a shard of the Pile as published, e.g. val.jsonl.zst (the validation file AutoAWQ's pile-val-backup
                holds) or train/00.jsonl.zst: zstd-compressed JSON lines with "text" and "meta"
  alpaca:PATH   tatsu-lab/alpaca's alpaca_data.json (or alpaca_data_cleaned.json): one JSON list of records with
                "instruction", "input" and "output", each written as the text of AutoGPTQ's default calibration
                template (He et al.'s AutoGPTQ/quantize.py, load_data): "Instruction:\n{instruction}\nInput:\n{input}
                \nOutput:\n{output}", without the Input part when it is empty
JSON lines are read one line at a time (a Pile shard does not have to fit in memory as one string).

How blocks are made: the documents are shuffled with `seed`, tokenized one by one (no special tokens) and joined with
the tokenizer's EOS token, until there are enough tokens for `samples` blocks; the stream is then cut into
consecutive blocks of `seq_len`. Only as many documents as needed are tokenized, so a large C4 shard costs little.
The same source, tokenizer, samples, seq_len and seed give the same blocks. A corpus with fewer tokens than
samples x seq_len gives all the whole blocks it has (with a warning); one shorter than one block is an error.
(Every source is packed this way; AutoGPTQ calibrates on separate Alpaca records of their own lengths, AutoAWQ on
Pile documents of at most 512 tokens packed into blocks of 512.)
"""

import gzip
import io
import json
import random
import re
import warnings
from pathlib import Path

import torch

from moekern.errors import MoekernError, require

DEFAULT_SAMPLES = 128  # the paper's (and GPTQ's, AWQ's, Wanda's) calibration size
DEFAULT_SEQ_LEN = 2048
DOC_SEPARATOR = "<|endoftext|>"  # how the shipped corpus (and GPT-2-style dumps) separate documents
TEXT_FIELD = "text"
FORMATS = (".txt, .jsonl, .json (optionally .gz or .zst), .parquet, or a folder saved by datasets.save_to_disk; "
           "or a named source c4:PATH, pile:PATH, alpaca:PATH")
# The named sources: the fields their published records must have.
NAMED = {"c4": ("text",), "pile": ("text",), "alpaca": ("instruction", "output")}


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
    name = "the shipped corpus" if source is None else repr(str(source))
    return blocks_from_documents(tokenizer, read_documents(source), samples, seq_len, seed, name)


def blocks_from_documents(tokenizer, documents: list[str], samples: int, seq_len: int, seed: int = 0,
                          name: str = "the corpus") -> torch.Tensor:
    """calibration_blocks on documents already read (module doc: shuffled, tokenized, joined with EOS, cut)."""
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


def stdlib_sources() -> list[str]:
    """The Python standard library's top-level modules as documents, one file each (sorted by name): a second text
    that every machine with Python has, code with docstrings where the shipped corpus is documentation prose (the
    second source of `moekern paper --figures all`'s robustness figure)."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(folder.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            texts.append(text)
    if not texts:
        raise MoekernError(f"found no Python source files in {str(folder)!r}; give a second calibration source")
    return texts


def read_documents(source: str | Path | None) -> list[str]:
    """The documents of a calibration source (see the module doc), empty ones left out."""
    if source is None:
        from moekern.shipped import train_text

        return _split(train_text())
    kind, path = _named(source)
    if not path.exists():
        raise MoekernError(f"calibration data {str(path)!r} does not exist; give a local file or folder ({FORMATS})")
    if path.is_dir():
        if kind:
            raise MoekernError(f"{kind}:{path} is a folder; {kind} is read from its published file")
        return _from_saved_dataset(path)
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1] if suffixes[-1:] in ([".gz"], [".zst"]) else None
    kind_of_file = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if kind_of_file == ".parquet" and not compressed and not kind:
        return _from_parquet(path)
    if kind_of_file not in (".txt", ".text", ".jsonl", ".json") or (kind and kind_of_file in (".txt", ".text")):
        raise MoekernError(f"calibration data {str(path)!r} has an unknown format; use {FORMATS}")
    try:
        with _open_text(path, compressed) as handle:
            if kind_of_file in (".txt", ".text"):
                return _split(handle.read())
            return _texts(_json_records(handle, path), repr(str(path)), kind)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise MoekernError(f"cannot read calibration data {str(path)!r}: {exc}") from exc


def _named(source: str | Path) -> tuple[str | None, Path]:
    """("c4" | "pile" | "alpaca" | None, the path) of a source written NAME:PATH or PATH."""
    found = re.fullmatch(r"(c4|pile|alpaca):(.+)", str(source), flags=re.IGNORECASE) if isinstance(source, str) else None
    if found:
        return found.group(1).lower(), Path(found.group(2)).expanduser()
    return None, Path(source).expanduser()


def _open_text(path: Path, compressed: str | None):
    if compressed == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if compressed == ".zst":
        try:
            import zstandard
        except ImportError as exc:
            raise MoekernError(f"{str(path)!r} is zstd-compressed (the Pile's format); install zstandard "
                               f"(pip install zstandard) to read it") from exc
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def _split(text: str) -> list[str]:
    return [doc.strip() for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def alpaca_text(record: dict) -> str:
    """An Alpaca record as the text of AutoGPTQ's default calibration template (module doc)."""
    instruction, given, output = record["instruction"], record.get("input") or "", record["output"]
    if given:
        return f"Instruction:\n{instruction}\nInput:\n{given}\nOutput:\n{output}"
    return f"Instruction:\n{instruction}\nOutput:\n{output}"


def _texts(records, where: str, kind: str | None = None) -> list[str]:
    texts = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise MoekernError(f"{where}: record {number} is not a JSON object")
        if kind:
            missing = [f for f in NAMED[kind] if not isinstance(record.get(f), str)]
            if missing:
                raise MoekernError(f"{where}: record {number} has no string field {missing[0]!r}, so it is not "
                                   f"{kind} as published (fields: {', '.join(NAMED[kind])})")
        alpaca = kind == "alpaca" or (kind is None and TEXT_FIELD not in record
                                      and all(isinstance(record.get(f), str) for f in NAMED["alpaca"]))
        if alpaca:
            text = alpaca_text(record)
        elif isinstance(record.get(TEXT_FIELD), str):
            text = record[TEXT_FIELD]
        else:
            raise MoekernError(f"{where}: record {number} has no string field {TEXT_FIELD!r} (nor Alpaca's "
                               f"instruction/output); every record needs one")
        if text.strip():
            texts.append(text)
    return texts


def _json_records(handle, path: Path):
    """The records of a JSON list or of JSON lines, read one line at a time for the latter."""
    first = ""
    while not first.strip():
        first = handle.readline()
        if not first:
            return
    try:
        if first.lstrip().startswith("["):  # one JSON list of records
            yield from json.loads(first + handle.read())
            return
        for line in _chain(first, handle):
            if line.strip():
                yield json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoekernError(f"calibration data {str(path)!r} is not JSON lines or a JSON list ({exc})") from exc


def _chain(first: str, handle):
    yield first
    yield from handle


def _from_parquet(path: Path) -> list[str]:
    pq = require("pyarrow.parquet", "reading parquet files")

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid (a ValueError) or OSError
        raise MoekernError(f"cannot read parquet file {str(path)!r}: {exc}") from exc
    if TEXT_FIELD not in table.column_names:
        raise MoekernError(f"{str(path)!r} has no {TEXT_FIELD!r} column (columns: {table.column_names})")
    return [t for t in table.column(TEXT_FIELD).to_pylist() if isinstance(t, str) and t.strip()]


def _from_saved_dataset(path: Path) -> list[str]:
    datasets = require("datasets", "reading a saved dataset folder")

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
