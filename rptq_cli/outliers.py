"""A function-preserving rescale that gives a small model the outlier channels of large real LLMs.

Large OPT models carry a few activation channels a hundred times wider than the rest; small models lack
them. Multiplying some norm channels' gamma (and beta) by s and dividing the same input columns of the
linears that read the norm by s leaves the model's function unchanged (exactly, up to float rounding)
while its norm outputs — the tensors RPTQ quantizes at R1 and R4 — get outliers of about s×.
"""
from __future__ import annotations

import torch
from torch import nn

from .models.base import Family


@torch.no_grad()
def inject_outliers(model: nn.Module, family: Family, *, channels: int = 4, low: float = 20.0, high: float = 60.0,
                    seed: int = 0) -> None:
    """Scale ``channels`` random channels of every R1/R4 norm by a factor in [low, high], in place."""
    gen = torch.Generator().manual_seed(seed)
    for layer in family.decoder_layers(model):
        for _, norm_path, consumers in family.norm_points():
            norm = layer.get_submodule(norm_path)
            width = norm.weight.numel()
            idx = torch.randperm(width, generator=gen)[:min(channels, width)]
            factor = low + (high - low) * torch.rand(len(idx), generator=gen)
            norm.weight[idx] *= factor.to(norm.weight.dtype)
            if getattr(norm, "bias", None) is not None:
                norm.bias[idx] *= factor.to(norm.bias.dtype)
            for path in consumers:
                weight = layer.get_submodule(path).weight
                weight[:, idx] /= factor.to(weight.dtype)
