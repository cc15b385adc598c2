"""The ``rptq::`` ops: each defined once here, called through ``torch.ops.rptq``.

An op is one block below: its argument check (``_check_<op>``), its pure-PyTorch reference (``ref_<op>``:
the specification, the test oracle and the fallback), its fake (meta) implementation, and one
:func:`_define` call with its schema. The module-level name of the op (``kernels.linear_a16``, ...) IS
``torch.ops.rptq.<op>``: there is no Python wrapper between a caller and the dispatcher, so every caller
gets the same backend and the same checks.

Backends (docs/kernels.md):

* compiled: the CPU kernels of ``rptq_cli._C`` (``csrc/``), registered from C++ under the ``CPU`` key, and the
  CUDA kernels under the ``CUDA`` key. Each C++ wrapper first runs its op's check from ``csrc/checks.h``, which
  mirrors ``_check_<op>`` here (a ``ValueError`` naming the op and the argument).
* reference: ``_check_<op>`` then ``ref_<op>``. Registered as the ``CompositeExplicitAutograd`` kernel (any
  device, or any op, without a compiled kernel runs it) and, while the reference backend is chosen, also under
  the ``CPU`` and ``CUDA`` keys, where it takes precedence over the compiled kernels.

The choice is made at dispatch: ``RPTQ_KERNELS=reference`` in the environment when this module is imported,
or :func:`set_backend` at run time; without the extension the reference runs (one ``RuntimeWarning``).
:func:`backend` says which implementation runs on a device.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from rptq_cli.config import FP
from rptq_cli.quant import grid
from rptq_cli.quant.pack import SUPPORTED_BITS, pack_rows, packed_row_bytes, unpack_rows

__all__ = [
    "backend", "set_backend", "using_backend", "compiled_available", "use_reference", "kv_row_bytes",
    "pack_weight", "unpack_weight", "linear_a16", "linear_aq", "fake_quant_act", "fake_quant_act_token",
    "reorder_norm", "kv_pack", "kv_unpack", "kv_append", "decode_attention",
    "kv_token_grids", "fake_quant_kv_token", "kv_append_token", "kv_unpack_token", "decode_attention_token",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)
_LIB = torch.library.Library("rptq", "DEF")
_CHECKED_REFERENCE: dict[str, Callable] = {}


def _define(schema: str, *, check: Callable, reference: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``rptq::<op>`` from its schema; register ``check`` + ``reference`` and the fake. Returns the op."""
    name = schema.split("(", 1)[0]

    def checked_reference(*args, **kwargs):
        check(*args, **kwargs)
        return reference(*args, **kwargs)

    checked_reference.__name__ = f"checked_ref_{name}"
    _LIB.define(schema)
    _LIB.impl(name, checked_reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"rptq::{name}", fake, lib=_LIB)
    _CHECKED_REFERENCE[name] = checked_reference
    return getattr(torch.ops.rptq, name)


# --------------------------------------------------------------------------------------------------
# Checks shared by several ops (csrc/checks.h has the same, with the same messages)
# --------------------------------------------------------------------------------------------------
def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"rptq::{op}: {msg}")


