"""lowbit: extremely low-bit quantization of Hugging Face causal language models, with measurements.

The public API (everything else is internal)::

    import lowbit
    model, tok, _ = lowbit.load("smollm2-135m")               # name, HF folder, .gguf or quantized folder
    cfg = lowbit.QuantConfig(bits=2, group_size=64)           # what to quantize
    lowbit.quantize(model, cfg, lowbit.GPTQ(), tokenizer=tok) # a method object (or "rtn"/"gptq"), in place
    print(lowbit.eval_model(model, tok, "wiki-eval", reference=lowbit.load()[0]))
    lowbit.save_quantized(model, tok, "out/q2")               # packed folder, loads with lowbit.load
"""

__version__ = "0.1.0"

_API = {
    "load": "lowbit.api",
    "quantize": "lowbit.api",
    "quantize_to_dir": "lowbit.api",
    "stream_quantize_to_dir": "lowbit.ptq.streaming",
    "eval_model": "lowbit.api",
    "QuantConfig": "lowbit.quant.surgery",
    "RTN": "lowbit.ptq.methods",
    "GPTQ": "lowbit.ptq.methods",
    "Budget": "lowbit.budget.planner",
    "BlockAP": "lowbit.train.blockap",
    "Auto": "lowbit.budget.auto",
    "QAT": "lowbit.train",
    "make_method": "lowbit.ptq.methods",
    "register_method": "lowbit.ptq.methods",
    "quantize_model": "lowbit.quant.surgery",
    "make_quantizer": "lowbit.quant.quantizers",
    "rtn": "lowbit.ptq.gptq",
    "gptq": "lowbit.ptq.gptq",
    "evaluate": "lowbit.eval.evaluation",
    "size_account": "lowbit.eval.evaluation",
    "save_quantized": "lowbit.store.folder",
    "load_quantized": "lowbit.store.folder",
    "LowbitError": "lowbit.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the API lazily so that ``lowbit --help`` starts fast."""
    if name in _API:
        from lowbit.lazy import load_object

        return load_object(f"{_API[name]}:{name}")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
