"""Evaluation utilities (held-out perplexity, ...)."""
