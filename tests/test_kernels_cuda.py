"""CUDA kernels (csrc/cuda) against the PyTorch references of rptq_cli.kernels.

Integer outputs (codes, packed bytes) must be bit-exact; float outputs are compared by
‖out − ref‖ / ‖ref‖ with the tolerances stated per test (fp16 outputs carry ~5e-4 rounding on their own).
Skipped, not failed, where there is no GPU or the extension was built without CUDA.
"""
from __future__ import annotations

import pytest
import torch

from op_misuse import bad_calls
from rptq_cli import kernels
from rptq_cli.quant import grid
from rptq_cli.quant.pack import pack_rows

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(kernels._C is None or not kernels._C.has_cuda(),
                       reason="rptq_cli._C was built without the CUDA kernels"),
]

DEV = "cuda"
ops = torch.ops.rptq

# uneven cluster groups (as KMeans gives them) and even ones; each list sums to its K
GROUPS = {
    256: [37, 81, 12, 126],
    288: [5, 64, 1, 100, 33, 85],
    4096: [128] * 32,
    1024: [37, 81, 12, 126, 300, 2, 99, 367],
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def qweight_of(n, k, bits, sizes, scale_dtype=torch.float16, seed=0):
    g = gen(seed)
    gs = torch.tensor(sizes, dtype=torch.int32)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, len(sizes), generator=g) * 0.02 + 0.002).to(scale_dtype)
    zeros = torch.randint(0, 1 << bits, (n, len(sizes)), generator=g, dtype=torch.uint8)
    return pack_rows(codes, bits), scales, zeros, gs


def act_params(x, sizes, bits):
    gs = torch.tensor(sizes, dtype=torch.int32)
    flat = x.float().reshape(-1, x.shape[-1])
    lo, hi = grid.group_min_max(flat.amin(0), flat.amax(0), gs)
    scale, zero = grid.affine_params(lo, hi, bits)
    return scale, zero, gs


def cuda(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(5, 37), (64, 256), (3, 1000)])
def test_pack_unpack_bit_exact(bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen(bits), dtype=torch.uint8)
    packed = ops.pack_weight(codes.to(DEV), bits)
    assert torch.equal(packed.cpu(), kernels.ref_pack_weight(codes, bits))
    assert torch.equal(ops.unpack_weight(packed, bits, n, k).cpu(), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 288])
def test_fake_quant_act_bit_exact(dtype, bits, k):
    x = (torch.randn(7, 3, k, generator=gen(1)) * 3).to(dtype)
    scale, zero, gs = act_params(x[:, :2], GROUPS[k], bits)  # some values fall outside the range: clamping
    ref_f = kernels.ref_fake_quant_act(x, scale, zero, gs, bits)
    out_f = ops.fake_quant_act(*cuda(x, scale, zero, gs), bits)
    assert out_f.dtype == dtype
    assert torch.equal(out_f.cpu(), ref_f)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4, 2, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("k", [256, 1024, 4096])
def test_linear_a16(bits, rows, k):
    n = 200 if k < 4096 else 96
    qw, sc, zr, gs = qweight_of(n, k, bits, GROUPS[k], seed=rows)
    x = torch.randn(rows, k, generator=gen(rows)).half()
    bias = torch.randn(n, generator=gen(2)).half()
    ref = kernels.ref_linear_a16(x, qw, sc, zr, gs, bits, bias)
    out = ops.linear_a16(*cuda(x, qw, sc, zr, gs), bits, bias.to(DEV))
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 20])
def test_linear_a16_dtypes(dtype, rows):
    qw, sc, zr, gs = qweight_of(72, 288, 4, GROUPS[288], scale_dtype=torch.float32)
    x = torch.randn(2, rows, 288, generator=gen(3)).to(dtype)
    bias = torch.randn(72, generator=gen(4))
    ref = kernels.ref_linear_a16(x, qw, sc, zr, gs, 4, bias)
    out = ops.linear_a16(*cuda(x, qw, sc, zr, gs), 4, bias.to(DEV))
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_linear_a16_fp32_scales_no_bias_gemv():
    qw, sc, zr, gs = qweight_of(33, 1024, 4, GROUPS[1024], scale_dtype=torch.float32)
    x = torch.randn(1, 1, 1024, generator=gen(5)).half() * 8
    ref = kernels.ref_linear_a16(x, qw, sc, zr, gs, 4)
    out = ops.linear_a16(*cuda(x, qw, sc, zr, gs), 4, None)
    assert rel_err(out, ref) < 3e-3


