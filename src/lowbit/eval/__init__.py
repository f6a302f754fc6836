"""Models, texts and evaluation (perplexity, KL to the full-precision model, sizes)."""
