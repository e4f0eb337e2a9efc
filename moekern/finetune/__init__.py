"""Post-finetuning of compressed models (He et al., Section 8): recover the quality that compression cost.

    data.py     training examples from local files: plain text (packed), Alpaca instructions, a saved dataset
    lora.py     LoRA targets; peft on the Linears, moekern's adapter on the stacked (16-bit or 4-bit) experts
    train.py    the loop (accelerate), atomic checkpoints without pickle, resume with the same data order
    run.py      finetune(): what stays fixed stays fixed, perplexity before and after, skip thresholds measured again
    report.py   finetune_report.md / .json
    cli.py      `moekern finetune`

The package itself is callable: `moekern.finetune(model, data=None, out=None, config=FinetuneConfig(), ...)` is
moekern.finetune.run.finetune (see there), for the reason moekern.compress is (the function and the package would
compete for the name).
"""

import sys
import types

from moekern.finetune.config import FinetuneConfig, LoraSpec


class _CallablePackage(types.ModuleType):
    def __call__(self, model, data=None, out=None, config=FinetuneConfig(), **options):
        from moekern.finetune.run import finetune

        return finetune(model, data, out, config, **options)


sys.modules[__name__].__class__ = _CallablePackage
finetune = sys.modules[__name__]  # what moekern's lazy table looks up: the callable package itself

__all__ = ["FinetuneConfig", "LoraSpec", "finetune"]
