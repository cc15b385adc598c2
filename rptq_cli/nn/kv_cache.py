"""A transformers ``Cache`` whose layers hold K and V as packed per-cluster codes, not fp16 values.

Each layer keeps uint8 codes [B, kv_heads, T, packed_row_bytes(head_dim, bits)] and the static
per-channel (cluster-expanded) scales and zero-points of its K and V quantizers; nothing grows with T but
the codes, so a token costs exactly bits/16 of its fp16 size (plus block padding when head_dim is not a
multiple of 32). ``update`` quantizes the new keys (after the post-RoPE R2 gather) and values, appends them,
and returns the layer itself: :func:`rptq_cli.nn.attention.rptq_attention` recognises it and attends over
the packed codes with ``rptq::decode_attention``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import kernels
from ..quant.grid import expand_groups

if TYPE_CHECKING:
    from .attention import AttentionQuant


class PackedKVLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, spec: AttentionQuant):
        super().__init__()
        self.spec = spec
        self.bits = spec.k.bits
        self.length = 0

    @staticmethod
    def _per_channel(quant, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = expand_groups(quant.scale, quant.group_sizes).view(heads, -1).contiguous()
        zero = expand_groups(quant.zero, quant.group_sizes).view(heads, -1).to(torch.int32).contiguous()
        return scale, zero

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.head_dim, self.dtype, self.device = d, key_states.dtype, key_states.device
        self.k_scale, self.k_zero = self._per_channel(self.spec.k, h)
        self.v_scale, self.v_zero = self._per_channel(self.spec.v, h)
        row = kernels.kv_row_bytes(d, self.bits)
        self.keys = torch.empty(b, h, 0, row, dtype=torch.uint8, device=self.device)
        self.values = torch.empty(b, h, 0, row, dtype=torch.uint8, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states = self.spec.permute_k(key_states)
        k = kernels.kv_pack(key_states.contiguous(), self.k_scale, self.k_zero, self.bits)
        v = kernels.kv_pack(value_states.contiguous(), self.v_scale, self.v_zero, self.bits)
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.length += key_states.shape[2]
        return self, self

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float K (in R2 order) and V of the whole cache — the fallback path, for masks with padding."""
        k = kernels.kv_unpack(self.keys, self.k_scale, self.k_zero, self.bits, self.head_dim)
        v = kernels.kv_unpack(self.values, self.v_scale, self.v_zero, self.bits, self.head_dim)
        return k.to(self.dtype), v.to(self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


class PackedKVCache(Cache):
    """One :class:`PackedKVLayer` per decoder layer, built from the model's attention quantizers."""

    def __init__(self, specs: list[AttentionQuant]):
        super().__init__(layers=[PackedKVLayer(spec) for spec in specs])

    @classmethod
    def from_model(cls, model: nn.Module) -> "PackedKVCache | None":
        """The packed cache of a quantized model, or None when its K/V are not quantized (use a DynamicCache)."""
        from .attention import AttentionQuant
        specs = [m for m in model.modules() if isinstance(m, AttentionQuant)]
        if not specs or any(s.k is None or s.v is None or s.k.bits != s.v.bits for s in specs):
            return None
        return cls(specs)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