def _check_bits(op: str, bits: int) -> None:
    _check(bits in SUPPORTED_BITS, op, f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _check_act_bits(op: str, bits: int) -> None:
    _check(1 <= bits <= 8, op, f"activation bits must be in 1..8, got {bits}")


def _check_same_device(op: str, first: torch.Tensor, **rest: torch.Tensor | None) -> None:
    for name, t in rest.items():
        if t is not None:
            _check(t.device == first.device, op, f"{name} is on {t.device} but the data is on {first.device}")


def _check_group_sizes(op: str, group_sizes: torch.Tensor, groups: int, total: int) -> None:
    _check(group_sizes.dim() == 1 and group_sizes.dtype in _INTS, op,
           f"group_sizes must be a 1-D int32 tensor, got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    _check(group_sizes.numel() == groups, op,
           f"expected {groups} group sizes (one per group), got {group_sizes.numel()}")
    _check(groups >= 1, op, "at least one group is needed")
    sizes = group_sizes.tolist()
    for i, size in enumerate(sizes):
        _check(size > 0, op, f"group sizes must be positive, group {i} has {size}")
    _check(sum(sizes) == total, op, f"group sizes sum to {sum(sizes)}, expected {total}")


def _check_bias(op: str, bias: torch.Tensor | None, n: int) -> None:
    _check(bias is None or (bias.dim() == 1 and bias.shape[0] == n and bias.dtype in _FLOATS), op,
           f"bias must be float [N={n}], got {None if bias is None else (bias.dtype, tuple(bias.shape))}")


def _check_weight(op, x, qweight, scales, zeros, group_sizes, bits, bias) -> int:
    """The packed weight of linear_a16 / linear_aq against x; returns the number of groups."""
    _check_bits(op, bits)
    _check(x.dtype in _FLOATS and x.dim() >= 1, op,
           f"x must be a float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    _check(scales.dim() == 2 and scales.dtype in (torch.float16, torch.float32), op,
           f"scales must be float16/float32 [N, G], got {scales.dtype} {tuple(scales.shape)}")
    k = x.shape[-1]
    n, g = scales.shape
    rb = packed_row_bytes(k, bits)
    _check(qweight.dtype == torch.uint8 and qweight.dim() == 2, op,
           f"qweight must be 2-D uint8, got {qweight.dtype} {tuple(qweight.shape)}")
    _check(tuple(qweight.shape) == (n, rb), op,
           f"qweight must be [N={n}, {rb}] for K={k} at {bits} bits, got {tuple(qweight.shape)}")
    _check(zeros.dtype == torch.uint8 and tuple(zeros.shape) == (n, g), op,
           f"zeros must be uint8 [N={n}, G={g}], got {zeros.dtype} {tuple(zeros.shape)}")
    _check_same_device(op, x, qweight=qweight, scales=scales, zeros=zeros, group_sizes=group_sizes, bias=bias)
    _check_group_sizes(op, group_sizes, g, k)
    _check_bias(op, bias, n)
    return g


def _check_act(op, x, act_scale, act_zero, groups, bits) -> None:
    _check_act_bits(op, bits)
    _check(x.dtype in _FLOATS and x.dim() >= 1, op, f"x must be a float tensor, got {x.dtype}")
    _check(act_scale.dim() == 1 and act_scale.numel() == groups and act_scale.dtype.is_floating_point, op,
           f"act_scale must be float [{groups}], one entry per group, got {act_scale.dtype} {tuple(act_scale.shape)}")
    _check(act_zero.dim() == 1 and act_zero.numel() == groups and act_zero.dtype in _INTS, op,
           f"act_zero must be int32 [{groups}], one entry per group, got {act_zero.dtype} {tuple(act_zero.shape)}")
    _check_same_device(op, x, act_scale=act_scale, act_zero=act_zero)


def _check_kv_params(op, data, scale, zero, h, d) -> None:
    _check(scale.dim() == 2 and tuple(scale.shape) == (h, d) and scale.dtype.is_floating_point, op,
           f"scale must be float [H={h}, D={d}], got {scale.dtype} {tuple(scale.shape)}")
    _check(zero.dim() == 2 and tuple(zero.shape) == (h, d) and zero.dtype in _INTS, op,
           f"zero must be int32 [H={h}, D={d}], got {zero.dtype} {tuple(zero.shape)}")
    _check_same_device(op, data, scale=scale, zero=zero)


def _dequant_weight(qweight, scales, zeros, group_sizes, bits, k):
    codes = unpack_rows(qweight, bits, k)
    return grid.dequantize(codes, grid.expand_groups(scales.float(), group_sizes),
                           grid.expand_groups(zeros, group_sizes))


def kv_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed KV row (one token of one head): head_dim codes padded to blocks of 32."""
    return packed_row_bytes(head_dim, bits)


# --------------------------------------------------------------------------------------------------
# pack_weight / unpack_weight: uint8 codes [N, K] <-> block_q{bits} rows (rptq_cli/quant/pack.py)
# --------------------------------------------------------------------------------------------------
def _check_pack_weight(codes, bits):
    _check_bits("pack_weight", bits)
    _check(codes.dtype == torch.uint8 and codes.dim() == 2, "pack_weight",
           f"codes must be uint8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    _check(codes.numel() == 0 or int(codes.max()) < (1 << bits), "pack_weight",
           f"a code exceeds the {bits}-bit range")


def ref_pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(codes, bits)


pack_weight = _define(
    "pack_weight(Tensor codes, int bits) -> Tensor",
    check=_check_pack_weight, reference=ref_pack_weight,
    fake=lambda codes, bits: codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits))))


def _check_unpack_weight(packed, bits, N, K):
    _check_bits("unpack_weight", bits)
    _check(N >= 0 and K >= 0, "unpack_weight", f"N and K must not be negative, got {N}, {K}")
    rb = packed_row_bytes(K, bits)
    _check(packed.dtype == torch.uint8 and tuple(packed.shape) == (N, rb), "unpack_weight",
           f"packed must be uint8 [{N}, {rb}], got {packed.dtype} {tuple(packed.shape)}")


def ref_unpack_weight(packed: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    return unpack_rows(packed, bits, K)


unpack_weight = _define(
    "unpack_weight(Tensor packed, int bits, int N, int K) -> Tensor",
    check=_check_unpack_weight, reference=ref_unpack_weight,
    fake=lambda packed, bits, N, K: packed.new_empty((N, K)))


def _fake_linear(x, qweight, scales, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


# --------------------------------------------------------------------------------------------------
# linear_a16: weight-only quantized linear. GEMV kernels for few rows (decode), GEMM for more (prefill).
# --------------------------------------------------------------------------------------------------
def _check_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias=None):
    _check_weight("linear_a16", x, qweight, scales, zeros, group_sizes, bits, bias)


def ref_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias=None):
    """``y = x @ W.T + bias`` with ``W[n, k] = (code - zeros[n, g(k)]) * scales[n, g(k)]``; float32 math."""
    w = _dequant_weight(qweight, scales, zeros, group_sizes, bits, x.shape[-1])
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


linear_a16 = _define(
    "linear_a16(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor group_sizes, int bits, "
    "Tensor? bias=None) -> Tensor",
    check=_check_linear_a16, reference=ref_linear_a16, fake=_fake_linear)


# --------------------------------------------------------------------------------------------------
# fake_quant_act / fake_quant_act_token: activation quantizers (static per-group grids / per-token grids)
# --------------------------------------------------------------------------------------------------
def _check_fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits):
    _check_act("fake_quant_act", x, act_scale, act_zero, act_group_sizes.numel(), bits)
    _check_same_device("fake_quant_act", x, act_group_sizes=act_group_sizes)
    _check_group_sizes("fake_quant_act", act_group_sizes, act_group_sizes.numel(), x.shape[-1])


def ref_fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits):
    """Quantize-dequantize x on per-channel-group grids along the last dim; returns x's dtype."""
    scale = grid.expand_groups(act_scale.float(), act_group_sizes)
    zero = grid.expand_groups(act_zero, act_group_sizes)
    return grid.fake_quantize(x.float(), scale, zero, bits).to(x.dtype)


fake_quant_act = _define(
    "fake_quant_act(Tensor x, Tensor act_scale, Tensor act_zero, Tensor act_group_sizes, int bits) -> Tensor",
    check=_check_fake_quant_act, reference=ref_fake_quant_act, fake=lambda x, *a: x.new_empty(x.shape))


def _check_fake_quant_act_token(x, act_group_sizes, clip, bits):
    op = "fake_quant_act_token"
    _check_act_bits(op, bits)
    _check(x.dtype in _FLOATS and x.dim() >= 1, op, f"x must be a float tensor, got {x.dtype}")
    g = act_group_sizes.numel()
    _check(clip.dim() == 1 and clip.numel() == g and clip.dtype.is_floating_point, op,
           f"clip must be float [{g}], one ratio per group, got {clip.dtype} {tuple(clip.shape)}")
    _check_same_device(op, x, act_group_sizes=act_group_sizes, clip=clip)
    _check_group_sizes(op, act_group_sizes, g, x.shape[-1])


def ref_fake_quant_act_token(x, act_group_sizes, clip, bits):
    """Quantize-dequantize each token (row of the last dim) on its own per-group grids: scale and zero from the
    token's min/max in the group times the group's ``clip`` ratio (float32 [G])."""
    scale, zero = grid.token_group_params(x, act_group_sizes, clip, bits)
    scale = grid.expand_groups(scale, act_group_sizes)
    zero = grid.expand_groups(zero, act_group_sizes)
    return grid.fake_quantize(x.float(), scale, zero, bits).to(x.dtype)


fake_quant_act_token = _define(
    "fake_quant_act_token(Tensor x, Tensor act_group_sizes, Tensor clip, int bits) -> Tensor",
    check=_check_fake_quant_act_token, reference=ref_fake_quant_act_token, fake=lambda x, *a: x.new_empty(x.shape))


# --------------------------------------------------------------------------------------------------
# linear_aq: weight-and-activation quantized linear (x quantized per weight group, integer dot products)
# --------------------------------------------------------------------------------------------------
def _check_linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias=None):
    groups = _check_weight("linear_aq", x, qweight, scales, zeros, group_sizes, bits, bias)
    _check_act("linear_aq", x, act_scale, act_zero, groups, act_bits)


