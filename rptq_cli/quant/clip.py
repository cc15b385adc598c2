"""Clipping search: shrink a group's range when that lowers the mean squared quantization error.

A min/max range is set by the few largest values of a group; shrinking it clips those values but
gives every other value a finer grid. We try the range scaled by each ratio (towards 0, which the
grid always contains) and keep, per group, the ratio with the lowest squared error on the given
values. Ratio 1.0 is always a candidate and wins ties, so the result is never worse than min/max on
those values.
"""
from __future__ import annotations

import torch

from .grid import affine_params, expand_groups, fake_quantize, group_min_max, token_group_params

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))  # 1.0, 0.95, ..., 0.6


def group_index(group_sizes: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each channel: int64 [sum(group_sizes)], e.g. sizes [2, 1] -> [0, 0, 1]."""
    device = group_sizes.device if device is None else device
    sizes = group_sizes.to(device).long()
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def shrink_search(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    group_sizes: torch.Tensor,
    bits: int,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch row, group) range ``(lo·r, hi·r)`` minimising ``Σ_t Σ_{c∈g} (x̂ − x)²``.

    x: float [B, T, C] (B independent rows, e.g. weight rows with T = 1, or B = 1 with T samples);
    lo, hi: float [B, G] initial (min/max) ranges; group_sizes: int [G], sum C.
    Returns float32 ``(lo, hi)`` [B, G]. Vectorised over rows and groups; loops over the ratios only.
    """
    x = x.float()
    lo, hi = lo.float(), hi.float()
    index = group_index(group_sizes, x.device)
    best_lo, best_hi, best_err = lo, hi, None
    for ratio in (1.0, *(r for r in ratios if r != 1.0)):
        scale, zero = affine_params(lo * ratio, hi * ratio, bits)
        x_hat = fake_quantize(x, expand_groups(scale, group_sizes)[:, None], expand_groups(zero, group_sizes)[:, None], bits)
        # float64 sums: the comparison between ratios must not be decided by rounding noise
        per_channel = (x_hat - x).square().sum(1, dtype=torch.float64)  # [B, C]
        err = per_channel.new_zeros(lo.shape).index_add_(1, index, per_channel)  # [B, G]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err  # strict: ties keep the wider range
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return best_lo, best_hi


def search_token_clip(
    samples: torch.Tensor,
    group_sizes: torch.Tensor,
    bits: int,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> torch.Tensor:
    """Per-group clip ratio of per-token grids minimising the fake-quantization MSE of ``samples``.

    samples: float [T, C] activations in the groups' channel order; group_sizes: int [G], sum C. Each token's
    grid covers its own min/max in the group times the ratio. Returns float32 [G]; ratio 1.0 wins ties.
    """
    x = samples.float()
    index = group_index(group_sizes, x.device)
    best_ratio, best_err = torch.ones(group_sizes.numel()), None
    for ratio in (1.0, *(r for r in ratios if r != 1.0)):
        candidate = torch.full((group_sizes.numel(),), ratio)
        scale, zero = token_group_params(x, group_sizes, candidate, bits)
        x_hat = fake_quantize(x, expand_groups(scale, group_sizes), expand_groups(zero, group_sizes), bits)
        per_channel = (x_hat - x).square().sum(0, dtype=torch.float64)  # [C]
        err = per_channel.new_zeros(group_sizes.numel()).index_add_(0, index, per_channel)  # [G]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, candidate, best_ratio)
    return best_ratio


def search_clip(
    samples: torch.Tensor,
    group_sizes: torch.Tensor,
    bits: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group activation range minimising the fake-quantization MSE of ``samples``.

    samples: float [T, C] activations in the (reordered) channel order of the groups, e.g. a random
    subset of the calibration tokens; group_sizes: int [G], sum C; lo, hi: float [C] calibrated
    per-channel min/max. Candidates are the group's min/max range scaled by each ratio.
    Returns float32 ``(lo_g, hi_g)`` [G].
    """
    glo, ghi = group_min_max(lo.float(), hi.float(), group_sizes)
    best_lo, best_hi = shrink_search(samples[None], glo[None], ghi[None], group_sizes, bits, ratios)
    return best_lo[0], best_hi[0]
