"""rptq: reorder-based post-training quantization (RPTQ) of LLMs, with real packed kernels."""

__version__ = "0.1.0"


def load_quantized(path, **kwargs):
    """Load an rptq checkpoint directory → ``(model, tokenizer)`` (see :func:`rptq_cli.export.load_quantized`)."""
    from .export import load_quantized as _load
    return _load(path, **kwargs)
