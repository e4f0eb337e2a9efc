"""The settings of a fine-tuning run, as plain dataclasses. Field names are transformers' `TrainingArguments` names
where one exists; the defaults are He et al.'s (Section 8): 3 epochs, learning rate 8e-6, warm-up ratio 0.03, cosine
schedule, global batch 32 (8 per step x 4 accumulated), bf16 where the device supports it."""

import math
from dataclasses import dataclass, field

from moekern.errors import MoekernError

LORA_GROUPS = ("attention", "experts", "shared")  # what --lora-targets names besides module-name suffixes


@dataclass(frozen=True)
class LoraSpec:
    """LoRA instead of full fine-tuning. targets: groups (attention: the attention projections; experts: the routed
    experts' stacked gate_up/down weights, 16-bit or 4-bit; shared: the shared experts' Linears) and/or module-name
    suffixes such as "q_proj"; None takes every group the model has. merge: fold the adapters into the weights at the end (always done for 16-bit weights,
    where it is exact; for 4-bit experts it re-rounds onto their own quantization grid, see moekern.finetuning.lora)."""

    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] | None = None  # None: every group the model has
    merge: bool = False

    def validate(self) -> None:
        if self.r < 1:
            raise MoekernError(f"LoRA rank must be >= 1, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise MoekernError(f"LoRA alpha must be > 0, got {self.alpha}")
        if self.targets is not None and not self.targets:
            raise MoekernError(f"no LoRA targets; name some of {', '.join(LORA_GROUPS)} or module names (q_proj, ...)")


@dataclass(frozen=True)
class FinetuneConfig:
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs, as in TrainingArguments
    learning_rate: float = 8e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_steps: int = 0  # 0: a checkpoint at the end of each epoch only
    save_total_limit: int | None = None  # keep every checkpoint
    logging_steps: int = 1
    seq_len: int | None = None  # block length of packed text and the cut of instruction examples; None: see data.py
    bf16: bool | None = None  # None: bf16 autocast where the device supports it (CUDA with bf16), fp32 elsewhere
    lora: LoraSpec | None = None
    train_router: bool = False
    eval_tokens: int | None = None  # held-out tokens scored before and after (None: all)
    skip_calibration_samples: int = 32  # blocks of the training data that re-measure skip thresholds
    extra: dict = field(default_factory=dict)  # recorded in the report as given (e.g. the budget of a benchmark)

    @property
    def global_batch(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        """What is wrong whatever the model and data: raised before anything is loaded or written."""
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise MoekernError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.max_steps <= 0 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise MoekernError(f"--num-train-epochs must be > 0 (or give --max-steps), got {self.num_train_epochs}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise MoekernError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise MoekernError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise MoekernError("--weight-decay and --max-grad-norm must be >= 0")
        if self.save_steps < 0:
            raise MoekernError(f"--save-steps must be >= 0, got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise MoekernError(f"--save-total-limit must be >= 1, got {self.save_total_limit}")
        if self.seq_len is not None and self.seq_len < 2:
            raise MoekernError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise MoekernError(f"--lr-scheduler-type {self.lr_scheduler_type!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.lora is not None:
            self.lora.validate()


SCHEDULERS = ("cosine", "linear", "constant_with_warmup")  # transformers.get_scheduler names
