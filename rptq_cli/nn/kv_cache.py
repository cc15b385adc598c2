"""A transformers ``Cache`` whose layers hold K and V as packed per-cluster codes, not fp16 values.

Each layer keeps uint8 codes [B, kv_heads, capacity, packed_row_bytes(head_dim, bits)] and the static
per-channel (cluster-expanded) scales and zero-points of its K and V quantizers; nothing grows with T but
the codes, so a token costs exactly bits/16 of its fp16 size (plus block padding when head_dim is not a
multiple of 32). ``update`` quantizes the new keys (after the post-RoPE R2 gather) and values straight into
the preallocated buffers with ``rptq::kv_append`` and returns the layer itself:
:func:`rptq_cli.nn.attention.rptq_attention` recognises it and attends over the first ``length`` positions
with ``rptq::decode_attention``.

Capacity: ``max_length`` when the caller knows it (``rptq generate`` does: prompt + new tokens), so nothing is
ever copied; otherwise the buffers grow by half their size, rounded up to ``GROWTH_TOKENS``, which keeps the
copying amortised O(1) per token and the slack under a third of the memory.
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

    GROWTH_TOKENS = 256

    def __init__(self, spec: AttentionQuant, max_length: int | None = None):
        super().__init__()
        self.spec = spec
        self.bits = spec.k.bits
        self.max_length = max_length
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

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions, keeping the codes already written."""
        if needed <= self.capacity:
            return
        target = max(needed, self.max_length or 0, self.capacity + self.capacity // 2)
        target = -(-target // self.GROWTH_TOKENS) * self.GROWTH_TOKENS
        b, h, _, row = self.keys.shape
        for name in ("keys", "values"):
            grown = torch.empty(b, h, target, row, dtype=torch.uint8, device=self.device)
            grown[:, :, :self.length] = getattr(self, name)[:, :, :self.length]
            setattr(self, name, grown)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._reserve(self.length + key_states.shape[2])
        key_states = self.spec.permute_k(key_states)
        kernels.kv_append(self.keys, key_states.contiguous(), self.k_scale, self.k_zero, self.bits, self.length)
        kernels.kv_append(self.values, value_states.contiguous(), self.v_scale, self.v_zero, self.bits, self.length)
        self.length += key_states.shape[2]
        return self, self

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float K (in R2 order) and V of the filled positions — the fallback path, for masks with padding."""
        k, v = (kernels.kv_unpack(codes[:, :, :self.length].contiguous(), scale, zero, self.bits, self.head_dim)
                for codes, scale, zero in ((self.keys, self.k_scale, self.k_zero),
                                           (self.values, self.v_scale, self.v_zero)))
        return k.to(self.dtype), v.to(self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes the stored tokens occupy (K and V); the preallocated tail is in :meth:`reserved_nbytes`."""
        if not self.is_initialized:
            return 0
        b, h, _, row = self.keys.shape
        return 2 * b * h * self.length * row

    def reserved_nbytes(self) -> int:
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

    def __init__(self, specs: list[AttentionQuant], max_length: int | None = None):
        super().__init__(layers=[PackedKVLayer(spec, max_length) for spec in specs])

    @classmethod
    def from_model(cls, model: nn.Module, max_length: int | None = None) -> "PackedKVCache | None":
        """The packed cache of a quantized model, or None when its K/V are not quantized (use a DynamicCache).
        ``max_length`` (tokens per sequence) preallocates the buffers once; without it they grow as needed."""
        from .attention import AttentionQuant
        specs = [m for m in model.modules() if isinstance(m, AttentionQuant)]
        if not specs or any(s.k is None or s.v is None or s.k.bits != s.v.bits for s in specs):
            return None
        return cls(specs, max_length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        return sum(layer.reserved_nbytes() for layer in self.layers)
