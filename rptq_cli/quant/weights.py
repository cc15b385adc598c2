"""Group-quantized linear weights and the round-to-nearest (RTN) quantizer.

A weight ``W [N, K]`` (nn.Linear layout: N outputs, K inputs) has one (scale, zero) per output row
and group of input columns. Groups are contiguous runs of columns given by ``group_sizes`` (uneven:
RPTQ uses the clusters of the layer's input, so each activation cluster meets one weight scale).

Scales are stored in float16. Every quantizer therefore rounds the scale to float16 *before*
computing the codes, so the dequantized weight is exactly what a reload of the checkpoint gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .clip import CLIP_RATIOS, shrink_search
from .grid import dequantize, expand_groups, group_min_max, qmax, quantize

FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal): a smaller scale would round to 0
FP16_MAX = 65504.0


@dataclass
class QuantizedWeight:
    """A group-quantized weight.

    codes: uint8 [N, K], unpacked, values in 0 .. 2**bits - 1
    scales: float16 [N, G]; zeros: uint8 [N, G]
    group_sizes: int32 [G], sum K (contiguous runs of input columns, uneven allowed)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_sizes: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: ``(codes - zeros[:, g(k)]) * scales[:, g(k)]``."""
        scale = expand_groups(self.scales.float(), self.group_sizes)
        zero = expand_groups(self.zeros, self.group_sizes)
        return dequantize(self.codes, scale, zero)


def fp16_affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`grid.affine_params`, with the scale on the float16 grid.

    lo, hi: float, any (equal) shape. Returns ``scale`` float32 (exactly representable in float16)
    and ``zero`` int32 in ``[0, qmax]``. The scale is rounded *up* so that the grid still covers
    ``[lo, hi]``, and the zero-point is computed from the rounded scale (as a reload would see it).
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    exact = ((hi - lo) / qmax(bits)).clamp(FP16_MIN_SCALE, FP16_MAX)
    half = exact.half()
    half = torch.where(half.float() < exact, torch.nextafter(half, torch.full_like(half, FP16_MAX)), half)
    scale = half.float()
    zero = torch.round(-lo / scale).clamp(0, qmax(bits)).to(torch.int32)
    return scale, zero


def weight_group_sizes(in_features: int, spec: str | int, input_cluster_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Group sizes (int32 [G], sum ``in_features``) of a weight's input columns.

    spec: ``"cluster"`` (the clusters of the layer's input, ``input_cluster_sizes``), ``"channel"``
    (one group per output row) or an int g / digit string (groups of g columns, the last one shorter).
    """
    if spec == "cluster":
        if input_cluster_sizes is None:
            raise ValueError("weight groups 'cluster' need the input's cluster sizes (input_cluster_sizes is None)")
        return check_cluster_sizes(in_features, input_cluster_sizes)
    if spec == "channel":
        return torch.tensor([in_features], dtype=torch.int32)
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if not isinstance(spec, int) or isinstance(spec, bool) or spec <= 0:
        raise ValueError(f"unknown weight group spec {spec!r}: not 'cluster', 'channel' or a positive group size like 128")
    full, rest = divmod(in_features, spec)
    return torch.tensor([spec] * full + ([rest] if rest else []), dtype=torch.int32)


def check_cluster_sizes(in_features: int, cluster_sizes: torch.Tensor) -> torch.Tensor:
    """``cluster_sizes`` as int32 [G] on the CPU; ValueError unless they are positive and sum to ``in_features``
    (clusters calibrated on another model or with other settings)."""
    sizes = torch.as_tensor(cluster_sizes, dtype=torch.int32).cpu()
    if int(sizes.sum()) != in_features or bool((sizes <= 0).any()):
        raise ValueError(f"cluster sizes {sizes.tolist()} do not split {in_features} input columns: the clusters "
                         "were calibrated for another model or other settings")
    return sizes


def rtn_quantize(
    weight: torch.Tensor,
    group_sizes: torch.Tensor,
    bits: int,
    clip: bool = False,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` float [N, K] with min/max per (row, group).

    clip: per (row, group), shrink the range by the ratio (of ``ratios``) with the lowest squared
    error of the weight, instead of taking the plain min/max.
    """
    w = weight.detach().float()
    group_sizes = group_sizes.to(torch.int32).cpu()
    lo, hi = group_min_max(w, w, group_sizes)  # [N, G]
    if clip:
        lo, hi = shrink_search(w[:, None], lo, hi, group_sizes, bits, ratios)
    scale, zero = fp16_affine_params(lo, hi, bits)
    codes = quantize(w, expand_groups(scale, group_sizes), expand_groups(zero, group_sizes), bits)
    return QuantizedWeight(codes, scale.half(), zero.to(torch.uint8), group_sizes, bits)