def ref_linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias=None):
    """``fake_quant(x) @ W.T + bias``, x quantized per weight group (the activation groups ARE the weight
    groups). Compiled kernels compute the same with integer dot products per group and float epilogue."""
    xq = ref_fake_quant_act(x.float(), act_scale, act_zero, group_sizes, act_bits)
    w = _dequant_weight(qweight, scales, zeros, group_sizes, bits, x.shape[-1])
    y = xq @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


linear_aq = _define(
    "linear_aq(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor group_sizes, int bits, "
    "Tensor act_scale, Tensor act_zero, int act_bits, Tensor? bias=None) -> Tensor",
    check=_check_linear_aq, reference=ref_linear_aq, fake=_fake_linear)


# --------------------------------------------------------------------------------------------------
# reorder_norm: gather + LayerNorm / RMSNorm in one pass (R1, R4)
# --------------------------------------------------------------------------------------------------
def _check_reorder_norm(x, perm, weight, bias, eps, rms):
    op = "reorder_norm"
    _check(x.dtype in _FLOATS and x.dim() >= 1, op, f"x must be a float tensor, got {x.dtype}")
    c = x.shape[-1]
    _check(perm.dim() == 1 and perm.numel() == c and perm.dtype in _INTS, op,
           f"perm must be an int64 [C={c}] tensor, got {perm.dtype} {tuple(perm.shape)}")
    _check(weight.dim() == 1 and weight.numel() == c and weight.dtype in _FLOATS, op,
           f"weight must be float [C={c}], got {weight.dtype} {tuple(weight.shape)}")
    _check_same_device(op, x, perm=perm, weight=weight, bias=bias)
    _check_bias(op, bias, c)
    _check(c == 0 or (int(perm.min()) >= 0 and int(perm.max()) < c), op, f"perm has an index outside [0, C={c})")


