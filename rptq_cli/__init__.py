"""rptq: reorder-based post-training quantization (RPTQ) of LLMs, with real packed kernels."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting steal the cores of a shared machine and slow every parallel op
# (ours and torch's) 5-15x under load; sleeping waiters cost little when the machine is quiet. Must be set
# before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_quantized(path, **kwargs):
    """Load an rptq checkpoint directory → ``(model, tokenizer)`` (see :func:`rptq_cli.export.load_quantized`)."""
    from .export import load_quantized as _load
    return _load(path, **kwargs)


def __getattr__(name):
    # lazy: `import rptq_cli` must not import torch (every `rptq` command starts with it)
    if name == "PackedKVCache":
        from .nn.kv_cache import PackedKVCache
        return PackedKVCache
    raise AttributeError(f"module 'rptq_cli' has no attribute {name!r}")


# AutoModelForCausalLM.from_pretrained(rptq checkpoint): registered when transformers loads (hf_integration.py)
from .hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()
