"""The ``rptq::`` ops: one name each, a readable PyTorch reference, and the compiled kernels behind it.

Every op is defined here once (its schema, below in ``_SCHEMAS``) as a ``torch.library`` custom op in
the ``rptq`` namespace, with

* a pure-PyTorch reference (``ref_<op>``): the specification, the test oracle and the fallback;
* a fake (meta) implementation, for shape propagation / ``torch.compile``;
* the compiled CPU kernels of ``rptq_cli._C`` (``csrc/``), registered from C++ with
  ``TORCH_LIBRARY_IMPL(rptq, CPU, m)``, and CUDA kernels the same way with ``TORCH_LIBRARY_IMPL(rptq, CUDA, m)``.

The schemas are defined in Python (``torch.library.Library("rptq", "DEF")``) *before* the extension is
imported, so C++ only registers implementations. The reference is registered as the
``CompositeExplicitAutograd`` kernel: any device without a compiled kernel runs it.

The public functions below (``linear_a16``, ``decode_attention``, ...) are what the model modules call.
They check their inputs (raising :class:`ValueError` with a message) and dispatch to the compiled kernel,
or to the reference when the extension is missing (one warning) or ``RPTQ_KERNELS=reference`` is set.
:func:`backend` says which one runs. The op contract is ``docs/kernels.md``.
"""
from __future__ import annotations

import os
import warnings

import torch

from rptq_cli.quant import grid
from rptq_cli.quant.pack import SUPPORTED_BITS, pack_rows, packed_row_bytes, unpack_rows

__all__ = [
    "backend", "compiled_available", "use_reference",
    "pack_weight", "unpack_weight", "linear_a16", "linear_aq", "quantize_act", "fake_quant_act",
    "fake_quant_act_token",
    "reorder_norm", "kv_pack", "kv_unpack", "kv_append", "decode_attention", "kv_row_bytes",
]

# --------------------------------------------------------------------------------------------------
# Schemas (the contract; docs/kernels.md explains each op)
# --------------------------------------------------------------------------------------------------
_SCHEMAS = {
    "pack_weight": "pack_weight(Tensor codes, int bits) -> Tensor",
    "unpack_weight": "unpack_weight(Tensor packed, int bits, int N, int K) -> Tensor",
    "linear_a16": "linear_a16(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor group_sizes, "
                  "int bits, Tensor? bias=None) -> Tensor",
    "linear_aq": "linear_aq(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor group_sizes, int bits, "
                 "Tensor act_scale, Tensor act_zero, int act_bits, Tensor? bias=None) -> Tensor",
    "quantize_act": "quantize_act(Tensor x, Tensor act_scale, Tensor act_zero, Tensor act_group_sizes, "
                    "int bits) -> Tensor",
    "fake_quant_act": "fake_quant_act(Tensor x, Tensor act_scale, Tensor act_zero, Tensor act_group_sizes, "
                      "int bits) -> Tensor",
    "fake_quant_act_token": "fake_quant_act_token(Tensor x, Tensor act_group_sizes, Tensor clip, int bits) -> Tensor",
    "reorder_norm": "reorder_norm(Tensor x, Tensor perm, Tensor weight, Tensor? bias, float eps, bool rms, "
                    "Tensor? act_scale=None, Tensor? act_zero=None, Tensor? act_group_sizes=None, "
                    "int act_bits=16) -> Tensor",
    "kv_pack": "kv_pack(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor",
    "kv_unpack": "kv_unpack(Tensor packed, Tensor scale, Tensor zero, int bits, int D) -> Tensor",
    "kv_append": "kv_append(Tensor(a!) cache, Tensor x, Tensor scale, Tensor zero, int bits, int pos) -> ()",
    "decode_attention": "decode_attention(Tensor q, Tensor k_packed, Tensor v_packed, Tensor k_scale, "
                        "Tensor k_zero, Tensor v_scale, Tensor v_zero, int bits, int kv_len, float scaling, "
                        "int p_bits=16) -> Tensor",
}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Reference implementations (the specification). Pure torch, any device, float32 math.
# --------------------------------------------------------------------------------------------------
def _dequant_weight(qweight, scales, zeros, group_sizes, bits, n, k):
    codes = unpack_rows(qweight, bits, k)
    return grid.dequantize(codes, grid.expand_groups(scales.float(), group_sizes),
                           grid.expand_groups(zeros, group_sizes))