def ref_reorder_norm(x, perm, weight, bias, eps, rms):
    """``norm(x[..., perm]) * weight + bias`` in float32 (weight/bias already permuted); LayerNorm with
    biased variance, or RMSNorm ``x * rsqrt(mean(x²) + eps)``."""
    xf = x.float().index_select(-1, perm.to(x.device).long())
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


reorder_norm = _define(
    "reorder_norm(Tensor x, Tensor perm, Tensor weight, Tensor? bias, float eps, bool rms) -> Tensor",
    check=_check_reorder_norm, reference=ref_reorder_norm, fake=lambda x, *a, **k: x.new_empty(x.shape))


# --------------------------------------------------------------------------------------------------
# KV cache: kv_pack / kv_unpack / kv_append (per-channel grids of [H, D], block_q{bits} rows)
# --------------------------------------------------------------------------------------------------
def _check_kv_pack(x, scale, zero, bits):
    _check_bits("kv_pack", bits)
    _check(x.dim() == 4 and x.dtype in _FLOATS, "kv_pack", f"x must be a float [B, H, T, D], got {x.dtype} "
           f"{tuple(x.shape)}")
    _check_kv_params("kv_pack", x, scale, zero, x.shape[1], x.shape[3])


def ref_kv_pack(x, scale, zero, bits):
    """x [B, H, T, D] → packed codes uint8 [B, H, T, kv_row_bytes(D)]; scale/zero [H, D] per channel."""
    codes = grid.quantize(x, scale.float()[None, :, None, :], zero[None, :, None, :], bits)
    return pack_rows(codes, bits)


kv_pack = _define(
    "kv_pack(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor",
    check=_check_kv_pack, reference=ref_kv_pack,
    fake=lambda x, scale, zero, bits: x.new_empty((*x.shape[:-1], kv_row_bytes(x.shape[-1], bits)),
                                                  dtype=torch.uint8))


def _check_packed_kv(op, packed, bits, D) -> None:
    """Packed K or V codes [B, H, T, row] of D channels (either grid)."""
    _check_bits(op, bits)
    _check(D >= 0, op, f"D must not be negative, got {D}")
    rb = kv_row_bytes(D, bits)
    _check(packed.dtype == torch.uint8 and packed.dim() == 4 and packed.shape[3] == rb, op,
           f"packed must be uint8 [B, H, T, {rb}] (rows of kv_row_bytes({D}, {bits})), got {packed.dtype} "
           f"{tuple(packed.shape)}")


def _check_kv_unpack(packed, scale, zero, bits, D):
    _check_packed_kv("kv_unpack", packed, bits, D)
    _check_kv_params("kv_unpack", packed, scale, zero, packed.shape[1], D)


def ref_kv_unpack(packed, scale, zero, bits, D):
    """Packed [B, H, T, row] → float32 [B, H, T, D]."""
    codes = unpack_rows(packed, bits, D)
    return grid.dequantize(codes, scale.float()[None, :, None, :], zero[None, :, None, :])


