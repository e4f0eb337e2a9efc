"""Reproduce the small Mixtral-style MoE model shipped with ``moekern``.

Usage::

    python -m moekern.shipped.train [--out DIR] [--minutes M] [--seed S] [--rebuild-corpus]

Steps (all CPU, all offline):

1. Build the English corpus (``moekern/shipped/corpus/{train,heldout}.txt``) from
   CPython's ``pydoc_data.topics`` plus stdlib docstrings extracted with ``ast``
   (only if the files are missing or ``--rebuild-corpus`` is given; the files are
   shipped so that every machine trains and evaluates on identical text).
2. Train a byte-level BPE tokenizer (vocab 4096) on ``train.txt``.
3. Train ``MixtralForCausalLM`` (8 layers, 8 experts, top-2) for a wall-clock
   budget; the number of steps is planned from a measured throughput and the
   LR schedule (warm-up + cosine) spans the planned training time.
4. Save model (bfloat16 safetensors), tokenizer, generation config and
   ``TRAINING.json`` into the output directory.

``--minutes`` is the wall-clock budget of the *whole* script (corpus, tokenizer,
training, evaluation and saving); with the default of 14 it stays under 15
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "model"
CORPUS_DIR = HERE / "corpus"

EOT = "<|endoftext|>"
#: Separator between documents in the corpus files: a blank line, then the
#: end-of-text special token on its own line.
DOC_SEP = "\n\n" + EOT + "\n"

CORPUS_BYTES = 2_000_000
HELDOUT_FRACTION = 0.05
MIN_DOCSTRING_CHARS = 200

# Packages / folders of the stdlib whose docstrings are not used.
_SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "lib-dynload",
    "__pycache__",
    "__phello__",
}


# --------------------------------------------------------------------------- corpus


def _normalise(text: str) -> str:
    """Light whitespace normalisation: tabs -> spaces, no trailing spaces, <= 1 blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        doc = _normalise(topics[key])
        if doc:
            docs.append(doc)
    return docs


