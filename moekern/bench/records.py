"""Results as JSON lines, appended and flushed as each is measured: an interrupted run keeps every line it made.
Every record has a `kind` (run, model, speed, eval, ...) and the `run` id of the command that made it.

A kill while a line is written leaves it torn: the last line of the file, without its newline. The next writer cuts
it off before appending (so it never ends up in the middle), and read_records skips it with a note. Any other line
that cannot be read (not UTF-8, not JSON) is corruption: read_records refuses the file, naming the lines; a record
that lacks the fields the reports read (FIELDS) is an error naming its file and line."""

import json
import sys
import time
import uuid
import warnings
from pathlib import Path

from moekern.errors import MoekernError


class RecordWriter:
    def __init__(self, out_dir: Path, filename: str):
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        cut = cut_torn_line(self.path)
        if cut:
            print(f"moekern: {self.path}: removed the incomplete last line ({cut} bytes) that an interrupted run "
                  f"left", file=sys.stderr)

    def write(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "run": self.run, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
        return record


def cut_torn_line(path: Path) -> int:
    """Truncate `path` after its last newline if a torn line follows it; returns the bytes removed."""
    try:
        with path.open("rb+") as f:
            size = f.seek(0, 2)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            end = size
            while end > 0:  # back to the last newline, a block at a time
                start = max(0, end - 65536)
                f.seek(start)
                found = f.read(end - start).rfind(b"\n")
                if found >= 0:
                    end = start + found + 1
                    break
                end = start
            f.truncate(end)
            return size - end
    except FileNotFoundError:
        return 0


NUMBER = (int, float)
# The fields every record of a kind carries, with their types (None: also null), as the reports index them.
FIELDS = {
    "run": {"command": str},
    "model": {"model": str},
    "speed": {"batch": int, "status": str, "context": int},
    "eval": {"task": str, "value": (*NUMBER, type(None))},
    "row": {"row": int, "status": str},
}
SPEED_OK = {"prefill_s": NUMBER, "prefill_tok_s": NUMBER, "decode_step_median_s": NUMBER, "decode_tok_s": NUMBER}
PAPER_RUN = {"model": str, "device": str, "dtype": str, "context": int, "batch_sizes": list, "decode_tokens": int,
             "tasks": list, "calibration": dict, "order": str}


def check_record(record, where: str) -> None:
    """Raise MoekernError (naming `where`: file and line) if `record` is not a record the reports can read."""
    if not isinstance(record, dict):
        raise MoekernError(f"{where}: a record must be a JSON object, got {type(record).__name__}; the file is "
                           f"damaged or is not moekern's")
    fields = {"kind": str, "run": str, **FIELDS.get(record.get("kind"), {})}
    if record.get("kind") == "speed" and record.get("status") == "ok":
        fields.update(SPEED_OK)
    if record.get("kind") == "run" and record.get("command") == "paper":
        fields.update(PAPER_RUN)
    for key, types in fields.items():
        value = record.get(key, ...)
        if value is ...:
            raise MoekernError(f"{where}: the {record.get('kind', '?')} record lacks the field {key!r}; the file is "
                               f"damaged or is not moekern's")
        if not isinstance(value, types) or isinstance(value, bool):  # (an inf perplexity is data, not damage)
            raise MoekernError(f"{where}: field {key!r} of the {record.get('kind', '?')} record is {value!r}, not a "
                               f"{_type_names(types)}; the file is damaged or is not moekern's")


def _type_names(types) -> str:
    names = {int: "whole number", float: "number", str: "string", list: "list", dict: "object", type(None): "null"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def read_records(paths, notes: list | None = None) -> list[dict]:
    """All records of the *.jsonl files in the given run folders (or files). A torn last line (an interrupted run)
    is skipped with a note (appended to `notes`, else a warning); unreadable lines elsewhere, and malformed
    records, raise MoekernError naming the file and the lines."""
    records = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            records += _read_file(file, notes)
    return records


def _read_file(file: Path, notes: list | None) -> list[dict]:
    data = file.read_bytes()
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n") and data != b""
    if not torn_tail:
        lines = lines[:-1]  # the empty string after the last newline
    records, unreadable = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            unreadable.append((number, "not UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            unreadable.append((number, f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        records.append((number, record))
    if unreadable and torn_tail and unreadable[-1][0] == len(lines):
        number, _ = unreadable.pop()
        note = (f"{file}: line {number}, the last, is incomplete (the run writing it was interrupted); skipped")
        if notes is None:
            warnings.warn(note, stacklevel=3)
        else:
            notes.append(note)
    if unreadable:
        listed = "; ".join(f"line {n} ({why})" for n, why in unreadable[:5])
        more = f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise MoekernError(f"{file}: {len(unreadable)} line{'s' * (len(unreadable) > 1)} cannot be read: {listed}"
                           f"{more}. That is damage inside the file, not a line cut by an interrupted run: repair or "
                           f"delete those lines")
    for number, record in records:
        check_record(record, f"{file}:{number}")
    return [record for _, record in records]