def test_linear_a16_large_activations_do_not_overflow():
    # LLM activations reach the thousands (massive activations); fp16 partial sums must not overflow
    qw, sc, zr, gs = qweight_of(64, 256, 4, GROUPS[256])
    x = torch.randn(1, 256, generator=gen(6)).half()
    x[0, 5] = 3000.0
    x[0, 200] = -6000.0
    ref = kernels.ref_linear_a16(x, qw, sc, zr, gs, 4)
    out = ops.linear_a16(*cuda(x, qw, sc, zr, gs), 4)
    assert rel_err(out, ref) < 3e-3


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 7, 100, 300])
@pytest.mark.parametrize("k,n", [(256, 200), (288, 136), (1024, 520), (4096, 256)])
def test_linear_aq(act_bits, rows, k, n):
    qw, sc, zr, gs = qweight_of(n, k, 4, GROUPS[k], seed=k + rows)
    x = torch.randn(rows, k, generator=gen(rows)).half() * 2
    scale, zero, _ = act_params(x, GROUPS[k], act_bits)
    bias = torch.randn(n, generator=gen(7)).half()
    ref = kernels.ref_linear_aq(x, qw, sc, zr, gs, 4, scale, zero, act_bits, bias)
    out = ops.linear_aq(*cuda(x, qw, sc, zr, gs), 4, *cuda(scale, zero), act_bits, bias.to(DEV))
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_aq_dtypes_and_3bit(dtype):
    qw, sc, zr, gs = qweight_of(64, 288, 4, GROUPS[288], scale_dtype=torch.float32)
    x = torch.randn(3, 50, 288, generator=gen(8)).to(dtype)
    scale, zero, _ = act_params(x, GROUPS[288], 8)
    ref = kernels.ref_linear_aq(x, qw, sc, zr, gs, 4, scale, zero, 8, None)
    out = ops.linear_aq(*cuda(x, qw, sc, zr, gs), 4, *cuda(scale, zero), 8, None)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    qw3, sc3, zr3, _ = qweight_of(64, 288, 3, GROUPS[288])
    ref = kernels.ref_linear_aq(x, qw3, sc3, zr3, gs, 3, scale, zero, 8, None)
    out = ops.linear_aq(*cuda(x, qw3, sc3, zr3, gs), 3, *cuda(scale, zero), 8, None)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", [256, 1000])
def test_reorder_norm(rms, dtype, c):
    x = (torch.randn(2, 5, c, generator=gen(9)) * 4 + 1).to(dtype)
    perm = torch.randperm(c, generator=gen(10))
    w = torch.randn(c, generator=gen(11)).to(dtype)
    b = None if rms else torch.randn(c, generator=gen(12)).to(dtype)
    ref = kernels.ref_reorder_norm(x, perm, w, b, 1e-5, rms)
    out = ops.reorder_norm(*cuda(x, perm, w, b), 1e-5, rms)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_kv_pack_unpack_append(bits, d):
    b, h, t = 2, 3, 5
    x = torch.randn(b, h, t, d, generator=gen(17)).half() * 2
    lo, hi = x.float().amin((0, 2)), x.float().amax((0, 2))
    scale, zero = grid.affine_params(lo * 0.8, hi * 0.8, bits)  # some clamping
    ref = kernels.ref_kv_pack(x, scale, zero, bits)
    out = ops.kv_pack(*cuda(x, scale, zero), bits)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(ops.kv_unpack(out, *cuda(scale, zero), bits, d).cpu(),
                       kernels.ref_kv_unpack(ref, scale, zero, bits, d))
    cache = torch.zeros(b, h, 11, ref.shape[-1], dtype=torch.uint8)
    cache_cuda = cache.to(DEV)
    kernels.ref_kv_append(cache, x, scale, zero, bits, 4)
    ops.kv_append(cache_cuda, *cuda(x, scale, zero), bits, 4)
    assert torch.equal(cache_cuda.cpu(), cache)


