"""`moekern finetune CHECKPOINT --data PATH --out DIR`: flags take transformers' TrainingArguments names."""

import argparse
from pathlib import Path

from moekern.finetuning.config import LORA_GROUPS, SCHEDULERS, FinetuneConfig, LoraSpec


def add_finetune_command(sub) -> None:
    from moekern.cli.common import add_loading_args, positive_int

    defaults = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a (compressed) model to recover quality: full or LoRA (QLoRA on 4-bit experts)",
        description="Fine-tune MODEL (a local folder, e.g. one written by `moekern compress`, or 'shipped') on local "
        "data: plain text (packed into blocks), Alpaca instructions as JSON lines or a JSON list (loss on the "
        "response only), or a folder saved by datasets. The compression stays as it is (removed blocks, layers "
        "and experts stay removed; config.json['moekern'] carries over), the router stays frozen unless "
        "--train-router, and 4-bit weights stay frozen (only --lora trains on them). Defaults are the paper's: "
        "3 epochs, lr 8e-6, warm-up ratio 0.03, cosine, global batch 32 (8 x 4 accumulated), bf16 where the "
        "device has it. Writes the model (moekern.save) and finetune_report.md/.json into --out, with held-out "
        "perplexity before and after; checkpoints (each epoch, and every --save-steps) go to OUT-checkpoints.",
        epilog="Example: moekern finetune runs/block-drop-2 --out runs/block-drop-2-ft --max-steps 60 "
        "--learning-rate 3e-4 --gradient-accumulation-steps 1",
    )
    p.add_argument("model", help="local model folder, or 'shipped'")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the fine-tuned model goes")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="training data (default: the shipped corpus's training split, for the shipped model and "
                   "models compressed from it)")
    p.add_argument("--eval-data", default=None, metavar="PATH",
                   help="held-out text scored before and after (default: the shipped held-out text)")
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per packed block / instruction cut (default: 256 for the shipped model, else "
                   "min(2048, max_position_embeddings))")
    p.add_argument("--num-train-epochs", type=float, default=defaults.num_train_epochs)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help="optimizer steps; > 0 overrides --num-train-epochs")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--per-device-train-batch-size", type=positive_int, default=defaults.per_device_train_batch_size)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=defaults.gradient_accumulation_steps)
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--lr-scheduler-type", choices=SCHEDULERS, default=defaults.lr_scheduler_type)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data order (default: %(default)s)")
    p.add_argument("--save-steps", type=int, default=0,
                   help="also a checkpoint every N steps (one at the end of each epoch always)")
    p.add_argument("--save-total-limit", type=positive_int, default=None, help="keep only the last N checkpoints")
    p.add_argument("--logging-steps", type=positive_int, default=1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the device supports it, i.e. a CUDA GPU with bf16)")
    p.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning (needed for 4-bit models)")
    p.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha / r")
    p.add_argument("--lora-targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                   default=None, metavar="T1,T2",
                   help=f"groups ({', '.join(LORA_GROUPS)}) and/or Linear names (q_proj, ...) (default: every group "
                   "the model has)")
    p.add_argument("--merge", action="store_true",
                   help="also merge the adapters of 4-bit experts, re-rounding them onto their quantization grid "
                   "(16-bit weights are always merged, exactly)")
    p.add_argument("--train-router", action="store_true", help="train the router too (frozen by default)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from the last checkpoint of this run (or the one given), with the same data order")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="where checkpoints go (default: OUT-checkpoints)")
    add_loading_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a moekern model folder (anything else is always refused)")
    p.set_defaults(run=run_finetune, writes="model")


def config_from_args(args) -> FinetuneConfig:
    lora = None
    if args.lora:
        lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets, merge=args.merge)
    return FinetuneConfig(
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_ratio=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, seq_len=args.seq_len, bf16=args.bf16, lora=lora,
        train_router=args.train_router, eval_tokens=args.eval_tokens,
        extra={"command": " ".join(["moekern", *getattr(args, "argv", [])])})


def run_finetune(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from moekern.errors import MoekernError
    from moekern.finetuning.report import REPORT_JSON, REPORT_MD
    from moekern.finetuning.run import finetune

    config = config_from_args(args)
    config.validate()  # before the model is loaded
    if (args.lora_targets is not None or args.merge) and not args.lora:
        raise MoekernError("--lora-targets and --merge go with --lora")
    hf_logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = finetune(args.model, args.data, args.out, config, eval_data=args.eval_data,
                      checkpoint_dir=args.checkpoint_dir, resume=args.resume, device=device,
                      dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    r = result.report
    data, ppl = r["data"], r["perplexity"]
    print(f"method      {r['method']}: {r['how']}")
    print(f"data        {data['source']} ({data['kind']}: {data['examples']:,} examples of up to {r['seq_len']} "
          f"tokens, {data['target_tokens']:,} target tokens)")
    print(f"trained     {r['steps']} steps, {r['trainable_parameters']:,} trainable parameters (the model has "
          f"{r['parameters']:,}), "
          f"{r['train_seconds']:.1f} s" + (f" (resumed from {r['resumed_from']})" if r["resumed_from"] else ""))
    unmerged = f" ({ppl['after_unmerged']:.2f} before the 4-bit merge)" if "after_unmerged" in ppl else ""
    print(f"perplexity  {ppl['before']:.2f} -> {ppl['after']:.2f}{unmerged} on {r['eval']['tokens']:,} held-out "
          f"tokens")
    if r["skip"]:
        print(f"skip        thresholds measured again on the training data; largest move "
              f"{r['skip']['max_abs_change']:.4f}")
    print(f"frozen      {r['frozen_check']['tensors']} tensors (router, 4-bit weights) bit-identical")
    print(f"checkpoint  {args.out}; training checkpoints in {r['checkpoint_dir']}")
    print(f"report      {REPORT_MD}, {REPORT_JSON} ({r['seconds']:.1f} s in all)")
    return 0
