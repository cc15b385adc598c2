"""What a checkpoint and a KV cache cost, in bytes and bits, as printed by `quantize` and `generate -v`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .export import INDEX_NAME, WEIGHTS_NAME, weight_files
from .nn.linear import QuantLinear
from .quant.pack import ideal_bytes, packed_row_bytes

MiB = 1024 * 1024


def fp16_model_bytes(source: str, model: nn.Module) -> int:
    """The FP model's weight files when it is a local directory, else 2 bytes per parameter (fp16)."""
    files = weight_files(source)
    if files:
        return sum(f.stat().st_size for f in files)
    return 2 * sum(p.numel() for p in model.parameters())


def linear_bytes(model: nn.Module) -> tuple[int, int, float]:
    """(quantized weights' bytes incl. scales and zero-points, their weight count, their ideal bytes)."""
    nbytes = weights = 0
    ideal = 0.0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bits < 16:
            n, k, g = m.out_features, m.in_features, m.group_sizes.numel()
            nbytes += (m.qweight.nbytes + m.scales.numel() * 2 + packed_row_bytes(n * g, m.bits)
                       + m.group_sizes.nbytes)
            weights += n * k
            ideal += ideal_bytes(n, k, g, m.bits)
    return nbytes, weights, ideal


def checkpoint_summary(directory: Path, source: str, model: nn.Module) -> str:
    files = [directory / WEIGHTS_NAME] if (directory / WEIGHTS_NAME).exists() else \
        [f for f in directory.glob("model-*.safetensors")] + [directory / INDEX_NAME]
    size = sum(f.stat().st_size for f in files)
    fp = fp16_model_bytes(source, model)
    nbytes, weights, ideal = linear_bytes(model)
    lines = [f"checkpoint weights: {size / MiB:.2f} MiB vs {fp / MiB:.2f} MiB FP16 ({size / fp:.3f}×)"]
    if weights:
        lines.append(f"quantized linear layers: {8 * nbytes / weights:.3f} bits per weight, scales and zero-points "
                     f"included ({nbytes / ideal:.3f}× their format's ideal size)")
    return "\n".join(lines)


def kv_bytes_line(cache) -> str:
    """Measured bytes per token of the cache (packed codes, or float values) against an fp16 cache of the same
    shape."""
    layer = cache.layers[0]
    heads, head_dim = layer.keys.shape[1], layer.head_dim
    fp16 = 2 * len(cache.layers) * heads * head_dim * 2
    per_token = cache.nbytes() / (layer.length * layer.keys.shape[0])
    return (f"KV cache: {per_token:.1f} bytes/token ({layer.stored}) vs {fp16} fp16 "
            f"({per_token / fp16:.4f}× = {16 * per_token / fp16:.2f}/16)")
