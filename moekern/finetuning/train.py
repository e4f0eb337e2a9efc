"""The training loop: a plain loop on accelerate (device, bf16 autocast, backward, gradient clipping) rather than
transformers' Trainer, because
  - a checkpoint must be written atomically (moekern.folders.replaced_folder) and hold nothing pickled: Trainer
    writes checkpoint-N in place and resumes by unpickling optimizer.pt, scheduler.pt and rng_state.pth; here the
    trainable tensors, the optimizer's state and the RNG state are safetensors and the rest is JSON;
  - the model is saved by moekern.save (in-memory names, config.json["moekern"]), which Trainer's save_pretrained
    would replace by the hub layout that moekern.load does not read for a compressed model;
  - the data order is a pure function of (seed, epoch), so a resumed run takes the very batches the interrupted one
    would have, with no sampler state to restore; the loop is short enough to read top to bottom.
From transformers it keeps the names (TrainingArguments') and get_scheduler; the optimizer is torch's AdamW with
Trainer's defaults (betas 0.9/0.999, eps 1e-8). One process: data parallelism across processes is not done.

Loss: the next-token cross-entropy summed over the targets of the whole global batch (every micro-batch of the
gradient accumulation) and divided by their count, so accumulation gives the gradient of one large batch. With
--train-router and a model whose config has router_aux_loss_coef, the model's load-balancing loss is added.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moekern.errors import MoekernError
from moekern.finetuning.config import FinetuneConfig
from moekern.finetuning.data import IGNORE, Examples

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE, OPTIMIZER, RNG, STATE = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors", \
    "trainer_state.json"


@dataclass
class Plan:
    """How many steps, and which examples each step takes."""

    examples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    seed: int

    @classmethod
    def make(cls, examples: Examples, config: FinetuneConfig) -> "Plan":
        batch = config.global_batch
        per_epoch = len(examples) // batch  # the incomplete last batch of an epoch is dropped
        if per_epoch == 0:
            raise MoekernError(
                f"{examples.source} gives {len(examples)} examples, fewer than one batch "
                f"(--per-device-train-batch-size {config.per_device_train_batch_size} x "
                f"--gradient-accumulation-steps {config.gradient_accumulation_steps} = {batch}); give more data or "
                f"lower them" + (" (or --seq-len, for plain text)" if examples.kind == "text" else ""))
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
        return cls(len(examples), batch, per_epoch, max(total, 1), config.seed)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.examples, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def indices(self, step: int, order: torch.Tensor) -> list[int]:
        within = step % self.steps_per_epoch
        return order[within * self.global_batch : (within + 1) * self.global_batch].tolist()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


@dataclass
class History:
    step: int = 0
    log: list = field(default_factory=list)  # {"step", "epoch", "loss", "lr", "grad_norm", "seconds"}
    checkpoints: list = field(default_factory=list)
    resumed_from: str | None = None
    seconds: float = 0.0
    plan: Plan | None = None


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train(model, examples: Examples, config: FinetuneConfig, pad_id: int, *, checkpoint_dir: Path | None = None,
          resume: str | Path | None = None, fingerprint: dict | None = None, progress: bool = True,
          frozen_rows=None, stop_after: int | None = None) -> History:
    """Train the model's trainable parameters in place. checkpoint_dir: where checkpoint-N folders go (none if None).
    resume: "latest" or a checkpoint folder. fingerprint: what must match for a resume (source, data, settings).
    frozen_rows: FrozenRows restored after each step. stop_after: end after this many steps in total (as an
    interrupt would: a test of resuming)."""
    from accelerate import Accelerator
    from transformers import get_scheduler
    from tqdm.auto import tqdm

    plan = Plan.make(examples, config)
    named = trainable_parameters(model)
    if not named:
        raise MoekernError("nothing to train: every parameter is frozen")
    device = next(model.parameters()).device
    bf16 = config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
    if accelerator.num_processes > 1:
        raise MoekernError("moekern finetune runs in one process; launch it without data parallelism")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(config.warmup_ratio * plan.total_steps),
                              num_training_steps=plan.total_steps)
    history = History()
    fingerprint = {**(fingerprint or {}), "plan": {"examples": plan.examples, "global_batch": plan.global_batch,
                                                     "total_steps": plan.total_steps, "seed": plan.seed}}
    if resume is not None:
        folder = find_checkpoint(checkpoint_dir, resume)
        load_checkpoint(folder, named, optimizer, scheduler, history, fingerprint)
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if config.train_router else 0.0

    model.train()
    started = time.perf_counter() - history.seconds
    bar = tqdm(total=plan.total_steps, initial=history.step, desc="fine-tuning", unit="step", disable=not progress,
               dynamic_ncols=True)
    order_epoch, order = None, None
    end = plan.total_steps if stop_after is None else min(stop_after, plan.total_steps)
    try:
        while history.step < end:
            step = history.step
            if plan.epoch_of(step) != order_epoch:
                order_epoch = plan.epoch_of(step)
                order = plan.epoch_order(order_epoch)
            indices = plan.indices(step, order)
            targets = sum(int((examples.labels[i][1:] != IGNORE).sum()) for i in indices)
            total = 0.0
            micro = config.per_device_train_batch_size
            for start in range(0, len(indices), micro):
                batch = {k: v.to(device) for k, v in examples.batch(indices[start : start + micro], pad_id).items()}
                with accelerator.autocast():
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                                **({"output_router_logits": True} if aux_coef else {}))
                nll = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                      ignore_index=IGNORE, reduction="sum")
                loss = nll / targets
                if aux_coef and getattr(out, "aux_loss", None) is not None:
                    loss = loss + aux_coef * out.aux_loss * (len(batch["input_ids"]) / len(indices))
                accelerator.backward(loss)
                total += nll.item()
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if frozen_rows is not None:
                frozen_rows.restore()
            history.step = step + 1
            history.seconds = time.perf_counter() - started
            loss_value = total / max(targets, 1)
            if history.step % config.logging_steps == 0 or history.step == plan.total_steps:
                history.log.append({"step": history.step, "epoch": round(history.step / plan.steps_per_epoch, 4),
                                    "loss": round(loss_value, 5), "lr": lr, "grad_norm": grad_norm,
                                    "seconds": round(history.seconds, 2)})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", epoch=f"{history.step / plan.steps_per_epoch:.2f}")
            bar.update(1)
            if checkpoint_dir is not None and _save_now(history.step, plan, config):
                save_checkpoint(checkpoint_dir, named, optimizer, scheduler, history, fingerprint, config)
    finally:
        bar.close()
        model.eval()
    history.plan = plan
    return history


def _save_now(step: int, plan: Plan, config: FinetuneConfig) -> bool:
    return (step % plan.steps_per_epoch == 0 or step == plan.total_steps
            or (config.save_steps > 0 and step % config.save_steps == 0))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest, written through moekern.folders.replaced_folder
# ----------------------------------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, named, optimizer, scheduler, history: History, fingerprint: dict,
                    config: FinetuneConfig) -> Path:
    from safetensors.torch import save_file

    from moekern import folders

    path = Path(directory) / f"{CHECKPOINT_PREFIX}{history.step}"
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for key, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}.{name}"] = value
    # A checkpoint-N of this run may be written again after a resume from an earlier one: replace it.
    with folders.replaced_folder(path, folders.MODEL, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(tmp / TRAINABLE))
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / OPTIMIZER))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / RNG))
        (tmp / STATE).write_text(json.dumps({
            "step": history.step, "seconds": history.seconds, "log": history.log,
            "checkpoints": history.checkpoints + [path.name], "resumed_from": history.resumed_from,
            "param_names": [n for n, _ in named], "param_groups": state["param_groups"],
            "optimizer_scalars": scalars, "scheduler": _jsonable(scheduler.state_dict()),
            "fingerprint": fingerprint,
        }, indent=1, default=str))
    history.checkpoints.append(path.name)
    if config.save_total_limit is not None:
        import shutil

        for old in checkpoints(directory)[: -config.save_total_limit]:
            shutil.rmtree(old)
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def checkpoints(directory: Path | None) -> list[Path]:
    """The complete checkpoint-N folders of a directory, oldest first (the temporary folders of a save are hidden)."""
    if directory is None or not Path(directory).is_dir():
        return []
    found = [p for p in Path(directory).iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(directory: Path | None, resume) -> Path:
    if str(resume) != "latest":
        path = Path(resume).expanduser()
        if not (path / STATE).is_file():
            raise MoekernError(f"--resume {str(path)!r} is not a checkpoint folder (no {STATE})")
        return path
    found = checkpoints(directory)
    if not found:
        raise MoekernError(f"--resume: no checkpoint in {str(directory)!r} to resume from; start without --resume")
    return found[-1]


def load_checkpoint(folder: Path, named, optimizer, scheduler, history: History, fingerprint: dict) -> None:
    from safetensors.torch import load_file

    state = json.loads((folder / STATE).read_text())
    if state["fingerprint"] != json.loads(json.dumps(fingerprint, default=str)):
        theirs, ours = state["fingerprint"], json.loads(json.dumps(fingerprint, default=str))
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise MoekernError(f"checkpoint {str(folder)!r} was made by another run (differs in: {', '.join(differ)}); "
                           f"resume with the same model, data and settings, or start afresh")
    if state["param_names"] != [n for n, _ in named]:
        raise MoekernError(f"checkpoint {str(folder)!r} trains other parameters than this run; start afresh")
    try:
        trainable = load_file(folder / TRAINABLE)
        moments = load_file(folder / OPTIMIZER)
        rng = load_file(folder / RNG)
    except Exception as exc:  # safetensors' SafetensorError has no stable import path
        raise MoekernError(f"checkpoint {str(folder)!r} is corrupt ({exc}); resume from an earlier one") from exc
    with torch.no_grad():
        for name, param in named:
            param.copy_(trainable[name])
    per_param: dict[int, dict] = {}
    for key, tensor in moments.items():
        if key == "empty":
            continue
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and any(k.startswith("cuda") for k in rng):
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    history.step, history.seconds, history.log = state["step"], state["seconds"], state["log"]
    history.checkpoints = state["checkpoints"]
    history.resumed_from = str(folder)