def _stdlib_modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if any(p in _SKIP_PARTS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_") or parts[-1] in {"__main__.py", "this.py"}:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstring_documents() -> list[str]:
    """Docstrings (module, class, function) of pure-Python stdlib modules, via ``ast``."""
    docs: list[str] = []
    seen: set[str] = set()
    for path in _stdlib_modules():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < MIN_DOCSTRING_CHARS:
                continue
            doc = _normalise(doc)
            if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
    return docs


def build_corpus(corpus_dir: Path, seed: int = 0, total_bytes: int = CORPUS_BYTES) -> dict:
    """Write ``train.txt`` and ``heldout.txt`` into ``corpus_dir``; return a summary."""
    rng = random.Random(seed)
    topics = _topic_documents()
    docstrings = _docstring_documents()
    # Subsample docstrings deterministically so the cap does not keep only the
    # alphabetically first modules.
    rng.shuffle(docstrings)
    docs = list(topics)
    size = sum(len(d.encode("utf-8")) + len(DOC_SEP) for d in docs)
    n_doc = 0
    for d in docstrings:
        if size >= total_bytes:
            break
        docs.append(d)
        n_doc += 1
        size += len(d.encode("utf-8")) + len(DOC_SEP)

    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    target_heldout = max(int(HELDOUT_FRACTION * size), 60_000)
    heldout, train, h_size = [], [], 0
    for i in order:
        if h_size < target_heldout:
            heldout.append(docs[i])
            h_size += len(docs[i].encode("utf-8")) + len(DOC_SEP)
        else:
            train.append(docs[i])

    corpus_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", train), ("heldout.txt", heldout)):
        (corpus_dir / name).write_text(DOC_SEP.join(part) + DOC_SEP, encoding="utf-8")
    return {
        "topics_docs": len(topics),
        "docstring_docs_used": n_doc,
        "docstring_docs_available": len(docstrings),
        "train_docs": len(train),
        "heldout_docs": len(heldout),
    }


def split_documents(text: str) -> list[str]:
    return [d.strip() for d in text.split(EOT) if d.strip()]


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(train_text: str, vocab_size: int = 4096):
    """Byte-level BPE trained with ``tokenizers``, wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(split_documents(train_text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------- model


def make_config(vocab_size: int, eot_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
        initializer_range=0.02,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        use_cache=True,
    )


def _time_fwd_bwd(model, batch: torch.Tensor, reps: int = 2) -> tuple[float, torch.Tensor]:
    """Seconds per forward+backward (after one warm-up), and the warm-up logits."""
    out = model(input_ids=batch, labels=batch, use_cache=False)
    out.loss.backward()
    logits = out.logits.detach()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / reps, logits


def pick_experts_implementation(model, batch: torch.Tensor, candidates: list[str]) -> tuple[str, dict]:
    """Time forward+backward for each experts implementation; check outputs match eager.

    On a 2-core CPU (transformers 5.17): grouped_mm ~0.63 s/step, eager ~0.78 s,
    batched_mm ~31 s (it materialises per-token expert weights), so batched_mm
    is not in the default candidate list.
    """
    timings: dict[str, float] = {}
    ref = None
    for impl in candidates:
        try:
            model.set_experts_implementation(impl)
            dt, logits = _time_fwd_bwd(model, batch)
        except Exception as exc:  # noqa: BLE001 - an unavailable implementation is skipped
            print(f"[bench] experts_implementation={impl!r} unavailable: {exc}", flush=True)
            continue
        if ref is None:
            ref = logits
            diff = 0.0
        else:
            diff = float((logits - ref).abs().max())
        ok = diff < 1e-3
        print(f"[bench] {impl:>10s}: {dt:.3f} s/fwd+bwd, {batch.numel() / dt:.0f} tok/s, max|dlogits| vs {candidates[0]}={diff:.2e}", flush=True)
        if ok:
            timings[impl] = dt
    best = min(timings, key=timings.get)
    model.set_experts_implementation(best)
    return best, timings


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_frac * peak``.

    ``progress`` in [0, 1] is the fraction of the planned training done.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class WindowSampler:
    """Epochs of non-overlapping windows with a random offset, shuffled (seeded)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []
        self.epochs = 0

    def _refill(self):
        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
        n = (len(self.ids) - offset) // self.seq_len
        starts = offset + self.seq_len * torch.randperm(n, generator=self.gen)
        self.queue.extend(starts.tolist())
        self.epochs += 1

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            self._refill()
        starts, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return torch.stack([self.ids[s : s + self.seq_len] for s in starts])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget of the whole script")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild-corpus", action="store_true")
    ap.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts-impls", default="eager,grouped_mm", help="comma-separated candidates to benchmark")
    ap.add_argument("--reserve-seconds", type=float, default=45.0, help="time kept for final eval + save")
    args = ap.parse_args(argv)

    t_start = time.time()
    deadline = t_start + 60.0 * args.minutes
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    import transformers
    from transformers import MixtralForCausalLM

    from moekern.perplexity import perplexity

    # 1. corpus ---------------------------------------------------------------
    train_path, heldout_path = args.corpus_dir / "train.txt", args.corpus_dir / "heldout.txt"
    if args.rebuild_corpus or not (train_path.exists() and heldout_path.exists()):
        info = build_corpus(args.corpus_dir, seed=0)
        print(f"[corpus] built {info}", flush=True)
    train_text = train_path.read_text(encoding="utf-8")
    heldout_text = heldout_path.read_text(encoding="utf-8")
    print(
        f"[corpus] train {len(train_text.encode()):,} B, heldout {len(heldout_text.encode()):,} B "
        f"({time.time() - t_start:.1f}s)",
        flush=True,
    )

    # 2. tokenizer ------------------------------------------------------------
    tokenizer = train_tokenizer(train_text, vocab_size=4096)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    print(
        f"[tokenizer] vocab {len(tokenizer)}, train tokens {len(train_ids):,} "
        f"({len(train_text.encode()) / len(train_ids):.2f} B/token) ({time.time() - t_start:.1f}s)",
        flush=True,
    )

    # 3. model + throughput ---------------------------------------------------
    config = make_config(len(tokenizer), eot_id)
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params:,} parameters", flush=True)
    model.train()

    sampler = WindowSampler(train_ids, args.seq_len, args.batch_size, seed=args.seed)
    bench_batch = train_ids[: args.batch_size * args.seq_len].view(args.batch_size, args.seq_len)
    impl, timings = pick_experts_implementation(model, bench_batch, args.experts_impls.split(","))
    print(f"[bench] using experts_implementation={impl!r}", flush=True)

    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
    )
    train_end = deadline - args.reserve_seconds
    step_time = timings[impl] * 1.08  # + optimizer step
    planned = max(args.warmup + 1, int((train_end - time.time()) / step_time))
    print(f"[train] planned {planned} steps (est. {step_time:.3f} s/step)", flush=True)

    # 4. training -------------------------------------------------------------
    # The plan is "as many steps as fit before ``train_end``".  The cosine
    # horizon is the planned training *time*: progress = elapsed / planned
    # duration.  With a steady step time this is exactly step / planned_steps;
    # unlike a step count fixed up front it stays correct when the machine is
    # shared and the step time varies (the run always ends its schedule on time).
    coef = config.router_aux_loss_coef
    t_train = time.time()
    train_budget = max(1.0, train_end - t_train)
    step, losses, aux_losses = 0, [], []
    while True:
        elapsed = time.time() - t_train
        if elapsed >= train_budget:
            break
        lr = lr_at(step, elapsed / train_budget, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sampler.next()
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.detach().item()
        losses.append(out.loss.detach().item() - coef * aux)
        aux_losses.append(aux)
        step += 1
        if step % 25 == 0:
            el = time.time() - t_train
            est_total = int(step * train_budget / el)
            print(
                f"[train] step {step:5d} (~{est_total} planned) lr {lr:.2e} "
                f"loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                f"aux {sum(aux_losses[-25:]) / len(aux_losses[-25:]):.3f} "
                f"{step * batch.numel() / el:.0f} tok/s epoch {sampler.epochs} elapsed {time.time() - t_start:.0f}s",
                flush=True,
            )
    train_seconds = time.time() - t_train
    final_loss = sum(losses[-50:]) / len(losses[-50:])

    # 5. save + evaluate ------------------------------------------------------
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    model.generation_config.pad_token_id = eot_id
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False  # the aux loss is for training; inference does not need the logits
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Evaluate the saved (bf16) weights in fp32, as users will load them.
    model = model.to(torch.float32)
    model.set_experts_implementation(impl)
    t_eval = time.time()
    ppl = perplexity(model, tokenizer, heldout_text, seq_len=256)
    print(f"[eval] held-out perplexity {ppl:.3f} ({time.time() - t_eval:.1f}s)", flush=True)

    prompt = "The for statement is used to"
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(args.seed)
    gen = model.generate(**enc, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
    sample = tokenizer.decode(gen[0], skip_special_tokens=True)
    print(f"[sample] {sample!r}", flush=True)

    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    record = {
        "seed": args.seed,
        "steps": step,
        "planned_steps_initial_estimate": planned,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "epochs_started": sampler.epochs,
        "train_tokens": int(len(train_ids)),
        "peak_lr": args.lr,
        "warmup_steps": args.warmup,
        "schedule": "linear warmup (steps) + cosine decay to 10% of peak over the planned training time",
        "optimizer": f"AdamW(betas=(0.9,0.95), weight_decay={args.weight_decay}), grad clip 1.0",
        "experts_implementation_train": impl,
        "bench_seconds_per_fwd_bwd": {k: round(v, 4) for k, v in timings.items()},
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "final_train_loss": round(final_loss, 4),
        "final_train_aux_loss": round(sum(aux_losses[-50:]) / len(aux_losses[-50:]), 4),
        "heldout_perplexity": round(ppl, 4),
        "heldout_perplexity_note": "fp32 eval of the saved bf16 weights, seq_len 256, non-overlapping windows",
        "sample": sample,
        "model_safetensors_mb": round(size_mb, 3),
        "parameters": n_params,
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "num_local_experts",
                "num_experts_per_tok",
                "max_position_embeddings",
                "tie_word_embeddings",
                "router_aux_loss_coef",
                "rms_norm_eps",
            )
        },
        "corpus": {
            "train_bytes": len(train_text.encode()),
            "heldout_bytes": len(heldout_text.encode()),
            "train_sha256": _sha256(train_path),
            "heldout_sha256": _sha256(heldout_path),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "threads": args.threads,
        "command": "python -m moekern.shipped.train " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out_dir / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"[done] wall {record['wall_seconds']}s, model.safetensors {size_mb:.2f} MB -> {out_dir}", flush=True)
    return record


if __name__ == "__main__":
    main()
