"""rptq: reorder-based post-training quantization (RPTQ) of LLMs, with real packed kernels."""

__version__ = "0.1.0"
