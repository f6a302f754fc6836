"""lowbit: extremely low-bit quantization of Hugging Face causal language models, with measurements."""

__version__ = "0.1.0"
