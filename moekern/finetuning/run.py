"""finetune(): a (compressed) model in, a fine-tuned one out, with what stays fixed kept fixed.

    result = finetune("runs/block-drop-2", data=None, out="runs/block-drop-2-ft",
                      config=FinetuneConfig(max_steps=60, learning_rate=3e-4, per_device_train_batch_size=8,
                                            gradient_accumulation_steps=1))
    result.report["perplexity"]      # held-out perplexity before and after

What stays fixed: the compression decisions (removed blocks and MoE layers, dropped experts: absent weights stay
absent, masked experts' stored rows are restored after every step, config.json["moekern"] carries over); the router
unless train_router; 4-bit weights (only LoRA trains on a 4-bit model, through the dequantized path). The report
checks by hash that the router and 4-bit weights are bit-identical after training. When the model's recipe had
`skip`, the skip thresholds are measured again on the training data after training, and the report gives the move.
"""

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from moekern.errors import MoekernError
from moekern.finetuning.config import FinetuneConfig
from moekern.ops import backend

SHIPPED_SEQ_LEN = 256  # the shipped model's training length


@dataclass
class FinetuneResult:
    model: object
    tokenizer: object
    report: dict
    out: Path | None = None


def finetune(model, data=None, out=None, config: FinetuneConfig = FinetuneConfig(), *, tokenizer=None,
             eval_data=None, checkpoint_dir=None, resume=None, inplace: bool = False, device=None, dtype=None,
             progress: bool = True, stop_after: int | None = None, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune `model` (a local model folder, 'shipped', or an in-memory model with its `tokenizer`) on `data`
    (see moekern.finetuning.data; None: the shipped training corpus, for the shipped model's tokenizer only).

    out: where the fine-tuned model and its report are written (moekern.save, atomically); checkpoints go to
    checkpoint_dir (default: OUT-checkpoints beside it; none when out is None). resume: "latest" or a checkpoint
    folder. An in-memory model is copied unless inplace. The source folder is never written; an existing `out` is
    replaced only if it is a moekern model and overwrite=True (moekern.folders' output rule)."""
    from moekern import checkpoint, patching, surgery
    from moekern.perplexity import mean_nll
    from moekern.finetuning import data as data_module
    from moekern.finetuning import lora as lora_module
    from moekern.finetuning.train import Plan, train
    from moekern.model_info import describe

    started = time.perf_counter()
    config.validate()
    out = None if out is None else Path(out).expanduser()
    source_name, fingerprint = "in-memory model", {"source": "in-memory"}
    if isinstance(model, (str, Path)):
        path = checkpoint.resolve_model_dir(model)
        if out is not None and out.resolve() == path.resolve():
            raise MoekernError(f"--out {str(out)!r} is the source checkpoint; write the fine-tuned model elsewhere "
                               f"(the source is never modified)")
        source_name, fingerprint = str(model), _folder_fingerprint(path)
        loaded, tokenizer = checkpoint.load(path, dtype=dtype, device=device or "cpu")
        if tokenizer is None:
            raise MoekernError(f"{str(path)!r} has no tokenizer files; save the model with its tokenizer")
        model = loaded
    else:
        if tokenizer is None:
            raise MoekernError("finetune(model, ...) of an in-memory model needs its tokenizer (tokenizer=...)")
        model = model if inplace else copy.deepcopy(model)
    if resume is not None and checkpoint_dir is None and out is None:
        raise MoekernError("--resume needs the run's --out (or checkpoint_dir)")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (
        out.with_name(out.name + "-checkpoints") if out is not None else None)

    four_bit = _has_4bit(model)
    if four_bit and config.lora is None:
        raise MoekernError("this model's weights are 4-bit and cannot be fine-tuned in full: use --lora (LoRA over the "
                           "frozen 4-bit weights, QLoRA), or fine-tune the 16-bit model and quantize after "
                           "(moekern compress --recipe awq4)")
    if surgery.decisions(model).get("prune"):
        raise MoekernError("this model was pruned (Wanda/SparseGPT): fine-tuning would fill the zeros that pruning "
                           "made; fine-tune before pruning (trim, fine-tune, then prune)")
    if lora_module.adapter_count(model):
        raise MoekernError("this model carries unmerged LoRA adapters over its 4-bit experts from an earlier "
                           "fine-tuning; merge them first (moekern finetune ... --lora --merge)")
    if config.lora is not None:
        lora_module.find_targets(model, config.lora.targets)  # targets that match nothing fail before any work
    seq_len = config.seq_len or default_seq_len(model, tokenizer)
    if data is None and not is_shipped_tokenizer(tokenizer):
        raise MoekernError("give the training data (--data PATH): the shipped corpus is the default only for the "
                           "shipped model and the models compressed from it")
    examples = data_module.load_examples(data, tokenizer, seq_len)
    Plan.make(examples, config)  # a data set smaller than one batch fails here, before any work
    windows, eval_name = data_module.heldout_windows(tokenizer, eval_data, seq_len, config.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    patching.patch(model)
    ppl_before = math.exp(mean_nll(model, windows))
    found = set_trainable(model, config)
    frozen = frozen_digests(model, config)
    rows = FrozenRows(model)
    fingerprint = {**fingerprint, "data": examples.describe(), "settings": _settings(config), "seq_len": seq_len}
    with backend.reference():  # moekern's kernels have no backward: train on the differentiable reference path
        history = train(model, examples, config, pad_id, checkpoint_dir=checkpoint_dir, resume=resume,
                        fingerprint=fingerprint, progress=progress, frozen_rows=rows, stop_after=stop_after)
    unchanged = frozen == frozen_digests(model, config, names=frozen.keys())
    if not unchanged:
        raise MoekernError("internal error: a frozen tensor changed during training; the result is not saved")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        p.requires_grad_(False)

    perplexity = {"before": ppl_before}
    unloaded = None
    if config.lora is not None:
        if four_bit and config.lora.merge:  # what the adapters alone give, before the merge re-rounds the 4-bit weights
            perplexity["after_unmerged"] = math.exp(mean_nll(model, windows))
        unloaded = lora_module.unload(model, merge_4bit=config.lora.merge)
    skip = remeasure_skip(model, examples, seq_len, config.skip_calibration_samples)
    perplexity["after"] = math.exp(mean_nll(model, windows))
    finished = history.plan is not None and history.step >= history.plan.total_steps

    d = surgery.decisions(model)
    kept = unloaded is not None and unloaded["kept_4bit"] > 0
    if kept:
        d["lora_experts"] = {"r": config.lora.r, "alpha": config.lora.alpha}
    else:
        d.pop("lora_experts", None)
    run = {"method": method(config, four_bit), "how": how(config, four_bit, unloaded),
           "data": examples.describe()["source"], "steps": history.step, "learning_rate": config.learning_rate,
           "global_batch": config.global_batch, "seq_len": seq_len, "perplexity": perplexity}
    if finished:
        d.setdefault("finetune", []).append(run)
    report = {
        "model": source_name, "out": None if out is None else str(out), **run,
        "finished": finished,
        "data": examples.describe(), "eval": {"source": eval_name, "tokens": int(windows.numel()), "seq_len": seq_len},
        "lora": None if config.lora is None else {**asdict(config.lora), "adapted": found, "unloaded": unloaded},
        "trainable_parameters": trainable, "parameters": describe(model)["parameters"],
        "settings": _settings(config), "extra": config.extra,
        "plan": None if history.plan is None else asdict(history.plan),
        "log": history.log, "checkpoints": history.checkpoints, "checkpoint_dir": None if checkpoint_dir is None
        else str(checkpoint_dir), "resumed_from": history.resumed_from,
        "frozen_check": {"tensors": len(frozen), "bit_identical": unchanged},
        "skip": skip, "decisions": {k: d.get(k) for k in ("recipe", "dropped_blocks", "dropped_moe_layers",
                                                          "kept_experts", "skip_beta", "quant")},
        "train_seconds": round(history.seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "device": str(next(model.parameters()).device), "versions": _versions(),
    }
    if out is not None and finished:
        from moekern.finetuning.report import write_report

        checkpoint.save(model, out, tokenizer=tokenizer, overwrite=overwrite,
                        add_files=lambda folder: write_report(report, folder))
    return FinetuneResult(model, tokenizer, report, out if finished else None)


# ----------------------------------------------------------------------------------------------------------------------
def method(config: FinetuneConfig, four_bit: bool) -> str:
    return "full" if config.lora is None else ("qlora" if four_bit else "lora")


def how(config: FinetuneConfig, four_bit: bool, unloaded: dict | None) -> str:
    """One sentence on what was trained and how the result holds it (the command prints it)."""
    router = "router trained" if config.train_router else "router frozen"
    if config.lora is None:
        return f"full fine-tuning of every weight except the router ({router})"
    spec = config.lora
    text = f"LoRA r={spec.r} alpha={spec.alpha:g} ({router})"
    if not four_bit:
        return text + "; adapters merged into the 16-bit weights (exact)"
    text += "; over the frozen 4-bit experts (QLoRA: gradients through the dequantized weights)"
    if unloaded and unloaded["kept_4bit"]:
        return text + f"; the 4-bit experts' adapters are kept beside the unchanged 4-bit weights ({unloaded['kept_4bit']}" \
                      " layers; moekern.load restores them), the others merged"
    return text + "; adapters merged: 4-bit experts re-rounded onto their own quantization grid"


def set_trainable(model, config: FinetuneConfig) -> dict | None:
    """Freeze what stays fixed, attach LoRA if asked; returns what LoRA adapted."""
    from moekern.finetuning import lora as lora_module

    for p in model.parameters():
        p.requires_grad_(False)
    found = None
    if config.lora is not None:
        found = lora_module.attach(model, config.lora)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    else:
        router = {id(p) for p in router_parameters(model)}
        for p in model.parameters():
            if id(p) not in router and p.dtype.is_floating_point:
                p.requires_grad_(True)
    if config.train_router:
        for p in router_parameters(model):
            p.requires_grad_(True)
    return found


def router_parameters(model) -> list:
    """The routers' parameters (and Qwen2-MoE's gate of the shared expert, a router too)."""
    from moekern import surgery
    from moekern.models import family_of
    from moekern.targets import NEVER

    attr = family_of(model).router_attr
    params = []
    for layer in surgery.decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not surgery.is_moe_block(mlp):
            continue
        for name in (attr, *NEVER):
            module = getattr(mlp, name, None)
            if module is not None:
                params += list(module.parameters())
    return params


def frozen_digests(model, config: FinetuneConfig, names=None) -> dict[str, str]:
    """sha256 of each tensor that must not change: the router's (unless trained) and every 4-bit buffer."""
    from moekern.modules.quant import QuantizedExperts, QuantizedLinear

    tensors = {}
    if not config.train_router:
        router = {id(p) for p in router_parameters(model)}
        tensors.update({n: p for n, p in model.named_parameters() if id(p) in router})
    for path, module in model.named_modules():
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            tensors.update({f"{path}.{n}": b for n, b in module.named_buffers(recurse=False)})
    if names is not None:
        tensors = {n: tensors.get(n) for n in names}
    return {n: None if t is None else hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
            for n, t in tensors.items()}


class FrozenRows:
    """The stored rows of experts that Expert Drop masked (weights kept, router masked): they get no gradient, but
    weight decay would still move them, so they are put back after every step."""

    def __init__(self, model):
        from moekern.modules.moe import MoEBlock

        self.saved = []
        for block in model.modules():
            if not isinstance(block, MoEBlock):
                continue
            dead = (~block.alive[block.kept_experts]).nonzero().flatten()
            if not dead.numel():
                continue
            stored = block.kept_experts.numel()
            for module in (block.experts, getattr(block, block.family.router_attr)):
                for p in module.parameters(recurse=False):
                    if p.requires_grad and p.dim() >= 1 and p.shape[0] == stored:
                        self.saved.append((p, dead, p.detach()[dead].clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for p, rows, value in self.saved:
                p[rows] = value


def remeasure_skip(model, examples, seq_len: int, samples: int) -> dict | None:
    """When the model's recipe had `skip`: its thresholds measured again (same quantile) on blocks of the training
    data, set, and {"quantile", "before", "after", "max_abs_change"} by original layer."""
    from moekern import surgery
    from moekern.compression.recipe import Recipe, Skip
    from moekern.compression.trimming.skip import skip_thresholds
    from moekern.compression.trimming.stats import measure

    d = surgery.decisions(model)
    if not d.get("recipe"):
        return None
    try:
        steps = Recipe.parse(d["recipe"]).steps
    except MoekernError:
        return None
    skip = next((s for s in steps if isinstance(s, Skip)), None)
    if skip is None:
        return None
    before = {i: b for i, b in enumerate(d["skip_beta"]) if b is not None}
    blocks = examples.blocks(samples, seq_len)
    with backend.reference():
        after = skip_thresholds(measure(model, blocks, record_tokens=False), skip.quantile)
    surgery.set_skip_beta(model, after)
    changes = [abs(after[i] - before[i]) for i in after if i in before]
    return {"quantile": skip.quantile, "calibration_blocks": list(blocks.shape),
            "before": {str(i): b for i, b in before.items()}, "after": {str(i): b for i, b in after.items()},
            "max_abs_change": max(changes) if changes else None,
            "mean_abs_change": sum(changes) / len(changes) if changes else None}



def default_seq_len(model, tokenizer) -> int:
    if is_shipped_tokenizer(tokenizer):
        return SHIPPED_SEQ_LEN
    return min(2048, int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048) or 2048))


def is_shipped_tokenizer(tokenizer) -> bool:
    """Whether a tokenizer is the shipped model's (so the shipped corpus is a sensible default)."""
    return tokenizer.get_vocab() == _shipped_vocab()


@lru_cache(maxsize=1)
def _shipped_vocab() -> dict:
    from transformers import AutoTokenizer

    from moekern.shipped import MODEL_DIR

    return AutoTokenizer.from_pretrained(MODEL_DIR).get_vocab()


def _has_4bit(model) -> bool:
    from moekern.modules.quant import QuantizedExperts, QuantizedLinear

    return any(isinstance(m, (QuantizedExperts, QuantizedLinear)) for m in model.modules())


def _settings(config: FinetuneConfig) -> dict:
    ignored = ("save_steps", "save_total_limit", "logging_steps", "eval_tokens", "extra", "lora")
    settings = {k: v for k, v in asdict(config).items() if k not in ignored}
    settings["lora"] = None if config.lora is None else {**asdict(config.lora),
                                                          "targets": list(config.lora.targets or []) or None}
    return settings


def _folder_fingerprint(path: Path) -> dict:
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return {"source": str(path.resolve()), "checkpoint": digest.hexdigest()[:16]}


def _versions() -> dict:
    import platform

    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions
