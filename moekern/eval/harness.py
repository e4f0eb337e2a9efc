"""lm-eval on an in-memory model (HFLM(pretrained=model) + simple_evaluate), offline, plus held-out perplexity.

The paper's eight tasks run zero-shot and are scored by the metric the paper reports for each (PAPER_TASKS); their
datasets must already be on disk, in a datasets cache folder or as files DATA_DIR/<task>/<split>.jsonl
(eval/local_tasks.py): nothing is downloaded (the HF offline switches are set). The two moekern tasks are
built from the shipped corpus and always run."""

import os
import tempfile
from pathlib import Path

from moekern.errors import MoekernError, require
from moekern.eval.local_tasks import LOCAL_SPLITS, local_file, local_task_config

# task: (metric, lm-eval 0.4 dataset path and name). acc_norm (length-normalised) where the paper reports it, for the
# tasks whose choices differ in length; acc elsewhere.
PAPER_TASKS = {
    "arc_challenge": ("acc_norm", "allenai/ai2_arc", "ARC-Challenge"),
    "boolq": ("acc", "aps/super_glue", "boolq"),
    "hellaswag": ("acc_norm", "Rowan/hellaswag", None),
    "mmlu": ("acc", "cais/mmlu", "all 57 subjects"),
    "openbookqa": ("acc_norm", "allenai/openbookqa", "main"),
    "piqa": ("acc_norm", "baber/piqa", None),
    "rte": ("acc", "nyu-mll/glue", "rte"),
    "winogrande": ("acc", "allenai/winogrande", "winogrande_xl"),
}
HELDOUT_MC = "moekern_heldout_mc"
HELDOUT_PPL = "moekern_heldout_ppl"
OFFLINE_TASKS = {HELDOUT_MC: "acc", HELDOUT_PPL: "perplexity"}
PPL_SEQ_LEN = 256


def known_tasks() -> list[str]:
    return [*PAPER_TASKS, *OFFLINE_TASKS]


def metric_of(task: str) -> str:
    return PAPER_TASKS[task][0] if task in PAPER_TASKS else OFFLINE_TASKS[task]


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in known_tasks()]
    if unknown:
        raise MoekernError(f"unknown task {', '.join(map(repr, unknown))}; known tasks: {', '.join(known_tasks())}")
    if not tasks:
        raise MoekernError(f"no task given; known tasks: {', '.join(known_tasks())}")


def go_offline(data_dir: Path | None) -> None:
    """Never reach a hub; read datasets from `data_dir` (a datasets cache folder) if given. The libraries read these
    switches at import, so their constants are set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants

    datasets = require("datasets", "reading lm-eval task data")

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise MoekernError(f"--data-dir {str(data_dir)!r} is not a folder")
        os.environ["HF_DATASETS_CACHE"] = str(data_dir)
        datasets.config.HF_DATASETS_CACHE = Path(data_dir)


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, data_dir: Path | None = None,
             batch_size: int = 8, seed: int = 0):
    """Yield one result per task: {task, metric, value, stderr, n, metrics (all lm-eval reported)}."""
    check_tasks(tasks)
    go_offline(data_dir)
    lm_tasks = [t for t in tasks if t != HELDOUT_PPL]
    if lm_tasks:
        yield from _lm_eval(model, tokenizer, lm_tasks, limit, data_dir, batch_size, seed)
    if HELDOUT_PPL in tasks:
        yield _heldout_perplexity(model, tokenizer, limit)


def _heldout_perplexity(model, tokenizer, limit: int | None) -> dict:
    """moekern.perplexity on the shipped held-out text; --limit N scores the first N windows of 256 tokens."""
    import math

    from moekern.perplexity import mean_nll, token_windows
    from moekern.shipped import heldout_text

    windows = token_windows(tokenizer, heldout_text(), PPL_SEQ_LEN, max_tokens=limit and limit * PPL_SEQ_LEN)
    value = math.exp(mean_nll(model, windows))
    return {"task": HELDOUT_PPL, "metric": "perplexity", "value": value, "stderr": None, "n": int(windows.numel()),
            "metrics": {"perplexity": value}, "higher_is_better": False}


def _lm_eval(model, tokenizer, tasks, limit, data_dir, batch_size, seed):
    lm_eval = require("lm_eval", "moekern's lm-eval tasks")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="moekern-tasks-") as folder:
        include = None
        if HELDOUT_MC in tasks:
            from moekern.eval.tasks.heldout_mc import write_task

            include = str(write_task(Path(folder), seed))
        # Indexing lm-eval's own task folder takes tens of seconds: only when a paper task asks for it.
        manager = TaskManager(include_path=include, include_defaults=any(t in PAPER_TASKS for t in tasks))
        specs = []
        for task in tasks:  # a task with its documents in DATA_DIR/<task>/ runs on that file (eval/local_tasks.py)
            path = local_file(task, data_dir) if task in PAPER_TASKS else None
            specs.append(local_task_config(manager, task, path) if path else task)
            _check_dataset(manager, specs[-1], data_dir)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        except ImportError as exc:  # lm-eval's HF model needs accelerate
            raise MoekernError(f"lm-eval cannot wrap the model: {exc}") from exc
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=1000, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    for task in tasks:
        yield _result(task, results)


def _check_dataset(manager, spec, data_dir) -> None:
    """Load the task once (lm-eval reads its dataset then) and say clearly what is missing where."""
    task = spec["task"] if isinstance(spec, dict) else spec
    try:
        manager.load([spec])
    except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        if isinstance(spec, dict):
            path = spec["dataset_kwargs"]["data_files"]["eval"]
            raise MoekernError(f"task {task}: lm-eval cannot read {path} ({type(exc).__name__}: {exc}); it needs "
                               f"the columns of the task's hub dataset") from exc
        if task not in PAPER_TASKS:
            raise MoekernError(f"task {task}: lm-eval cannot load it ({type(exc).__name__}: {exc})") from exc
        _, path, name = PAPER_TASKS[task]
        where = f"--data-dir {data_dir}" if data_dir else "the default datasets cache (no --data-dir given)"
        raise MoekernError(
            f"task {task}: its dataset {path}{f' ({name})' if name else ''} is not in {where}, and moekern downloads "
            f"nothing. On a connected machine run `datasets.load_dataset({path!r}"
            f"{f', {name!r}' if name and ' ' not in name else ''})` with HF_DATASETS_CACHE=DIR, copy DIR here and "
            f"pass --data-dir DIR; or put the {LOCAL_SPLITS.get(task, 'test')} split's rows as "
            f"DIR/{task}/{LOCAL_SPLITS.get(task, 'test')}.jsonl and pass --data-dir DIR. "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from exc


def _result(task: str, results: dict) -> dict:
    scores = results["results"][task]
    metric = metric_of(task)
    metrics = {k.split(",")[0]: v for k, v in scores.items() if "," in k and isinstance(v, (int, float))}
    stderr = metrics.get(f"{metric}_stderr")
    samples = results.get("n-samples", {})
    n = samples.get(task, {}).get("effective")
    if n is None:  # a group (mmlu): the sum over its subtasks
        n = sum(v.get("effective", 0) for k, v in samples.items() if k != task) or None
    return {"task": task, "metric": metric, "value": metrics[metric],
            "stderr": stderr if isinstance(stderr, float) else None, "n": n, "metrics": metrics,
            "higher_is_better": True}