kv_unpack = _define(
    "kv_unpack(Tensor packed, Tensor scale, Tensor zero, int bits, int D) -> Tensor",
    check=_check_kv_unpack, reference=ref_kv_unpack,
    fake=lambda packed, scale, zero, bits, D: packed.new_empty((*packed.shape[:-1], D), dtype=torch.float32))


def _check_append(op, cache, x, bits, pos) -> tuple[int, int, int]:
    """x [B, H, T, D] against the codes of a KV cache it is written into at ``pos``; returns (B, H, D)."""
    _check_bits(op, bits)
    _check(x.dim() == 4 and x.dtype in _FLOATS, op, f"x must be a float [B, H, T, D], got {x.dtype} {tuple(x.shape)}")
    b, h, t, d = x.shape
    rb = kv_row_bytes(d, bits)
    _check(cache.dtype == torch.uint8 and cache.dim() == 4 and tuple(cache.shape[:2]) == (b, h) and cache.shape[3] == rb,
           op, f"cache must be uint8 [B={b}, H={h}, S, {rb}], got {cache.dtype} {tuple(cache.shape)}")
    _check(cache.is_contiguous(), op, "cache must be contiguous (it is written in place)")
    _check(0 <= pos and pos + t <= cache.shape[2], op, f"positions {pos}..{pos + t} do not fit a cache of "
           f"{cache.shape[2]}")
    _check_same_device(op, x, cache=cache)
    return b, h, d


def _check_kv_append(cache, x, scale, zero, bits, pos):
    op = "kv_append"
    _, h, d = _check_append(op, cache, x, bits, pos)
    _check_kv_params(op, x, scale, zero, h, d)


def ref_kv_append(cache, x, scale, zero, bits, pos):
    """Quantize x [B, H, T, D] and write it into ``cache[:, :, pos:pos+T]`` (in place)."""
    cache[:, :, pos:pos + x.shape[2]] = ref_kv_pack(x, scale, zero, bits)


kv_append = _define(
    "kv_append(Tensor(a!) cache, Tensor x, Tensor scale, Tensor zero, int bits, int pos) -> ()",
    check=_check_kv_append, reference=ref_kv_append, fake=lambda cache, *a: None)


# --------------------------------------------------------------------------------------------------
# decode_attention: attention of new queries over a packed KV cache, never materializing fp K/V
# --------------------------------------------------------------------------------------------------
def _check_attention_cache(op, q, k_packed, v_packed, bits, kv_len, p_bits) -> tuple[int, int, int, int]:
    """q against the packed K/V codes of decode attention (either grid); returns (B, Hkv, S, D)."""
    _check_bits(op, bits)
    _check(q.dim() == 4 and q.dtype in _FLOATS, op, f"q must be a float [B, Hq, Tq, D], got {q.dtype} "
           f"{tuple(q.shape)}")
    b, hq, tq, d = q.shape
    rb = kv_row_bytes(d, bits)
    for name, kv in (("k_packed", k_packed), ("v_packed", v_packed)):
        _check(kv.dtype == torch.uint8 and kv.dim() == 4 and kv.shape[0] == b and kv.shape[3] == rb, op,
               f"{name} must be uint8 [B={b}, Hkv, S, {rb}], got {kv.dtype} {tuple(kv.shape)}")
    _check(k_packed.shape == v_packed.shape, op, "k_packed and v_packed differ in shape")
    hkv, s = k_packed.shape[1], k_packed.shape[2]
    _check(hkv >= 1 and hq % hkv == 0, op, f"Hq={hq} is not a multiple of Hkv={hkv}")
    _check(tq <= kv_len <= s, op, f"need Tq={tq} <= kv_len={kv_len} <= S={s}")
    _check(1 <= p_bits <= FP, op, f"p_bits must be in 1..{FP}, got {p_bits}")
    _check_same_device(op, q, k_packed=k_packed, v_packed=v_packed)
    return b, hkv, s, d


def _check_decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling,
                            p_bits=FP):
    op = "decode_attention"
    _, hkv, _, d = _check_attention_cache(op, q, k_packed, v_packed, bits, kv_len, p_bits)
    _check_kv_params(op, q, k_scale, k_zero, hkv, d)
    _check_kv_params(op, q, v_scale, v_zero, hkv, d)


