"""The recorded run of the README's main job: `moekern paper` on the shipped model, written to
benchmarks/results/paper/ (paper.jsonl, report.md, report.json and the plots the README shows).

    python benchmarks/paper_table.py [more moekern paper options]

A thin caller of `moekern paper` (moekern/bench/paper.py), which does all the work; the folder is emptied first so that
it holds one run.
"""

import os
import shutil
import sys
from pathlib import Path

from moekern.cli import main

OUT = Path(__file__).resolve().parent / "results" / "paper"

if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        shutil.rmtree(OUT, ignore_errors=True)
    sys.exit(main(["paper", "shipped", "--out", os.path.relpath(OUT), *sys.argv[1:]]))
