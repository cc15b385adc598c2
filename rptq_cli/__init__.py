"""rptq: reorder-based post-training quantization (RPTQ) of LLMs, with real packed kernels."""

import os

__version__ = "0.1.0"

# OpenMP threads wait between parallel regions by spinning, then sleeping. libgomp's default spin (300 000 turns)
# steals the cores of a shared machine and slowed every parallel op 5-15x under load; never spinning
# (OMP_WAIT_POLICY=PASSIVE) makes each of a decode step's hundreds of small parallel ops wake sleeping threads,
# which halved decode speed on a quiet machine (SmolLM2 W4A4KV 48.6 against 23.9 ms/token, HF bf16 137 against
# 68). A short spin keeps both: 23-25 ms/token. Must be set before torch loads libgomp; an explicit OMP_WAIT_POLICY
# or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


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