def ref_decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling,
                         p_bits=FP):
    """softmax(q kᵀ · scaling) v over the first kv_len cached positions, causal for the Tq queries
    (query i sees positions ≤ kv_len − Tq + i), GQA (query head h reads kv head h // (Hq / Hkv)),
    softmax in float32, P rounded to round(p·(2^p_bits−1))/(2^p_bits−1) when p_bits < FP."""
    d = q.shape[-1]
    k = ref_kv_unpack(k_packed[:, :, :kv_len], k_scale, k_zero, bits, d)
    v = ref_kv_unpack(v_packed[:, :, :kv_len], v_scale, v_zero, bits, d)
    return _causal_attention(q, k, v, scaling, p_bits)


def _causal_attention(q, k, v, scaling, p_bits):
    """The math of decode attention once K/V [B, Hkv, kv_len, D] are float: q [B, Hq, Tq, D] sits at the last
    Tq positions."""
    tq, kv_len = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * scaling
    qpos = torch.arange(kv_len - tq, kv_len, device=q.device)[:, None]
    kpos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    p = torch.softmax(scores, -1)
    if p_bits < FP:
        levels = (1 << p_bits) - 1
        p = torch.round(p * levels) / levels
    return (p @ v).to(q.dtype)


decode_attention = _define(
    "decode_attention(Tensor q, Tensor k_packed, Tensor v_packed, Tensor k_scale, Tensor k_zero, Tensor v_scale, "
    f"Tensor v_zero, int bits, int kv_len, float scaling, int p_bits={FP}) -> Tensor",
    check=_check_decode_attention, reference=ref_decode_attention, fake=lambda q, *a, **k: q.new_empty(q.shape))


# --------------------------------------------------------------------------------------------------
# KV cache on per-token grids: kv_append_token / kv_unpack_token / decode_attention_token
#
# The static grids above fix one (scale, zero) per channel at calibration. Here every token of every head
# gets its own grid per channel group (the head's KMeans clusters), computed from its values as it is
# appended and stored beside its codes: scale float16 [B, H, S, G], zero uint8 [B, H, S, G]. A real model's
# keys and values swing by token (attention sinks, the first token) far more than one static range per
# cluster can follow. Groups are given per head, group_sizes int32 [H, G] (each row sums to D); a head
# with fewer clusters pads its row with zero-size groups, whose parameters are never read.
# --------------------------------------------------------------------------------------------------
KV_TOKEN_MIN_SCALE = 2.0 ** -14  # the smallest normal float16: a stored scale never rounds to 0 or a subnormal


