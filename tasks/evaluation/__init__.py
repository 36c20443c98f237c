"""Evaluation as the papers do it: perplexity on text data sets and lm-eval zero-shot accuracy."""
