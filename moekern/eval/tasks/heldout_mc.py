"""moekern_heldout_mc: a multiple-choice task from the shipped held-out corpus, so that the lm-eval path runs in CI
without a download. Each held-out document is cut into passages of CONTEXT_WORDS + CONTINUATION_WORDS words; the
question is a passage's first words, the answer its true continuation among 4, the distractors being the
continuations of passages from other documents. Seeded: the same files on every machine."""

import json
import random
from pathlib import Path

from moekern.shipped import heldout_text

NAME = "moekern_heldout_mc"
CONTEXT_WORDS = 32
CONTINUATION_WORDS = 16
CHOICES = 4
DOCUMENT_SEPARATOR = "<|endoftext|>"

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def passages(text: str) -> list[tuple[int, str, str]]:
    """(document index, context, continuation) for every whole passage of every document."""
    size = CONTEXT_WORDS + CONTINUATION_WORDS
    found = []
    for doc, document in enumerate(text.split(DOCUMENT_SEPARATOR)):
        words = document.split()
        for start in range(0, len(words) - size + 1, size):
            chunk = words[start:start + size]
            found.append((doc, " ".join(chunk[:CONTEXT_WORDS]), " ".join(chunk[CONTEXT_WORDS:])))
    return found


def build_examples(text: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    found = passages(text)
    examples = []
    for doc, context, continuation in found:
        others = [c for d, _, c in found if d != doc]
        choices = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, continuation)
        examples.append({"context": context, "choices": choices, "label": label})
    rng.shuffle(examples)
    return examples


def write_task(folder: Path, seed: int = 0) -> Path:
    """Write the examples (JSONL) and the lm-eval task YAML into `folder`; return the folder (an include_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{NAME}.jsonl"
    with data.open("w") as f:
        for example in build_examples(heldout_text(), seed):
            f.write(json.dumps(example) + "\n")
    (folder / f"{NAME}.yaml").write_text(TASK_YAML.format(name=NAME, data=json.dumps(str(data))))
    return folder
