"""Post-finetuning of compressed models (He et al., Section 8): recover the quality that compression cost.

    config.py   FinetuneConfig and LoraSpec, checked before any work
    data.py     training examples from local files: plain text (packed), Alpaca instructions, a saved dataset
    lora.py     LoRA targets; peft on the Linears, moekern's adapter on the stacked (16-bit or 4-bit) experts
    train.py    the loop (accelerate), atomic checkpoints without pickle, resume with the same data order
    run.py      finetune(): what stays fixed stays fixed, perplexity before and after, skip thresholds measured again
    report.py   finetune_report.md / .json

The one call is the function `moekern.finetune(model, data=None, out=None, config=FinetuneConfig(), ...)`
(moekern.finetuning.run.finetune); the command is moekern/cli/finetune.py.
"""

from moekern.finetuning.config import FinetuneConfig, LoraSpec

__all__ = ["FinetuneConfig", "LoraSpec"]
