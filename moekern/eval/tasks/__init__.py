"""Offline lm-eval tasks built from moekern's shipped corpus (nothing to download)."""
