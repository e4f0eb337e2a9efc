"""Evaluation: lm-eval tasks on an in-memory model (harness.py), offline task files (local_tasks.py, tasks/).
Held-out perplexity, which the shipped model's trainer and the finetuning use as well, is moekern.perplexity."""