def ref_pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(codes, bits)


def ref_unpack_weight(packed: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    return unpack_rows(packed, bits, K)


def ref_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias=None):
    """``y = x @ W.T + bias`` with ``W[n, k] = (code - zeros[n, g(k)]) * scales[n, g(k)]``; float32 math."""
    n, k = scales.shape[0], x.shape[-1]
    w = _dequant_weight(qweight, scales, zeros, group_sizes, bits, n, k)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def ref_quantize_act(x, act_scale, act_zero, act_group_sizes, bits):
    """Codes (uint8, shape of x) of x on per-channel-group grids along the last dim."""
    scale = grid.expand_groups(act_scale.float(), act_group_sizes)
    zero = grid.expand_groups(act_zero, act_group_sizes)
    return grid.quantize(x, scale, zero, bits)


def ref_fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits):
    scale = grid.expand_groups(act_scale.float(), act_group_sizes)
    zero = grid.expand_groups(act_zero, act_group_sizes)
    return grid.fake_quantize(x.float(), scale, zero, bits).to(x.dtype)


def ref_fake_quant_act_token(x, act_group_sizes, clip, bits):
    """Quantize-dequantize each token (row of the last dim) on its own per-group grids (dynamic scales)."""
    scale, zero = grid.token_group_params(x, act_group_sizes, clip, bits)
    scale = grid.expand_groups(scale, act_group_sizes)
    zero = grid.expand_groups(zero, act_group_sizes)
    return grid.fake_quantize(x.float(), scale, zero, bits).to(x.dtype)


def ref_linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias=None):
    """``fake_quant(x) @ W.T + bias``, x quantized per weight group (the activation groups ARE the weight
    groups). Compiled kernels compute the same with integer dot products per group and float epilogue."""
    xq = ref_fake_quant_act(x.float(), act_scale, act_zero, group_sizes, act_bits)
    n, k = scales.shape[0], x.shape[-1]
    w = _dequant_weight(qweight, scales, zeros, group_sizes, bits, n, k)
    y = xq @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def ref_reorder_norm(x, perm, weight, bias, eps, rms, act_scale=None, act_zero=None, act_group_sizes=None,
                     act_bits=16):
    """``norm(x[..., perm]) * weight + bias`` in float32 (weight/bias already permuted); LayerNorm with
    biased variance, or RMSNorm ``x * rsqrt(mean(x²) + eps)``. With ``act_bits < 16`` the output is
    fake-quantized on the given per-group grid (the quantizer of the next linear's input)."""
    xf = x.float().index_select(-1, perm.to(x.device))
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if act_bits < 16:
        y = ref_fake_quant_act(y, act_scale, act_zero, act_group_sizes, act_bits)
    return y.to(x.dtype)


