"""A transformers ``Cache`` whose layers hold K and V as packed per-cluster codes, not fp16 values.

Each layer keeps uint8 codes [B, kv_heads, capacity, packed_row_bytes(head_dim, bits)] and the grids they are
written on, as the K and V quantizers say (config.KV_GRIDS):

* static grids: one (scale, zero) per channel (cluster-expanded), fixed at calibration; nothing grows with T
  but the codes, so a token costs exactly bits/16 of its fp16 size (plus block padding when head_dim is not a
  multiple of 32). Attention runs ``rptq::decode_attention``.
* per-token grids: each token's own float16 scale and uint8 zero per cluster of its head, written beside its
  codes by ``rptq::kv_append_token`` (3 bytes per cluster per token and head). Attention runs
  ``rptq::decode_attention_token``.

``update`` quantizes the new keys (after the post-RoPE R2 gather) and values straight into the preallocated
buffers and returns the layer itself: :func:`rptq_cli.nn.attention.rptq_attention` recognises it and calls
:meth:`PackedKVLayer.attend` over the first ``length`` positions.

Layers whose K and V stay in floating point (W4A16, W8A8) get a :class:`FloatKVLayer`: the same preallocated
buffers, holding the values as they come. transformers' DynamicCache concatenates each new token onto the whole
cache instead, a copy of every cached byte on every step (Llama-7B at 2048 tokens in float32: 2 GB a token).

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


class PreallocatedLayer(CacheLayerMixin):
    """A cache layer whose tensors (:attr:`_buffers`) hold one entry per position along dim 2 in buffers allocated
    ahead (``max_length``) or grown by half (:meth:`_reserve`); the first :attr:`length` positions are filled.
    Subclasses set ``head_dim`` when they initialize and say what they store (:attr:`stored`)."""
    is_sliding = False
    is_compileable = False

    GROWTH_TOKENS = 256

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.max_length = max_length
        self.length = 0

    @property
    def _buffers(self) -> tuple[str, ...]:
        return ("keys", "values")

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions, keeping what is already written."""
        if needed <= self.capacity:
            return
        target = max(needed, self.max_length or 0, self.capacity + self.capacity // 2)
        target = -(-target // self.GROWTH_TOKENS) * self.GROWTH_TOKENS
        for name in self._buffers:
            old = getattr(self, name)
            grown = old.new_empty((*old.shape[:2], target, *old.shape[3:]))
            grown[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, grown)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes the stored tokens occupy (and, packed, their per-token grids); the preallocated tail is in
        :meth:`reserved_nbytes`."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name)[:, :, :self.length].nbytes for name in self._buffers)

    def reserved_nbytes(self) -> int:
        return 0 if not self.is_initialized else sum(getattr(self, name).nbytes for name in self._buffers)

    def reset(self) -> None:
        for name in self._buffers:
            setattr(self, name, None)
        self.is_initialized = False
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            for name in self._buffers:
                buffer = getattr(self, name)
                setattr(self, name, buffer.index_select(0, beam_idx.to(buffer.device)))


class FloatKVLayer(PreallocatedLayer):
    """K and V as the model computes them (not quantized), written in place into the preallocated buffers."""

    @property
    def stored(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} values"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, self.head_dim))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self._reserve(end)
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class PackedKVLayer(PreallocatedLayer):
    def __init__(self, spec: AttentionQuant, max_length: int | None = None):
        super().__init__(max_length)
        self.spec = spec
        self.bits = spec.k.bits
        self.per_token = spec.k.dynamic

    @staticmethod
    def _per_channel(quant, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = expand_groups(quant.scale, quant.group_sizes).view(heads, -1).contiguous()
        zero = expand_groups(quant.zero, quant.group_sizes).view(heads, -1).to(torch.int32).contiguous()
        return scale, zero

    @property
    def stored(self) -> str:
        return f"{self.bits}-bit codes"

    @property
    def _buffers(self) -> tuple[str, ...]:
        """The tensors that hold one entry per position (dim 2) and grow with the cache."""
        return ("keys", "values", "k_scale", "k_zero", "v_scale", "v_zero") if self.per_token else ("keys", "values")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.head_dim, self.dtype, self.device = d, key_states.dtype, key_states.device
        row = kernels.kv_row_bytes(d, self.bits)
        self.keys = torch.empty(b, h, 0, row, dtype=torch.uint8, device=self.device)
        self.values = torch.empty(b, h, 0, row, dtype=torch.uint8, device=self.device)
        if self.per_token:
            self.k_groups, self.k_clip = (t.to(self.device) for t in self.spec.k.head_groups(h, d))
            self.v_groups, self.v_clip = (t.to(self.device) for t in self.spec.v.head_groups(h, d))
            for name, groups in (("k", self.k_groups), ("v", self.v_groups)):
                g = groups.shape[1]
                setattr(self, f"{name}_scale", torch.empty(b, h, 0, g, dtype=torch.float16, device=self.device))
                setattr(self, f"{name}_zero", torch.empty(b, h, 0, g, dtype=torch.uint8, device=self.device))
        else:
            self.k_scale, self.k_zero = self._per_channel(self.spec.k, h)
            self.v_scale, self.v_zero = self._per_channel(self.spec.v, h)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._reserve(self.length + key_states.shape[2])
        key_states = self.spec.permute_k(key_states).contiguous()
        value_states = value_states.contiguous()
        if self.per_token:
            kernels.kv_append_token(self.keys, self.k_scale, self.k_zero, key_states, self.k_groups, self.k_clip,
                                    self.bits, self.length)
            kernels.kv_append_token(self.values, self.v_scale, self.v_zero, value_states, self.v_groups,
                                    self.v_clip, self.bits, self.length)
        else:
            kernels.kv_append(self.keys, key_states, self.k_scale, self.k_zero, self.bits, self.length)
            kernels.kv_append(self.values, value_states, self.v_scale, self.v_zero, self.bits, self.length)
        self.length += key_states.shape[2]
        return self, self

    def attend(self, query: torch.Tensor, scaling: float, p_bits: int, window: int | None = None) -> torch.Tensor:
        """Causal attention of ``query`` [B, Hq, Tq, D] (the last Tq positions) over the cache, straight from
        the codes; → [B, Hq, Tq, D]. With ``window``, over the last ``window`` positions only, copied out as a
        cache of their own (the kernels read contiguous [B, Hkv, S, ...] buffers)."""
        start = self.length - window if window is not None else 0

        def filled(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, start:self.length].contiguous() if start else t

        if self.per_token:
            return kernels.decode_attention_token(
                query, filled(self.keys), filled(self.values), filled(self.k_scale), filled(self.k_zero),
                filled(self.v_scale), filled(self.v_zero), self.k_groups, self.v_groups, self.bits,
                self.length - start, scaling, p_bits)
        return kernels.decode_attention(query, filled(self.keys), filled(self.values), self.k_scale, self.k_zero,
                                        self.v_scale, self.v_zero, self.bits, self.length - start, scaling, p_bits)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float K (in R2 order) and V of the filled positions — the fallback path, for masks with padding."""
        n = self.length
        if self.per_token:
            k, v = (kernels.kv_unpack_token(codes[:, :, :n].contiguous(), scale[:, :, :n].contiguous(),
                                            zero[:, :, :n].contiguous(), groups, self.bits, self.head_dim)
                    for codes, scale, zero, groups in ((self.keys, self.k_scale, self.k_zero, self.k_groups),
                                                       (self.values, self.v_scale, self.v_zero, self.v_groups)))
        else:
            k, v = (kernels.kv_unpack(codes[:, :, :n].contiguous(), scale, zero, self.bits, self.head_dim)
                    for codes, scale, zero in ((self.keys, self.k_scale, self.k_zero),
                                               (self.values, self.v_scale, self.v_zero)))
        return k.to(self.dtype), v.to(self.dtype)


class PackedKVCache(Cache):
    """One layer per decoder layer, built from the model's attention quantizers: a :class:`PackedKVLayer` where
    K and V are quantized, a :class:`FloatKVLayer` where they stay in floating point."""

    def __init__(self, specs: list[AttentionQuant], max_length: int | None = None):
        super().__init__(layers=[PackedKVLayer(spec, max_length) if spec.packs_kv else FloatKVLayer(max_length)
                                 for spec in specs])

    @classmethod
    def from_model(cls, model: nn.Module, max_length: int | None = None) -> "PackedKVCache | None":
        """The preallocated cache of a quantized model; None for a model rptq did not quantize, and where a layer
        keeps K/V in floating point under a sliding window (a DynamicCache handles the window there).
        ``max_length`` (tokens per sequence) preallocates the buffers once; without it they grow as needed."""
        from .attention import AttentionQuant
        specs = [m for m in model.modules() if isinstance(m, AttentionQuant)]
        if not specs or any(not s.packs_kv and s.window is not None for s in specs):
            return None
        return cls(specs, max_length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        return sum(layer.reserved_nbytes() for layer in self.layers)
