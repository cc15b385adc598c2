"""Activation quantizers over channel groups: static (one (scale, zero) per group, fixed at calibration) or
per token (each token's own (scale, zero) per group, computed at run time from its values)."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..quant import grid
from .derived import derived


class ActQuant(nn.Module):
    """Fake-quantizes the last dim of its input on per-group grids.

    Buffers: ``group_sizes`` int32 [G] (Σ = channels); a static quantizer has ``scale`` float32 [G] and
    ``zero`` int32 [G]; a per-token one has ``clip`` float32 [G] (the share of each token's range in the group
    that its grid covers) and derives scale and zero from each token at run time.
    """

    def __init__(self, scale: torch.Tensor | None, zero: torch.Tensor | None, group_sizes: torch.Tensor, bits: int,
                 clip: torch.Tensor | None = None):
        super().__init__()
        if (scale is None) == (clip is None):
            raise ValueError("ActQuant is either static (scale, zero) or per token (clip)")
        self.bits = int(bits)
        self.register_buffer("scale", None if scale is None else scale.float().contiguous())
        self.register_buffer("zero", None if zero is None else zero.to(torch.int32).contiguous())
        self.register_buffer("clip", None if clip is None else clip.float().contiguous())
        self.register_buffer("group_sizes", group_sizes.to(torch.int32).contiguous())
        self.kv_cache = False  # set by AttentionQuant for K and V: per-token grids then follow the cache's format

    @classmethod
    def per_token(cls, group_sizes: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> "ActQuant":
        clip = torch.ones(group_sizes.numel()) if clip is None else clip
        return cls(None, None, group_sizes, bits, clip=clip)

    @property
    def dynamic(self) -> bool:
        return self.scale is None

    @classmethod
    def from_range(cls, lo: torch.Tensor, hi: torch.Tensor, group_sizes: torch.Tensor, bits: int) -> "ActQuant":
        scale, zero = grid.affine_params(lo, hi, bits)
        return cls(scale, zero, group_sizes, bits)

    def head_groups(self, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-token quantizer's groups (flat, head-major) as the KV cache kernels take them: group sizes int32
        [heads, G] and clip ratios float32 [heads, G], shorter rows padded with empty groups. Built once: the
        float path asks for them on every forward."""
        return derived(self, f"_head_groups_{heads}_{head_dim}", (self.group_sizes, self.clip),
                       lambda: self._build_head_groups(heads, head_dim))

    def _build_head_groups(self, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, row, filled = [], [], 0
        for size, clip in zip(self.group_sizes.tolist(), self.clip.tolist()):
            row.append((size, clip))
            filled += size
            if filled > head_dim:
                raise ValueError(f"a KV group crosses a head boundary (head_dim {head_dim}): per-token KV grids "
                                 "need per-head clusters")
            if filled == head_dim:
                rows.append(row)
                row, filled = [], 0
        if row or len(rows) != heads:
            raise ValueError(f"the KV groups cover {len(rows)} heads of {head_dim} channels, expected {heads}")
        g = max(map(len, rows))
        rows = [r + [(0, 1.0)] * (g - len(r)) for r in rows]
        sizes = torch.tensor([[size for size, _ in r] for r in rows], dtype=torch.int32, device=self.clip.device)
        clips = torch.tensor([[clip for _, clip in r] for r in rows], dtype=torch.float32, device=self.clip.device)
        return sizes, clips

    @property
    def channels(self) -> int:
        return int(self.group_sizes.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return kernels.fake_quant_act_token(x, self.group_sizes, self.clip, self.bits)
        return kernels.fake_quant_act(x, self.scale, self.zero, self.group_sizes, self.bits)

    def forward_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize a [B, H, T, D] tensor whose channels are the flattened (H, D). Per-token K and V are
        quantized as the packed KV cache stores them (:meth:`head_groups`, ``kernels.fake_quant_kv_token``)."""
        b, h, t, d = x.shape
        if self.dynamic and self.kv_cache:
            return kernels.fake_quant_kv_token(x, *self.head_groups(h, d), self.bits)
        flat = x.transpose(1, 2).reshape(b, t, h * d)
        return self(flat).reshape(b, t, h, d).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'per token' if self.dynamic else 'static'}, groups={self.group_sizes.numel()}, channels={self.channels}"