def kv_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed KV row (one token of one head): head_dim codes padded to blocks of 32."""
    return packed_row_bytes(head_dim, bits)


def ref_kv_pack(x, scale, zero, bits):
    """x [B, H, T, D] → packed codes uint8 [B, H, T, kv_row_bytes(D)]; scale/zero [H, D] per channel."""
    codes = grid.quantize(x, scale.float()[None, :, None, :], zero[None, :, None, :], bits)
    return pack_rows(codes, bits)


def ref_kv_unpack(packed, scale, zero, bits, D):
    """Packed [B, H, T, row] → float32 [B, H, T, D]."""
    codes = unpack_rows(packed, bits, D)
    return grid.dequantize(codes, scale.float()[None, :, None, :], zero[None, :, None, :])


def ref_kv_append(cache, x, scale, zero, bits, pos):
    """Quantize x [B, H, T, D] and write it into ``cache[:, :, pos:pos+T]`` (in place)."""
    cache[:, :, pos:pos + x.shape[2]] = ref_kv_pack(x, scale, zero, bits)


def ref_decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling,
                         p_bits=16):
    """softmax(q kᵀ · scaling) v over the first kv_len cached positions, causal for the Tq queries
    (query i sees positions ≤ kv_len − Tq + i), GQA (query head h reads kv head h // (Hq / Hkv)),
    softmax in float32, P rounded to round(p·(2^p_bits−1))/(2^p_bits−1) when p_bits < 16."""
    b, hq, tq, d = q.shape
    hkv = k_packed.shape[1]
    k = ref_kv_unpack(k_packed[:, :, :kv_len], k_scale, k_zero, bits, d)
    v = ref_kv_unpack(v_packed[:, :, :kv_len], v_scale, v_zero, bits, d)
    rep = hq // hkv
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * scaling
    qpos = torch.arange(kv_len - tq, kv_len, device=q.device)[:, None]
    kpos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    p = torch.softmax(scores, -1)
    if p_bits < 16:
        levels = (1 << p_bits) - 1
        p = torch.round(p * levels) / levels
    return (p @ v).to(q.dtype)


_REFERENCE = {name: globals()[f"ref_{name}"] for name in _SCHEMAS}


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations
# --------------------------------------------------------------------------------------------------
def _fake_linear(x, qweight, scales, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


_FAKE = {
    "pack_weight": lambda codes, bits: codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits))),
    "unpack_weight": lambda packed, bits, N, K: packed.new_empty((N, K)),
    "linear_a16": _fake_linear,
    "linear_aq": _fake_linear,
    "quantize_act": lambda x, *a: x.new_empty(x.shape, dtype=torch.uint8),
    "fake_quant_act": lambda x, *a: x.new_empty(x.shape),
    "fake_quant_act_token": lambda x, *a: x.new_empty(x.shape),
    "reorder_norm": lambda x, *a, **k: x.new_empty(x.shape),
    "kv_pack": lambda x, scale, zero, bits: x.new_empty((*x.shape[:-1], kv_row_bytes(x.shape[-1], bits)),
                                                        dtype=torch.uint8),
    "kv_unpack": lambda packed, scale, zero, bits, D: packed.new_empty((*packed.shape[:-1], D),
                                                                       dtype=torch.float32),
    "kv_append": lambda cache, *a: None,
    "decode_attention": lambda q, *a, **k: q.new_empty(q.shape),
}


# --------------------------------------------------------------------------------------------------
# Registration and the compiled extension
# --------------------------------------------------------------------------------------------------
def _register() -> None:
    lib = torch.library.Library("rptq", "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _REFERENCE[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"rptq::{name}", _FAKE[name], lib=lib)
    globals()["_LIB"] = lib


_LIB = None
_register()

_C = None
_LOAD_ERROR: str | None = None
try:
    from rptq_cli import _C  # noqa: F811  (registers the CPU/CUDA kernels with TORCH_LIBRARY_IMPL)
except ImportError as exc:  # not built: the reference runs
    _LOAD_ERROR = str(exc)

_WARNED = False


def compiled_available() -> bool:
    """True when the compiled extension ``rptq_cli._C`` is loaded."""
    return _C is not None


def use_reference() -> bool:
    """True when the reference implementations run (extension missing, or ``RPTQ_KERNELS=reference``)."""
    global _WARNED
    if os.environ.get("RPTQ_KERNELS", "").lower() == "reference":
        return True
    if _C is None:
        if not _WARNED:
            _WARNED = True
            warnings.warn(
                "rptq: compiled kernels not available (" + (_LOAD_ERROR or "unknown") + "); running the "
                "pure-PyTorch reference, which is slow. Build them with `make install` "
                "(pip install --no-build-isolation -e .).",
                RuntimeWarning, stacklevel=3,
            )
        return True
    return False


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation the ops run on ``device`` (default CPU): ``"cpu-avx512vnni"``,
    ``"cpu-avx2"``, ``"cpu-scalar"``, ``"cuda"`` or ``"reference"``."""
    if use_reference():
        return "reference"
    if device is not None and torch.device(device).type == "cuda":
        return "cuda" if _C.has_cuda() else "reference"
    return "cpu-" + _C.cpu_isa()


def _compiled(*tensors: torch.Tensor) -> bool:
    if use_reference():
        return False
    dev = tensors[0].device.type
    return dev == "cpu" or (dev == "cuda" and _C.has_cuda())


# --------------------------------------------------------------------------------------------------
# Input checks (clear errors before any kernel reads memory)
# --------------------------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_groups(group_sizes: torch.Tensor, total: int, what: str) -> None:
    _check(group_sizes.dtype in (torch.int32, torch.int64) and group_sizes.dim() == 1,
           f"{what}: group_sizes must be a 1-D int32 tensor, got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    _check(group_sizes.numel() >= 1 and bool((group_sizes > 0).all()),
           f"{what}: group sizes must be positive")
    _check(int(group_sizes.sum()) == total, f"{what}: group sizes sum to {int(group_sizes.sum())}, expected {total}")


def _check_weight(name, x, qweight, scales, zeros, group_sizes, bits):
    _check(bits in SUPPORTED_BITS, f"{name}: bits must be one of {SUPPORTED_BITS}, got {bits}")
    _check(x.dtype in _FLOATS, f"{name}: x must be float32/float16/bfloat16, got {x.dtype}")
    _check(x.dim() >= 1, f"{name}: x must have at least one dim")
    k = x.shape[-1]
    _check(qweight.dtype == torch.uint8 and qweight.dim() == 2,
           f"{name}: qweight must be 2-D uint8, got {qweight.dtype} {tuple(qweight.shape)}")
    _check(scales.dim() == 2 and scales.dtype in (torch.float16, torch.float32),
           f"{name}: scales must be float16/float32 [N, G], got {scales.dtype} {tuple(scales.shape)}")
    n, g = scales.shape
    _check(qweight.shape == (n, packed_row_bytes(k, bits)),
           f"{name}: qweight must be [N={n}, {packed_row_bytes(k, bits)}] for K={k} at {bits} bits, "
           f"got {tuple(qweight.shape)}")
    _check(zeros.dtype == torch.uint8 and tuple(zeros.shape) == (n, g),
           f"{name}: zeros must be uint8 [N={n}, G={g}], got {zeros.dtype} {tuple(zeros.shape)}")
    _check(group_sizes.numel() == g, f"{name}: {g} groups in scales but {group_sizes.numel()} group sizes")
    _check_groups(group_sizes, k, name)


def _check_act(name, x, act_scale, act_zero, group_sizes, bits):
    _check(1 <= bits <= 8, f"{name}: activation bits must be in 1..8, got {bits}")
    _check(x.dtype in _FLOATS, f"{name}: x must be a float tensor, got {x.dtype}")
    _check(act_scale.dim() == 1 and act_zero.dim() == 1 and act_scale.numel() == group_sizes.numel()
           and act_zero.numel() == group_sizes.numel(),
           f"{name}: act_scale/act_zero must be 1-D with one entry per group ({group_sizes.numel()})")
    _check(act_zero.dtype in (torch.int32, torch.int64), f"{name}: act_zero must be int32, got {act_zero.dtype}")
    _check(act_scale.dtype.is_floating_point, f"{name}: act_scale must be float, got {act_scale.dtype}")
    _check_groups(group_sizes, x.shape[-1], name)


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] → packed uint8 [N, packed_row_bytes(K, bits)] (layout: rptq_cli/quant/pack.py)."""
    if _compiled(codes):
        return torch.ops.rptq.pack_weight.default(codes, bits)
    _check(codes.dim() == 2 and codes.dtype == torch.uint8, "pack_weight: codes must be uint8 [N, K]")
    _check(bits in SUPPORTED_BITS, f"pack_weight: bits must be one of {SUPPORTED_BITS}")
    _check(codes.numel() == 0 or int(codes.max()) < (1 << bits), f"pack_weight: a code exceeds the {bits}-bit range")
    return ref_pack_weight(codes, bits)


def unpack_weight(packed: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    """Packed uint8 [N, packed_row_bytes(K)] → uint8 codes [N, K]."""
    if _compiled(packed):
        return torch.ops.rptq.unpack_weight.default(packed, bits, N, K)
    _check(bits in SUPPORTED_BITS, f"unpack_weight: bits must be one of {SUPPORTED_BITS}")
    _check(packed.dtype == torch.uint8 and tuple(packed.shape) == (N, packed_row_bytes(K, bits)),
           f"unpack_weight: packed must be uint8 [{N}, {packed_row_bytes(K, bits)}], got "
           f"{packed.dtype} {tuple(packed.shape)}")
    return ref_unpack_weight(packed, bits, N, K)


def linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias=None):
    """Weight-only quantized linear: ``x [.., K] @ W.T + bias → [.., N]`` in x's dtype.
    GEMV kernel for ≤ 8 rows (decode), GEMM for more (prefill)."""
    if _compiled(x):
        return torch.ops.rptq.linear_a16.default(x, qweight, scales, zeros, group_sizes, bits, bias)
    _check_weight("linear_a16", x, qweight, scales, zeros, group_sizes, bits)
    _check(bias is None or bias.shape == (scales.shape[0],), "linear_a16: bias must be [N]")
    return ref_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias)


def linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias=None):
    """Weight-and-activation quantized linear: x is quantized per weight group on (act_scale, act_zero)
    at act_bits; compiled kernels use integer (VNNI) dot products and apply the scales in the epilogue."""
    if _compiled(x):
        return torch.ops.rptq.linear_aq.default(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero,
                                                act_bits, bias)
    _check_weight("linear_aq", x, qweight, scales, zeros, group_sizes, bits)
    _check_act("linear_aq", x, act_scale, act_zero, group_sizes, act_bits)
    _check(bias is None or bias.shape == (scales.shape[0],), "linear_aq: bias must be [N]")
    return ref_linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias)


def quantize_act(x, act_scale, act_zero, act_group_sizes, bits):
    """Activation codes (uint8, shape of x) on per-channel-group grids."""
    if _compiled(x):
        return torch.ops.rptq.quantize_act.default(x, act_scale, act_zero, act_group_sizes, bits)
    _check_act("quantize_act", x, act_scale, act_zero, act_group_sizes, bits)
    return ref_quantize_act(x, act_scale, act_zero, act_group_sizes, bits)


def fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits):
    """Quantize-dequantize x on per-channel-group grids; returns x's dtype."""
    if _compiled(x):
        return torch.ops.rptq.fake_quant_act.default(x, act_scale, act_zero, act_group_sizes, bits)
    _check_act("fake_quant_act", x, act_scale, act_zero, act_group_sizes, bits)
    return ref_fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits)