def _check_kv_token_groups(op, data, group_sizes, clip, h, d) -> int:
    """group_sizes int32 [H, G] (≥ 0, rows summing to D) and, when given, clip float32 [H, G]; returns G."""
    _check(group_sizes.dim() == 2 and group_sizes.shape[0] == h and group_sizes.dtype in _INTS, op,
           f"group_sizes must be int32 [H={h}, G], got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    g = group_sizes.shape[1]
    _check(g >= 1, op, "at least one group per head is needed")
    _check(bool((group_sizes >= 0).all()), op, "group sizes must not be negative")
    sums = group_sizes.sum(1).tolist()
    _check(all(total == d for total in sums), op, f"each head's group sizes must sum to D={d}, got {sums}")
    if clip is not None:
        _check(tuple(clip.shape) == (h, g) and clip.dtype == torch.float32, op,
               f"clip must be float32 [H={h}, G={g}], got {clip.dtype} {tuple(clip.shape)}")
    _check_same_device(op, data, group_sizes=group_sizes, clip=clip)
    return g


def _check_kv_token_params(op, data, scale, zero, b, h, s, g) -> None:
    _check(scale.dtype == torch.float16 and tuple(scale.shape) == (b, h, s, g), op,
           f"scale must be float16 [B={b}, H={h}, S={s}, G={g}], got {scale.dtype} {tuple(scale.shape)}")
    _check(zero.dtype == torch.uint8 and tuple(zero.shape) == (b, h, s, g), op,
           f"zero must be uint8 [B={b}, H={h}, S={s}, G={g}], got {zero.dtype} {tuple(zero.shape)}")
    _check_same_device(op, data, scale=scale, zero=zero)


def kv_token_grids(x, group_sizes, clip, bits):
    """The stored grid of each (token, head, group): x float [B, H, T, D] → scale float16 [B, H, T, G] and
    zero uint8 [B, H, T, G].

    The range is the group's min/max (widened to 0) times its clip ratio, as for activations
    (:func:`grid.token_group_params`), but the scale is rounded to float16 (clamped to
    ``KV_TOKEN_MIN_SCALE``) *before* the zero-point is derived from it, so the stored pair is the grid the
    codes are written on."""
    b, h, t, d = x.shape
    g = group_sizes.shape[1]
    index = torch.cat([torch.repeat_interleave(torch.arange(g, device=x.device), row.long())
                       for row in group_sizes.to(x.device)]).view(h, d)
    xf = x.float()
    index = index[None, :, None, :].expand(b, h, t, d)
    lo = xf.new_zeros((b, h, t, g)).scatter_reduce_(-1, index, xf, "amin")
    hi = xf.new_zeros((b, h, t, g)).scatter_reduce_(-1, index, xf, "amax")
    ratio = clip.float().to(x.device)[None, :, None, :]
    lo, hi = lo * ratio, hi * ratio
    scale = ((hi - lo) / grid.qmax(bits)).clamp_min(KV_TOKEN_MIN_SCALE).to(torch.float16)
    zero = torch.round(-lo / scale.float()).clamp(0, grid.qmax(bits)).to(torch.uint8)
    return scale, zero


def _quantize_on_token_grids(x, group_sizes, clip, bits):
    """x [B, H, T, D] → (codes uint8 [B, H, T, D], scale, zero [B, H, T, G]) as the cache stores them."""
    scale, zero = kv_token_grids(x, group_sizes, clip, bits)
    codes = grid.quantize(x, _per_channel(scale, group_sizes), _per_channel(zero, group_sizes), bits)
    return codes, scale, zero


def fake_quant_kv_token(x, group_sizes, clip, bits):
    """Quantize-dequantize x [B, H, T, D] exactly as the cache stores it on per-token grids (the simulation of
    a per-token KV cache; pure torch, not an op). Returns the dtype of x."""
    codes, scale, zero = _quantize_on_token_grids(x, group_sizes, clip, bits)
    return grid.dequantize(codes, _per_channel(scale, group_sizes), _per_channel(zero, group_sizes)).to(x.dtype)


def _per_channel(per_group, group_sizes):
    """[B, H, T, G] per-group parameters → float32 [B, H, T, D] per channel (each head its own groups)."""
    return torch.stack([grid.expand_groups(per_group[:, h].float(), sizes) for h, sizes in enumerate(group_sizes)], 1)


def _check_kv_append_token(cache, scale, zero, x, group_sizes, clip, bits, pos):
    op = "kv_append_token"
    b, h, d = _check_append(op, cache, x, bits, pos)
    _check(scale.is_contiguous() and zero.is_contiguous(), op, "scale and zero must be contiguous (they are written "
           "in place)")
    g = _check_kv_token_groups(op, x, group_sizes, clip, h, d)
    _check_kv_token_params(op, x, scale, zero, b, h, cache.shape[2], g)


def ref_kv_append_token(cache, scale, zero, x, group_sizes, clip, bits, pos):
    """Quantize x [B, H, T, D] on its own per-token grids; write codes and grids at positions pos..pos+T."""
    codes, t_scale, t_zero = _quantize_on_token_grids(x, group_sizes, clip, bits)
    end = pos + x.shape[2]
    cache[:, :, pos:end] = pack_rows(codes, bits)
    scale[:, :, pos:end] = t_scale
    zero[:, :, pos:end] = t_zero


kv_append_token = _define(
    "kv_append_token(Tensor(a!) cache, Tensor(b!) scale, Tensor(c!) zero, Tensor x, Tensor group_sizes, "
    "Tensor clip, int bits, int pos) -> ()",
    check=_check_kv_append_token, reference=ref_kv_append_token, fake=lambda cache, *a: None)


def _check_kv_unpack_token(packed, scale, zero, group_sizes, bits, D):
    op = "kv_unpack_token"
    _check_packed_kv(op, packed, bits, D)
    b, h, t = packed.shape[:3]
    g = _check_kv_token_groups(op, packed, group_sizes, None, h, D)
    _check_kv_token_params(op, packed, scale, zero, b, h, t, g)


def ref_kv_unpack_token(packed, scale, zero, group_sizes, bits, D):
    """Packed [B, H, T, row] with grids [B, H, T, G] → float32 [B, H, T, D]."""
    return grid.dequantize(unpack_rows(packed, bits, D), _per_channel(scale, group_sizes),
                           _per_channel(zero, group_sizes))


kv_unpack_token = _define(
    "kv_unpack_token(Tensor packed, Tensor scale, Tensor zero, Tensor group_sizes, int bits, int D) -> Tensor",
    check=_check_kv_unpack_token, reference=ref_kv_unpack_token,
    fake=lambda packed, *a: packed.new_empty((*packed.shape[:-1], a[-1]), dtype=torch.float32))


def _check_decode_attention_token(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, k_group_sizes,
                                  v_group_sizes, bits, kv_len, scaling, p_bits=FP):
    op = "decode_attention_token"
    b, hkv, s, d = _check_attention_cache(op, q, k_packed, v_packed, bits, kv_len, p_bits)
    gk = _check_kv_token_groups(op, q, k_group_sizes, None, hkv, d)
    gv = _check_kv_token_groups(op, q, v_group_sizes, None, hkv, d)
    _check_kv_token_params(op, q, k_scale, k_zero, b, hkv, s, gk)
    _check_kv_token_params(op, q, v_scale, v_zero, b, hkv, s, gv)


def ref_decode_attention_token(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, k_group_sizes,
                               v_group_sizes, bits, kv_len, scaling, p_bits=FP):
    """:func:`ref_decode_attention` over a cache on per-token grids."""
    d = q.shape[-1]
    k = ref_kv_unpack_token(k_packed[:, :, :kv_len], k_scale[:, :, :kv_len], k_zero[:, :, :kv_len], k_group_sizes,
                            bits, d)
    v = ref_kv_unpack_token(v_packed[:, :, :kv_len], v_scale[:, :, :kv_len], v_zero[:, :, :kv_len], v_group_sizes,
                            bits, d)
    return _causal_attention(q, k, v, scaling, p_bits)


decode_attention_token = _define(
    "decode_attention_token(Tensor q, Tensor k_packed, Tensor v_packed, Tensor k_scale, Tensor k_zero, "
    "Tensor v_scale, Tensor v_zero, Tensor k_group_sizes, Tensor v_group_sizes, int bits, int kv_len, "
    f"float scaling, int p_bits={FP}) -> Tensor",
    check=_check_decode_attention_token, reference=ref_decode_attention_token,
    fake=lambda q, *a, **k: q.new_empty(q.shape))


# --------------------------------------------------------------------------------------------------
# The compiled extension and the backend switch
# --------------------------------------------------------------------------------------------------
_C = None
_LOAD_ERROR: str | None = None
try:
    from rptq_cli import _C  # noqa: F811  (registers the CPU/CUDA kernels with TORCH_LIBRARY_IMPL)
except ImportError as exc:  # not built: the reference runs
    _LOAD_ERROR = str(exc)
    warnings.warn(
        "rptq: compiled kernels not available (" + _LOAD_ERROR + "); running the pure-PyTorch reference, which "
        "is slow. Build them with `make install` (pip install --no-build-isolation -e .).",
        RuntimeWarning, stacklevel=2,
    )

BACKENDS = ("compiled", "reference")
_reference_override: torch.library.Library | None = None


def compiled_available() -> bool:
    """True when the compiled extension ``rptq_cli._C`` is loaded."""
    return _C is not None


def set_backend(name: str) -> str:
    """Run every ``rptq::`` op on ``"reference"`` (checked PyTorch reference) or ``"compiled"`` (the kernels of
    ``rptq_cli._C``, where the extension and the device have them) from now on; returns the previous choice.
    The choice is a dispatcher registration: it holds for every caller of ``torch.ops.rptq``."""
    global _reference_override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = "reference" if _reference_override is not None else "compiled"
    if name == "reference" and _reference_override is None:
        lib = torch.library.Library("rptq", "IMPL")
        with warnings.catch_warnings():  # torch warns that it overrides the compiled kernels: that is the point
            warnings.simplefilter("ignore")
            for op, checked_reference in _CHECKED_REFERENCE.items():
                for key in ("CPU", "CUDA"):
                    lib.impl(op, checked_reference, key)
        _reference_override = lib
    elif name == "compiled" and _reference_override is not None:
        _reference_override._destroy()  # the compiled kernels registered under CPU/CUDA take over again
        _reference_override = None
    return previous


@contextlib.contextmanager
def using_backend(name: str) -> Iterator[None]:
    """``set_backend(name)`` for the duration of a ``with`` block."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_reference() -> bool:
    """True when the reference implementations run (extension missing, or the reference backend chosen)."""
    return _C is None or _reference_override is not None


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation the ops run on ``device`` (default CPU): ``"cpu-amx"``, ``"cpu-avx512vnni"``,
    ``"cpu-avx2"``, ``"cpu-scalar"``, ``"cuda"`` or ``"reference"``."""
    if use_reference():
        return "reference"
    if device is not None and torch.device(device).type == "cuda":
        return "cuda" if _C.has_cuda() else "reference"
    return "cpu-" + _C.cpu_isa()


if os.environ.get("RPTQ_KERNELS", "").lower() == "reference":
    set_backend("reference")
