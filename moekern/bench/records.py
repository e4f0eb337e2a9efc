"""Results as JSON lines, appended and flushed as each is measured: an interrupted run keeps every line it made.
Every record has a `kind` (run, model, speed, eval) and the `run` id of the command that made it."""

import json
import time
import uuid
from pathlib import Path


class RecordWriter:
    def __init__(self, out_dir: Path, filename: str):
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def write(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "run": self.run, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
        return record


def read_records(paths) -> list[dict]:
    """All records of the *.jsonl files in the given run folders (or files); a torn last line is skipped."""
    records = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for line in file.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupt
    return records
