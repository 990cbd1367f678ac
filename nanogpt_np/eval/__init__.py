"""Evaluation: loss, perplexity and bits per byte of a model on text, task metrics (accuracy, F1, BLEU)."""