def fake_quant_act_token(x, act_group_sizes, clip, bits):
    """Quantize-dequantize each token on its own per-group grids: scale and zero from the token's min/max in
    the group times the group's ``clip`` ratio (float32 [G])."""
    if _compiled(x) and x.device.type == "cpu":  # CUDA: the reference (no CUDA kernel yet)
        return torch.ops.rptq.fake_quant_act_token.default(x, act_group_sizes, clip, bits)
    _check(1 <= bits <= 8, f"fake_quant_act_token: activation bits must be in 1..8, got {bits}")
    _check(x.dtype in _FLOATS, f"fake_quant_act_token: x must be a float tensor, got {x.dtype}")
    _check_groups(act_group_sizes, x.shape[-1], "fake_quant_act_token")
    _check(clip.dim() == 1 and clip.numel() == act_group_sizes.numel() and clip.dtype.is_floating_point,
           f"fake_quant_act_token: clip must be float [{act_group_sizes.numel()}], one ratio per group")
    return ref_fake_quant_act_token(x, act_group_sizes, clip, bits)


def reorder_norm(x, perm, weight, bias, eps, rms, act_scale=None, act_zero=None, act_group_sizes=None,
                 act_bits=16):
    """Fused gather + LayerNorm/RMSNorm (+ optional output fake-quant): ``norm(x[..., perm]) * weight + bias``."""
    if _compiled(x):
        return torch.ops.rptq.reorder_norm.default(x, perm, weight, bias, float(eps), bool(rms), act_scale, act_zero,
                                                   act_group_sizes, act_bits)
    c = x.shape[-1]
    _check(x.dtype in _FLOATS, f"reorder_norm: x must be a float tensor, got {x.dtype}")
    _check(perm.dim() == 1 and perm.numel() == c and perm.dtype in (torch.int64, torch.int32),
           f"reorder_norm: perm must be an int64 [C={c}] tensor, got {perm.dtype} {tuple(perm.shape)}")
    _check(weight.shape == (c,), f"reorder_norm: weight must be [C={c}], got {tuple(weight.shape)}")
    _check(bias is None or bias.shape == (c,), f"reorder_norm: bias must be [C={c}]")
    if perm.numel() and perm.device.type == "cpu":
        _check(int(perm.min()) >= 0 and int(perm.max()) < c, "reorder_norm: perm has an index out of [0, C)")
    if act_bits < 16:
        _check(act_scale is not None and act_zero is not None and act_group_sizes is not None,
               "reorder_norm: act_bits < 16 needs act_scale, act_zero and act_group_sizes")
        _check_act("reorder_norm", x, act_scale, act_zero, act_group_sizes, act_bits)
        act_scale, act_zero, act_group_sizes = _f32(act_scale), _i32(act_zero), _i32(act_group_sizes)
    return ref_reorder_norm(x, perm.long(), weight, bias, eps, rms, act_scale, act_zero, act_group_sizes,
                            act_bits)


