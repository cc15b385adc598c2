"""The attention function of quantized models, registered with transformers as ``"rptq"``.

Transformers' attention modules project q/k/v, apply RoPE, update the cache and then call the
registered attention function with ``(module, query, key, value, mask, scaling)``; everything RPTQ does
between the projections and out_proj happens here, driven by ``module.rptq`` (an :class:`AttentionQuant`):

* R2 for RoPE families: keys are clustered *after* RoPE, so the permutation is a gather of q and k here.
  A permutation of pre-RoPE channels would have to move whole rotary pairs (i, i + d/2) and carry their
  frequencies, and the pre-RoPE (min, max) of a channel would still not describe the rotated key that the
  cache stores. Post-RoPE clustering quantizes exactly what the cache holds. The gather runs in
  :meth:`AttentionQuant.permute_k` (a ``torch.gather``) before ``rptq::kv_append`` quantizes the keys into the
  cache; it is not fused into the append kernel. For OPT (no RoPE) R2 is folded into q_proj/k_proj rows instead.
* Q, K and V are fake-quantized with their per-cluster static parameters (K, V at the KV-cache bits).
* The softmax output is rounded to a fixed unsigned grid (scale 1 / (2^b - 1), zero 0) when ``p_bits < 16``.
* Observers (calibration) see q, k, v as [tokens, heads * head_dim] in the order they are quantized.
* A sliding window (Mistral, some Qwen2 layers; ``window``, declared by the model family) limits each query
  to the last ``window`` keys. The float path gets it from transformers' mask; the packed path applies it.
* At decode every op handles one token, so the number of small ops, not their arithmetic, is what costs:
  packed RoPE models run :class:`_LeanRopeAttention` (RoPE in 4 ops per tensor instead of 7), the R2 gather
  indexes are built once (:mod:`.derived`), and in models without activation quantizers (W4A16) the float
  path's attention is one SDPA call that indexes each KV head for its query group instead of copying K and V
  per query head.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .derived import derived
from .joint import run_joint
from .kv_cache import PackedKVLayer
from .quantizers import ActQuant

ATTN_IMPLEMENTATION = "rptq"


class AttentionQuant(nn.Module):
    """Per-layer attention quantization state; every part is optional."""

    def __init__(self, qk_perm: torch.Tensor | None = None, q: ActQuant | None = None, k: ActQuant | None = None,
                 v: ActQuant | None = None, p_bits: int = 16, window: int | None = None):
        super().__init__()
        self.register_buffer("qk_perm", qk_perm)  # int64 [kv_heads, head_dim]: post-RoPE R2 gather
        self.q, self.k, self.v = q, k, v
        for cached in (k, v):
            if cached is not None:
                cached.kv_cache = True
        self.p_bits = int(p_bits)
        self.window = window  # keys a query sees (the most recent); None: all. From the family, not stored
        self.observer: Callable[[str, torch.Tensor], None] | None = None

    def permute_k(self, key: torch.Tensor) -> torch.Tensor:
        """Keys [B, Hkv, T, D] in R2 order (a no-op when R2 is folded into the weights)."""
        if self.qk_perm is None:
            return key
        index = derived(self, "_k_index", (self.qk_perm,), lambda: self.qk_perm[None, :, None, :])
        return key.gather(-1, index.expand_as(key))

    def permute_q(self, query: torch.Tensor) -> torch.Tensor:
        """Queries [B, Hq, T, D] in R2 order: each query head takes its KV head's permutation."""
        if self.qk_perm is None:
            return query
        heads = query.shape[1]
        index = derived(self, f"_q_index_{heads}", (self.qk_perm,),
                        lambda: self.qk_perm.repeat_interleave(heads // self.qk_perm.shape[0], 0)[None, :, None, :])
        return query.gather(-1, index.expand_as(query))

    @property
    def packs_kv(self) -> bool:
        """Whether the packed KV cache stores this layer's K and V as codes (both quantized, at one width)."""
        return self.k is not None and self.v is not None and self.k.bits == self.v.bits

    @property
    def needs_r2_order(self) -> bool:
        """Whether q and k must be in R2 order: only their quantizers and observers see it. Otherwise the gather
        is skipped: q·kᵀ sums over the channels, so permuting both would change the scores by summation order
        only."""
        return self.q is not None or self.k is not None or self.observer is not None

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self.observer is not None:
            b, h, t, d = x.shape
            self.observer(name, x.transpose(1, 2).reshape(b * t, h * d))


def quantize_probs(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Softmax output on the fixed grid k / (2^bits - 1)."""
    levels = (1 << bits) - 1
    return torch.round(p * levels) / levels


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scaling: float, p_bits: int = 16, fused: bool = False) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v with GQA; q [B,Hq,T,D], k/v [B,Hkv,S,D] → [B,Hq,T,D]. ``fused``: one SDPA
    call that reads each KV head for its query group instead of copying K and V per query head (p_bits 16 only);
    it rounds differently from the matmuls."""
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
    if fused and p_bits >= 16:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=query.shape[1] != key.shape[1])
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, 1)
        value = value.repeat_interleave(n_rep, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if p_bits < 16:
        probs = quantize_probs(probs, p_bits)
    return torch.matmul(probs.to(value.dtype), value)


def rptq_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    spec: AttentionQuant | None = getattr(module, "rptq", None)
    if isinstance(key, PackedKVLayer):  # the packed cache returns itself: K/V live as codes
        return packed_attention(spec, query, key, attention_mask, scaling)
    p_bits = 16
    if spec is not None:
        if spec.needs_r2_order:
            query, key = spec.permute_q(query), spec.permute_k(key)
        spec.observe("q", query)
        spec.observe("k", key)
        spec.observe("v", value)
        if spec.q is not None:
            query = spec.q.forward_heads(query)
        if spec.k is not None:
            key = spec.k.forward_heads(key)
        if spec.v is not None:
            value = spec.v.forward_heads(value)
        p_bits = spec.p_bits
    # SDPA only in quantized models without activation quantizers (config.act_bits quantizes q, k and v whenever
    # it quantizes anything): elsewhere a quantizer downstream turns its different rounding into different codes
    # (W4A4KV perplexity moved by 0.3%). Not while calibrating (observer), so that statistics stay as they were.
    fused = spec is not None and spec.q is None and spec.k is None and spec.v is None and spec.observer is None
    out = attend(query, key, value, attention_mask, scaling, p_bits, fused)
    return out.transpose(1, 2).contiguous(), None


def packed_attention(spec: AttentionQuant, query: torch.Tensor, cache, attention_mask: torch.Tensor | None,
                     scaling: float):
    """Attention of new queries over a packed KV cache layer (keys already in R2 order)."""
    query = spec.permute_q(query)
    if spec.q is not None:
        query = spec.q.forward_heads(query)
    new = query.shape[2]
    # the window cuts keys off: a query at position t sees keys t - window + 1 .. t (transformers' convention)
    cut = spec.window is not None and cache.length > spec.window
    if query.shape[0] == 1 and not (cut and new > 1):
        # a single sequence: the mask is purely causal, which the kernel applies itself; one new query under a
        # window sees exactly the last `window` keys
        out = cache.attend(query, scaling, spec.p_bits, window=spec.window if cut else None)
    else:  # padded batches, and several queries under a window, carry a general mask: dequantize and attend
        key, value = cache.dequantized()
        out = attend(query, key, value, attention_mask, scaling, spec.p_bits)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, rptq_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE, x·cos + rotate_half(x)·sin, in four ops instead of transformers' seven: rotate_half(x) =
    cat(-x2, x1) is the roll (x2, x1) times a sign that ``sin_signed`` (−sin on the first half) already holds.
    Bit-identical to transformers (negation is exact); an ``addcmul`` would save one more op but round differently."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class SignedSin:
    """sin with its first half negated (:func:`rotate`), built once per forward for every layer: the layers of a
    step share one ``position_embeddings``. Holding the last ``sin`` keeps it alive, so ``is`` cannot be fooled by
    a new tensor at a reused address."""

    def __init__(self):
        self.sin = self.signed = None

    def __call__(self, sin: torch.Tensor) -> torch.Tensor:
        if sin is not self.sin:
            half = sin.shape[-1] // 2
            self.sin, self.signed = sin, torch.cat((-sin[..., :half], sin[..., half:]), -1)
        return self.signed


class _LeanRopeAttention:
    """The forward of transformers' Llama, Mistral and Qwen2 attention, mixed in before the family's class by
    :func:`use_lean_rope_attention`. Same steps (project, RoPE, cache, :func:`rptq_attention`, out_proj); at
    decode each op handles one token, so RoPE's op count, not its arithmetic, was its cost, and q, k and v are
    one call (:func:`.joint.run_joint`). The sliding window these families pass on is the mask's (float path) or
    ``AttentionQuant.window``'s (packed path)."""

    signed_sin: SignedSin

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in
                             run_joint(self, "_rptq_qkv", (self.q_proj, self.k_proj, self.v_proj), hidden_states))
        cos, sin = position_embeddings
        cos, sin_signed = cos.unsqueeze(1), self.signed_sin(sin).unsqueeze(1)
        query, key = rotate(query, cos, sin_signed), rotate(key, cos, sin_signed)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        out, weights = rptq_attention(self, query, key, value, attention_mask, self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1)), weights


@functools.cache
def _lean_class(cls: type) -> type:
    return cls if issubclass(cls, _LeanRopeAttention) else type(f"Lean{cls.__name__}", (_LeanRopeAttention, cls), {})


def use_lean_rope_attention(attns: list[nn.Module]) -> None:
    """Give the attention modules of a RoPE model (Llama, Mistral, Qwen2) the forward of
    :class:`_LeanRopeAttention`, in place; each stays an instance of its transformers class."""
    signed_sin = SignedSin()  # one for all the layers of the model
    for attn in attns:
        attn.__class__ = _lean_class(type(attn))
        attn.signed_sin = signed_sin


def use_rptq_attention(model: nn.Module) -> None:
    """Route every attention module of ``model`` through :func:`rptq_attention`."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
