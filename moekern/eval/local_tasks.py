"""The paper's lm-eval tasks on dataset files the user already has: DIR/<task>/<split>.<jsonl|json|parquet|csv>.

lm-eval reads a task's dataset with `datasets.load_dataset(dataset_path, dataset_name)`, which offline needs the
hub's own cache layout. A user who has, say, PIQA's validation set as a JSON-lines file can instead put it at
DIR/piqa/validation.jsonl: moekern then runs lm-eval's own task definition (prompt, choices, target, metrics, from
the YAML lm-eval ships) on that file, by overriding only where the documents come from. The file must have the
columns of the hub dataset (PIQA: goal, sol1, sol2, label; ARC: question, choices {text, label}, answerKey; ...).

The split is the one lm-eval evaluates on: the task's test split where it has one, else its validation split
(LOCAL_SPLITS lists them). MMLU is a group of 57 subject tasks and reads the datasets cache only.
"""

from pathlib import Path

from moekern.errors import MoekernError, require

# datasets' builder for each file suffix
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# the split each paper task is scored on (lm-eval 0.4: test if the task has one, else validation)
LOCAL_SPLITS = {
    "arc_challenge": "test",
    "boolq": "validation",
    "hellaswag": "validation",
    "openbookqa": "test",
    "piqa": "validation",
    "rte": "validation",
    "winogrande": "validation",
}


def local_file(task: str, data_dir: Path | None) -> Path | None:
    """DIR/<task>/<split>.<suffix> if the user put the task's documents there, else None."""
    if data_dir is None or not (Path(data_dir) / task).is_dir():
        return None
    if task not in LOCAL_SPLITS:
        raise MoekernError(f"{Path(data_dir) / task}: task {task} reads the datasets cache only (pass that cache "
                           f"folder as --data-dir); local files are read for {', '.join(LOCAL_SPLITS)}")
    split = LOCAL_SPLITS[task]
    found = [Path(data_dir) / task / f"{split}{suffix}" for suffix in BUILDERS]
    found = [path for path in found if path.is_file()]
    if not found:
        raise MoekernError(f"{Path(data_dir) / task} holds no {split}.jsonl, .json, .parquet or .csv: {task} is "
                           f"scored on its {split} split")
    return found[0]


def local_task_config(manager, task: str, path: Path) -> dict:
    """lm-eval's own config of `task` (its YAML, includes and functions resolved), reading its documents from
    `path` instead of the hub. The task keeps its name, so results are reported under it."""
    load_yaml = require("lm_eval.tasks._yaml_loader", "lm-eval tasks from local files").load_yaml

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise MoekernError(f"lm-eval has no YAML task named {task}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(
        task=task,
        dataset_path=BUILDERS[path.suffix],
        dataset_name=None,
        dataset_kwargs={"data_files": {"eval": str(path.resolve())}},
        test_split="eval",
        validation_split=None,
        training_split=None,  # zero-shot: no few-shot pool is read
        fewshot_split=None,
    )
    return cfg