def _check_kv_params(name, scale, zero, h, d, bits):
    _check(bits in SUPPORTED_BITS, f"{name}: bits must be one of {SUPPORTED_BITS}, got {bits}")
    _check(tuple(scale.shape) == (h, d) and scale.dtype.is_floating_point,
           f"{name}: scale must be float [H={h}, D={d}], got {scale.dtype} {tuple(scale.shape)}")
    _check(tuple(zero.shape) == (h, d) and zero.dtype in (torch.int32, torch.int64),
           f"{name}: zero must be int32 [H={h}, D={d}], got {zero.dtype} {tuple(zero.shape)}")


def kv_pack(x, scale, zero, bits):
    """Quantize x [B, H, T, D] per channel (scale/zero [H, D]) → uint8 [B, H, T, kv_row_bytes(D, bits)]."""
    if _compiled(x):
        return torch.ops.rptq.kv_pack.default(x, scale, zero, bits)
    _check(x.dim() == 4 and x.dtype in _FLOATS, f"kv_pack: x must be a float [B, H, T, D], got {x.dtype} {tuple(x.shape)}")
    _check_kv_params("kv_pack", scale, zero, x.shape[1], x.shape[3], bits)
    return ref_kv_pack(x, scale, zero, bits)


def kv_unpack(packed, scale, zero, bits, D):
    """Packed [B, H, T, kv_row_bytes(D)] → float32 [B, H, T, D]."""
    if _compiled(packed):
        return torch.ops.rptq.kv_unpack.default(packed, scale, zero, bits, D)
    _check(packed.dim() == 4 and packed.dtype == torch.uint8, "kv_unpack: packed must be uint8 [B, H, T, row]")
    _check(packed.shape[-1] == kv_row_bytes(D, bits) if bits in SUPPORTED_BITS else False,
           f"kv_unpack: rows must have kv_row_bytes({D}, {bits}) bytes, got {packed.shape[-1]}")
    _check_kv_params("kv_unpack", scale, zero, packed.shape[1], D, bits)
    return ref_kv_unpack(packed, scale, zero, bits, D)