# ---------------------------------------------------------------------------------------------------
def kv_cache(b, hkv, s, d, bits, seed):
    g = gen(seed)
    k = torch.randn(b, hkv, s, d, generator=g) * 2
    v = torch.randn(b, hkv, s, d, generator=g)
    params = []
    for t in (k, v):
        scale, zero = grid.affine_params(t.amin((0, 2)), t.amax((0, 2)), bits)
        params += [scale, zero]
    kp = kernels.ref_kv_pack(k, params[0], params[1], bits)
    vp = kernels.ref_kv_pack(v, params[2], params[3], bits)
    return kp, vp, params


@pytest.mark.parametrize("bits,d", [(4, 128), (4, 64), (4, 80), (3, 128), (8, 64), (2, 128)])
@pytest.mark.parametrize("hq,hkv,tq", [(4, 4, 1), (8, 2, 1), (4, 2, 3)])
@pytest.mark.parametrize("kv_len", [37, 1500])
def test_decode_attention(bits, d, hq, hkv, tq, kv_len):
    b, s = 2, kv_len + 9
    kp, vp, (ks, kz, vs, vz) = kv_cache(b, hkv, s, d, bits, seed=kv_len + d)
    q = torch.randn(b, hq, tq, d, generator=gen(18)).half()
    scaling = d ** -0.5
    ref = kernels.ref_decode_attention(q, kp, vp, ks, kz, vs, vz, bits, kv_len, scaling)
    out = ops.decode_attention(*cuda(q, kp, vp, ks, kz, vs, vz), bits, kv_len, scaling, 16)
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("p_bits", [8, 4])
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_attention_quantized_p(p_bits, bits):
    b, hq, hkv, tq, d, kv_len = 1, 4, 2, 2, 128, 700
    kp, vp, (ks, kz, vs, vz) = kv_cache(b, hkv, kv_len, d, bits, seed=3)
    q = torch.randn(b, hq, tq, d, generator=gen(19)).float() * 3
    ref = kernels.ref_decode_attention(q, kp, vp, ks, kz, vs, vz, bits, kv_len, d ** -0.5, p_bits)
    out = ops.decode_attention(*cuda(q, kp, vp, ks, kz, vs, vz), bits, kv_len, d ** -0.5, p_bits)
    # P on a coarse grid: a probability on a rounding edge may flip one level (different float order)
    assert rel_err(out, ref) < 2e-2


def test_decode_attention_float32_exactish():
    b, hq, hkv, tq, d, kv_len = 1, 2, 1, 1, 128, 5000
    kp, vp, (ks, kz, vs, vz) = kv_cache(b, hkv, kv_len, d, 4, seed=4)
    q = torch.randn(b, hq, tq, d, generator=gen(20))
    ref = kernels.ref_decode_attention(q, kp, vp, ks, kz, vs, vz, 4, kv_len, d ** -0.5)
    out = ops.decode_attention(*cuda(q, kp, vp, ks, kz, vs, vz), 4, kv_len, d ** -0.5, 16)
    assert rel_err(out, ref) < 1e-4


def test_public_entry_points_dispatch_to_cuda():
    """kernels.py's public functions run the CUDA kernels (not the reference) for CUDA tensors."""
    assert kernels.backend("cuda") == "cuda"
    qw, sc, zr, gs = qweight_of(64, 256, 4, GROUPS[256])
    x = torch.randn(1, 256, generator=gen(21)).half()
    out = kernels.linear_a16(*cuda(x, qw, sc, zr, gs), 4)
    assert out.is_cuda
    assert rel_err(out, kernels.ref_linear_a16(x, qw, sc, zr, gs, 4)) < 3e-3


@pytest.mark.parametrize("index", range(len(bad_calls())), ids=[case[0] for case in bad_calls()])
def test_cuda_rejects_the_same_arguments_as_every_backend(index):
    """The CUDA wrappers run the checks of csrc/checks.h, as the CPU ones do (tests/test_kernels_cpu.py)."""
    _, op, args, match = bad_calls(DEV)[index]
    with kernels.using_backend("compiled"), pytest.raises(ValueError, match=match):
        getattr(ops, op)(*args)
    torch.cuda.synchronize()  # and no kernel was launched that faults later


def test_group_sizes_on_another_device_are_rejected():
    qw, sc, zr, gs = qweight_of(8, 64, 4, [20, 44])
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="group_sizes"):
        ops.linear_a16(*cuda(x, qw, sc, zr), gs, 4)
