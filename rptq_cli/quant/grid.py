"""The asymmetric affine grid shared by weights, activations and the KV cache.

A tensor quantized with ``bits`` bits uses the integer codes ``0 .. 2**bits - 1`` (``qmax``), a
per-group ``scale`` and an integer ``zero`` point:

    code = clamp(round(x * (1 / scale)) + zero, 0, qmax)         # round half to even
    x̂    = (code - zero) * scale

``scale = (hi - lo) / qmax`` and ``zero = round(-lo / scale)``, with the range widened to contain 0 so
that zero is exactly representable (padding, ReLU zeros, masked positions stay exact). The official
RPTQ code divides by ``2**bits`` and clips its top step; we use the standard grid.

Compiled kernels compute ``x * (1 / scale)`` in float32 exactly as written here, which is what makes
their integer codes bit-exact against this reference.

Groups are contiguous runs of channels along the last dimension given by ``group_sizes`` (uneven,
e.g. the KMeans clusters of a reorder point); per-group parameters are expanded to per-channel ones
with :func:`expand_groups`.
"""
from __future__ import annotations

import torch

MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest code of a ``bits``-bit unsigned grid."""
    return (1 << bits) - 1


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of the grid covering ``[min(lo, 0), max(hi, 0)]``.

    lo, hi: float tensors of any (equal) shape. Returns ``scale`` (float32, same shape, > 0) and
    ``zero`` (int32, same shape, in ``[0, qmax]``).
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    scale = ((hi - lo) / qmax(bits)).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(0, qmax(bits)).to(torch.int32)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` (any float dtype) on the grid; ``scale``/``zero`` broadcast against ``x``.

    Returns uint8 codes (bits ≤ 8) of the shape of ``x``.
    """
    inv_scale = 1.0 / scale.float()
    codes = torch.round(x.float() * inv_scale) + zero.float()
    return codes.clamp_(0, qmax(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 values ``(codes - zero) * scale`` (broadcasting)."""
    return (codes.float() - zero.float()) * scale.float()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x``; returns the dtype of ``x``."""
    return dequantize(quantize(x, scale, zero, bits), scale, zero).to(x.dtype)


def token_group_params(x: torch.Tensor, group_sizes: torch.Tensor, clip: torch.Tensor,
                       bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic grids: the scale and zero of each token's values in each channel group.

    x: float [..., C] (a token per row); group_sizes: int [G], sum C; clip: float32 [G], the share of each
    group's range the grid covers (1 = the token's min/max; below 1 the extremes are clipped). Returns
    ``scale`` float32 [..., G] and ``zero`` int32 [..., G] of :func:`affine_params` over each (token, group)'s
    own min/max (widened to 0) times ``clip``.
    """
    x = x.float()
    index = torch.repeat_interleave(torch.arange(group_sizes.numel(), device=x.device),
                                    group_sizes.to(x.device).long()).expand_as(x)
    # starting from 0 includes 0 in every range, as affine_params does anyway
    lo = x.new_zeros((*x.shape[:-1], group_sizes.numel())).scatter_reduce_(-1, index, x, "amin")
    hi = x.new_zeros(lo.shape).scatter_reduce_(-1, index, x, "amax")
    clip = clip.float().to(x.device)
    return affine_params(lo * clip, hi * clip, bits)


def expand_groups(per_group: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Repeat ``per_group[..., g]`` ``group_sizes[g]`` times along the last dim (→ per channel)."""
    return torch.repeat_interleave(per_group, group_sizes.to(per_group.device).long(), dim=-1)


def group_min_max(lo: torch.Tensor, hi: torch.Tensor, group_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min of ``lo`` and max of ``hi`` over contiguous channel groups (last dim)."""
    bounds = torch.cumsum(group_sizes.long(), 0)
    starts = (bounds - group_sizes.long()).tolist()
    glo = torch.stack([lo[..., s:e].amin(-1) for s, e in zip(starts, bounds.tolist())], -1)
    ghi = torch.stack([hi[..., s:e].amax(-1) for s, e in zip(starts, bounds.tolist())], -1)
    return glo, ghi