def kv_append(cache, x, scale, zero, bits, pos):
    """Quantize x [B, H, T, D] and write it into ``cache[:, :, pos:pos+T]`` (cache: uint8 [B, H, S, row])."""
    if _compiled(x):
        torch.ops.rptq.kv_append.default(cache, x, scale, zero, bits, pos)
        return
    _check(x.dim() == 4 and x.dtype in _FLOATS, f"kv_append: x must be a float [B, H, T, D], got {tuple(x.shape)}")
    b, h, t, d = x.shape
    _check_kv_params("kv_append", scale, zero, h, d, bits)
    _check(cache.dtype == torch.uint8 and cache.dim() == 4 and cache.shape[0] == b and cache.shape[1] == h
           and cache.shape[3] == kv_row_bytes(d, bits),
           f"kv_append: cache must be uint8 [B={b}, H={h}, S, {kv_row_bytes(d, bits)}], got "
           f"{cache.dtype} {tuple(cache.shape)}")
    _check(cache.is_contiguous(), "kv_append: cache must be contiguous")
    _check(0 <= pos and pos + t <= cache.shape[2],
           f"kv_append: positions {pos}..{pos + t} do not fit a cache of {cache.shape[2]}")
    ref_kv_append(cache, x, scale, zero, bits, pos)


def decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling, p_bits=16):
    """Attention of q [B, Hq, Tq, D] over the first kv_len positions of a packed KV cache
    ([B, Hkv, S, kv_row_bytes(D)]), causal for the Tq new queries, GQA; returns q's dtype.
    Compiled kernels dequantize in registers and never materialize fp K/V."""
    if _compiled(q):
        return torch.ops.rptq.decode_attention.default(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits,
                                                       int(kv_len), float(scaling), int(p_bits))
    _check(q.dim() == 4 and q.dtype in _FLOATS, f"decode_attention: q must be a float [B, Hq, Tq, D], got {tuple(q.shape)}")
    b, hq, tq, d = q.shape
    _check(bits in SUPPORTED_BITS, f"decode_attention: bits must be one of {SUPPORTED_BITS}")
    for name, kv in (("k_packed", k_packed), ("v_packed", v_packed)):
        _check(kv.dtype == torch.uint8 and kv.dim() == 4 and kv.shape[0] == b and kv.shape[3] == kv_row_bytes(d, bits),
               f"decode_attention: {name} must be uint8 [B={b}, Hkv, S, {kv_row_bytes(d, bits)}], got "
               f"{kv.dtype} {tuple(kv.shape)}")
    _check(k_packed.shape == v_packed.shape, "decode_attention: k_packed and v_packed differ in shape")
    hkv = k_packed.shape[1]
    _check(hkv >= 1 and hq % hkv == 0, f"decode_attention: Hq={hq} is not a multiple of Hkv={hkv}")
    _check(tq <= kv_len <= k_packed.shape[2], f"decode_attention: need Tq={tq} ≤ kv_len={kv_len} ≤ S={k_packed.shape[2]}")
    _check(1 <= p_bits <= 16, f"decode_attention: p_bits must be in 1..16, got {p_bits}")
    _check_kv_params("decode_attention", k_scale, k_zero, hkv, d, bits)
    _check_kv_params("decode_attention", v_scale, v_zero, hkv, d, bits)
    return ref_decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling,
                                p_bits)
