"""Training examples from local files, and the batches the loop feeds the model.

    examples = load_examples("alpaca_gpt4.json", tokenizer, seq_len=1024)
    batch = examples.batch([4, 0, 7], pad_id=tokenizer.pad_token_id)   # input_ids, attention_mask, labels

Sources (nothing is downloaded):
  None                        the shipped corpus's training split (moekern.shipped.train_text()), packed
  a .txt file                 plain text, packed; documents separated by <|endoftext|> if the file has it
  a .jsonl / .json file       JSON lines (or one JSON list) of records: with "instruction" and "output" (and an
                              optional "input") they are Alpaca instructions; with "text" they are plain text, packed
  a .parquet file             the same records as columns
  a folder                    a `datasets` dataset saved with save_to_disk (its "train" split if it is a DatasetDict),
                              with the same columns

Plain text (language modelling): the documents are tokenized in file order without special tokens, joined with the
EOS token and cut into consecutive blocks of seq_len tokens (the incomplete tail is dropped); every token is a target.
Instructions: Stanford Alpaca's prompt template (with or without input); the loss is on the response and the EOS
after it only (the prompt's labels are -100). An example longer than seq_len is cut at seq_len; one whose prompt
alone fills seq_len has no target left and is dropped (counted in `dropped`).
"""

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moekern.errors import MoekernError, require

IGNORE = -100  # the label of a token that is not a target (transformers' and torch's ignore_index)
FORMATS = ".txt, .jsonl, .json (optionally .gz), .parquet, or a folder saved by datasets.save_to_disk"

# Stanford Alpaca's template (github.com/tatsu-lab/stanford_alpaca, train.py), as LLaMA-Factory's "alpaca" template.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict) -> str:
    if str(record.get("input") or "").strip():
        return PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclass
class Examples:
    """Tokenized examples: 1-D LongTensors of input ids and labels (IGNORE where a token is not a target)."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    kind: str  # "text" (packed blocks) or "instruction" (Alpaca)
    source: str
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return int(sum(int((lab != IGNORE).sum()) for lab in self.labels))

    def batch(self, indices, pad_id: int) -> dict[str, torch.Tensor]:
        """The examples at `indices`, right-padded to the longest (pad tokens masked out and never targets)."""
        longest = max(self.input_ids[i].numel() for i in indices)
        ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(indices), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.input_ids[i].numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = self.input_ids[i], self.labels[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def blocks(self, count: int, seq_len: int) -> torch.Tensor:
        """Up to `count` blocks [n, seq_len] of the examples' tokens laid end to end: the calibration data of a
        measurement after training (skip thresholds)."""
        stream = torch.cat(self.input_ids)
        n = min(count, stream.numel() // seq_len)
        if n == 0:
            raise MoekernError(f"the training data has {stream.numel()} tokens, fewer than one block of {seq_len}")
        return stream[: n * seq_len].view(n, seq_len)

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "examples": len(self), "dropped": self.dropped,
                "tokens": int(sum(t.numel() for t in self.input_ids)), "target_tokens": self.target_tokens}


def load_examples(source, tokenizer, seq_len: int) -> Examples:
    """The examples of a source (module doc), tokenized and cut to seq_len."""
    if seq_len < 2:
        raise MoekernError(f"seq_len must be >= 2, got {seq_len}")
    name = "the shipped training corpus" if source is None else str(source)
    records = read_records(source)
    if all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records):
        return _instructions(records, tokenizer, seq_len, name)
    texts = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise MoekernError(
                f"{name}: record {number} has neither a string 'text' field (plain text) nor 'instruction' and "
                f"'output' fields (Alpaca); it has {keys}. Every record needs one of the two forms")
        if record["text"].strip():
            texts.append(record["text"])
    return _packed(texts, tokenizer, seq_len, name)


def read_records(source) -> list:
    """The records of a source: {"text": ...} per document of a text file, or the file's / dataset's records."""
    from moekern.compression.calibration import DOC_SEPARATOR

    if source is None:
        from moekern.shipped import train_text

        return [{"text": doc} for doc in train_text().split(DOC_SEPARATOR) if doc.strip()]
    path = Path(source).expanduser()
    if not path.exists():
        raise MoekernError(f"training data {str(path)!r} does not exist; give a local file or folder ({FORMATS})")
    if path.is_dir():
        return _saved_dataset(path)
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if kind == ".parquet" and not compressed:
        return _parquet(path)
    if kind not in (".txt", ".text", ".jsonl", ".json"):
        raise MoekernError(f"training data {str(path)!r} has an unknown format; use {FORMATS}")
    try:
        with (gzip.open if compressed else open)(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise MoekernError(f"cannot read training data {str(path)!r}: {exc}") from exc
    if not text.strip():
        raise MoekernError(f"training data {str(path)!r} is empty")
    if kind in (".txt", ".text"):
        records = [{"text": doc} for doc in text.split(DOC_SEPARATOR) if doc.strip()]
    else:
        records = _json_records(text, path)
    if not records:
        raise MoekernError(f"training data {str(path)!r} holds no records")
    return records


def _json_records(text: str, path: Path) -> list:
    if text.lstrip().startswith("["):  # one JSON list (Alpaca's own alpaca_data.json)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MoekernError(f"training data {str(path)!r} is not valid JSON ({exc})") from exc
        if not isinstance(records, list):
            raise MoekernError(f"training data {str(path)!r}: expected a JSON list of records")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise MoekernError(f"training data {str(path)!r}, line {number}: not a JSON record ({exc}); "
                               f"the file must be JSON lines, one record per line, or one JSON list") from exc
    return records


def _parquet(path: Path) -> list:
    pq = require("pyarrow.parquet", "reading parquet files")

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid (a ValueError) or OSError
        raise MoekernError(f"cannot read parquet file {str(path)!r}: {exc}") from exc


def _saved_dataset(path: Path) -> list:
    datasets = require("datasets", "reading a saved dataset folder")

    try:
        found = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise MoekernError(f"{str(path)!r} is a folder but not a dataset saved by datasets.save_to_disk ({exc}); "
                           f"give such a folder or a file ({FORMATS})") from exc
    if isinstance(found, datasets.DatasetDict):
        found = found["train" if "train" in found else next(iter(found))]
    if len(found) == 0:
        raise MoekernError(f"dataset {str(path)!r} is empty")
    return list(found)


def _packed(texts: list[str], tokenizer, seq_len: int, name: str) -> Examples:
    if not texts:
        raise MoekernError(f"{name} holds no text")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(ids)
    count = len(stream) // seq_len
    if count == 0:
        raise MoekernError(f"{name} has {len(stream)} tokens, fewer than one block of {seq_len}; give more text or "
                           f"a smaller --seq-len")
    blocks = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
    rows = list(blocks.unbind(0))
    return Examples(rows, [r.clone() for r in rows], "text", name)


def _instructions(records: list[dict], tokenizer, seq_len: int, name: str) -> Examples:
    eos = tokenizer.eos_token_id
    input_ids, labels, dropped = [], [], 0
    for number, record in enumerate(records, 1):
        if not all(isinstance(record.get(k), str) for k in ("instruction", "output")) or not isinstance(
                record.get("input") or "", str):
            raise MoekernError(f"{name}: record {number}: 'instruction', 'output' (and 'input' if present) must be "
                               f"strings")
        prompt = tokenizer(alpaca_prompt(record), verbose=False)["input_ids"]  # BOS where the tokenizer adds one
        response = tokenizer(record["output"], add_special_tokens=False, verbose=False)["input_ids"]
        response = response + ([eos] if eos is not None else [])
        ids = (prompt + response)[:seq_len]
        target = ([IGNORE] * len(prompt) + response)[:seq_len]
        if all(t == IGNORE for t in target[1:]):  # the first token is never predicted
            dropped += 1
            continue
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        labels.append(torch.tensor(target, dtype=torch.long))
    if not input_ids:
        raise MoekernError(f"{name}: every one of its {len(records)} instructions has a prompt of {seq_len} tokens or "
                           f"more, so no response token is left to learn; raise --seq-len")
    return Examples(input_ids, labels, "instruction", name, dropped)


def heldout_windows(tokenizer, source, seq_len: int, max_tokens: int | None):
    """Windows [n, seq_len] of held-out text for perplexity: the shipped held-out text by default, or the text of
    a file (plain text, or the "text" fields of records)."""
    from moekern.perplexity import token_windows

    if source is None:
        from moekern.shipped import heldout_text

        text, name = heldout_text(), "the shipped held-out text"
    else:
        records = read_records(source)
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
            raise MoekernError(f"evaluation data {str(source)!r}: give plain text (a .txt file, or records with a "
                               f"'text' field)")
        text, name = "\n\n".join(r["text"] for r in records), str(source)
    try:
        return token_windows(tokenizer, text, seq_len, max_tokens=max_tokens), name
    except ValueError as exc:
        raise MoekernError(f"{name}: {exc}; give more held-out text or a smaller --seq-len") from exc
