"""Random inputs of the op benches: group sizes like a real layer's clusters, and packed quantized weights."""
from __future__ import annotations

import torch

from rptq_cli.quant.pack import pack_rows


def cluster_sizes(k: int, groups: int, uneven: bool, seed: int = 0, multiple: int = 1) -> torch.Tensor:
    """Group sizes summing to k: equal (g = k / groups), or uneven like the KMeans clusters of a real layer, each a
    multiple of ``multiple`` channels (``--cluster-multiple``; k must be a multiple of it)."""
    if not uneven:
        sizes = torch.full((groups,), k // groups, dtype=torch.int32)
        sizes[: k % groups] += 1
        return sizes
    # KMeans-like uneven clusters: random positive sizes summing to k
    units = k // multiple
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(groups, generator=generator) + 0.2
    sizes = (weights / weights.sum() * (units - groups)).floor().to(torch.int32) + 1
    sizes[0] += units - int(sizes.sum())
    return sizes * multiple


def quantized_linear(n: int, k: int, bits: int, group_sizes: torch.Tensor, seed: int = 0, device: str = "cpu"):
    """``(qweight, scales, zeros, group_sizes)`` of a random [n, k] weight as the kernels take them on ``device``:
    packed codes, scales stored as fp16 (handed to the CPU kernels as float32, like QuantLinear.kernel_scales),
    uint8 zero-points."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(n, group_sizes.numel(), generator=generator) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, group_sizes.numel()), generator=generator, dtype=torch.uint8)
    if torch.device(device).type == "cpu":
        scales = scales.float()
    return pack_rows(codes, bits).to(device), scales.to(device), zeros.to(device), group_sizes.to(device)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
