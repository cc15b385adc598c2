"""Static activation quantizer: one (scale, zero) per channel group, fixed at calibration."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..quant import grid


class ActQuant(nn.Module):
    """Fake-quantizes the last dim of its input with per-group static parameters.

    Buffers: ``scale`` float32 [G], ``zero`` int32 [G], ``group_sizes`` int32 [G] (Σ = channels).
    """

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, group_sizes: torch.Tensor, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.to(torch.int32).contiguous())
        self.register_buffer("group_sizes", group_sizes.to(torch.int32).contiguous())

    @classmethod
    def from_range(cls, lo: torch.Tensor, hi: torch.Tensor, group_sizes: torch.Tensor, bits: int) -> "ActQuant":
        scale, zero = grid.affine_params(lo, hi, bits)
        return cls(scale, zero, group_sizes, bits)

    @property
    def channels(self) -> int:
        return int(self.group_sizes.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fake_quant_act(x, self.scale, self.zero, self.group_sizes, self.bits)

    def forward_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize a [B, H, T, D] tensor whose channels are the flattened (H, D)."""
        b, h, t, d = x.shape
        flat = x.transpose(1, 2).reshape(b, t, h * d)
        return self(flat).reshape(b, t, h, d).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.group_sizes.numel()}, channels={self.channels}"
