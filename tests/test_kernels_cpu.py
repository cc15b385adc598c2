"""The compiled CPU kernels against the reference (rptq_cli/kernels.py), on every ISA this CPU runs.

Integer results (codes, packed bytes) are bit-exact. Float results: linear and attention outputs within
``rtol = 1e-4`` of the output scale (float32 accumulation in a different order).
"""
import os
import subprocess
import sys

import pytest
import torch

from op_misuse import OPS, bad_calls
from rptq_cli import kernels as K
from rptq_cli.quant import grid
from rptq_cli.quant.pack import pack_rows, packed_row_bytes

needs_compiled = pytest.mark.skipif(not K.compiled_available(), reason="compiled extension not built")

ISAS = ["amx", "avx512vnni", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    if not K.compiled_available():
        pytest.skip("compiled extension not built")
    got = K._C.set_cpu_isa(request.param)
    if got != request.param:
        K._C.set_cpu_isa("")
        pytest.skip(f"this CPU does not run {request.param}")
    with K.using_backend("compiled"):
        yield got
    K._C.set_cpu_isa("")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_groups(k, kind, g):
    if kind == "one":
        return torch.tensor([k], dtype=torch.int32)
    if kind == "fixed":
        sizes = [32] * (k // 32) + ([k % 32] if k % 32 else [])
        return torch.tensor(sizes, dtype=torch.int32)
    if kind == "tiny":  # sizes 1..3: every boundary straddles a SIMD chunk
        sizes, left = [], k
        while left:
            s = min(left, 1 + len(sizes) % 3)
            sizes.append(s)
            left -= s
        return torch.tensor(sizes, dtype=torch.int32)
    if kind == "runs":  # whole 16-code runs (--cluster-multiple 16), the last group the rest: the AVX2 run path
        sizes = (torch.randint(1, 6, (k // 16,), generator=g) * 16).tolist()
        while sum(sizes) >= k:
            sizes.pop()
        return torch.tensor(sizes + [k - sum(sizes)], dtype=torch.int32)
    cuts = torch.randperm(k - 1, generator=g)[: min(6, k - 1)].sort().values + 1
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([k])])
    return (bounds[1:] - bounds[:-1]).to(torch.int32)


def make_layer(n, k, bits, kind, seed):
    g = gen(seed)
    gs = random_groups(k, kind, g)
    G = gs.numel()
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, G, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, G), generator=g, dtype=torch.uint8)
    return pack_rows(codes, bits), scales, zeros, gs


def act_params(x, gs, bits):
    lo, hi = grid.group_min_max(x.float().amin(0), x.float().amax(0), gs.long())
    return grid.affine_params(lo * 0.9, hi * 0.9, bits)  # 0.9: some values clip


def close(out, ref, rtol=1e-4):
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=rtol * scale + (
        0 if out.dtype == torch.float32 else 2 ** -7 * scale))


# ---- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(3, 1), (5, 77), (4, 128), (2, 1000)])
def test_pack_unpack_bit_exact(isa, bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen(n * k + bits), dtype=torch.uint8)
    packed = K.pack_weight(codes, bits)
    assert torch.equal(packed, pack_rows(codes, bits))
    assert torch.equal(K.unpack_weight(packed, bits, n, k), codes)


# ---- W{2,3,4,8}A16 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["uneven", "fixed", "one", "tiny", "runs"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20, 33])  # ≤ 32 rows: GEMV blocks of ≤ 8; 33: dequantize + sgemm
def test_linear_a16(isa, bits, kind, m):
    n, k = 37, 203
    qw, scales, zeros, gs = make_layer(n, k, bits, kind, seed=bits * 100 + m)
    x = torch.randn(m, k, generator=gen(m))
    bias = torch.randn(n, generator=gen(1)) if m % 2 else None
    out = K.linear_a16(x, qw, scales, zeros, gs, bits, bias)
    close(out, K.ref_linear_a16(x, qw, scales, zeros, gs, bits, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 12])
def test_linear_a16_half_inputs(isa, dtype, m):
    qw, scales, zeros, gs = make_layer(64, 256, 4, "uneven", seed=7)
    x = torch.randn(2, m, 256, generator=gen(3)).to(dtype)
    out = K.linear_a16(x, qw, scales, zeros, gs, 4)
    assert out.dtype == dtype and out.shape == (2, m, 64)
    close(out, K.ref_linear_a16(x, qw, scales, zeros, gs, 4))


@pytest.mark.parametrize("m,n,k", [(1, 4096 // 16, 4096 // 4), (2, 160, 512)])
def test_linear_a16_large_k(isa, m, n, k):
    qw, scales, zeros, gs = make_layer(n, k, 4, "uneven", seed=11)
    x = torch.randn(m, k, generator=gen(5))
    close(K.linear_a16(x, qw, scales, zeros, gs, 4), K.ref_linear_a16(x, qw, scales, zeros, gs, 4))


def test_linear_a16_prefill_in_several_slabs(isa):
    # K = 65536: the 32 MiB float32 slab holds 128 rows, so 165 rows take two full slabs and a partial one;
    # 33 activation rows: one more than the GEMV blocks take (kGemvBatchMaxRows)
    n, k = 165, 65536
    qw, scales, zeros, gs = make_layer(n, k, 4, "fixed", seed=13)
    x, bias = torch.randn(33, k, generator=gen(6)), torch.randn(n, generator=gen(7))
    close(K.linear_a16(x, qw, scales, zeros, gs, 4, bias), K.ref_linear_a16(x, qw, scales, zeros, gs, 4, bias))


# ---- W4A8 / W4A4 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [576, 203])
def test_integer_gemv_small_clusters(isa, bits, k):
    # RPTQ's clusters, ~18 channels each (SmolLM2: 32 over 576): several groups in every 64-code chunk, and odd
    # sizes put group boundaries inside int16 word pairs
    g = gen(k + bits)
    sizes = torch.randint(5, 32, (k,), generator=g)
    sizes = sizes[: int((sizes.cumsum(0) < k).sum())]
    gs = torch.cat([sizes, torch.tensor([k - int(sizes.sum())])]).to(torch.int32)
    n = 45
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, gs.numel(), generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, gs.numel()), generator=g, dtype=torch.uint8)
    qw = pack_rows(codes, bits)
    x = torch.randn(1, k, generator=g) * torch.linspace(0.1, 20, k)
    bias = torch.randn(n, generator=g)
    out = K.linear_a16(x, qw, scales, zeros, gs, bits, bias)
    close(out, K.ref_linear_a16(x, qw, scales, zeros, gs, bits, bias))
    if isa in INTEGER_GEMV:
        close(out, K.ref_linear_a16(on_int16_grids(x, gs), qw, scales, zeros, gs, bits, bias), rtol=2e-6)
        s, z = act_params(x, gs, 4)
        close(K.linear_aq(x, qw, scales, zeros, gs, bits, s, z, 4),
              K.ref_linear_aq(x, qw, scales, zeros, gs, bits, s, z, 4), rtol=2e-6)


@pytest.mark.parametrize("bits,act_bits", [(4, 8), (4, 4), (3, 4), (2, 8), (8, 8)])
@pytest.mark.parametrize("kind", ["uneven", "fixed", "one", "tiny", "runs"])
@pytest.mark.parametrize("m", [1, 5, 13])
def test_linear_aq(isa, bits, act_bits, kind, m):
    n, k = 70, 229
    qw, scales, zeros, gs = make_layer(n, k, bits, kind, seed=bits + act_bits + m)
    x = torch.randn(m, k, generator=gen(m + 1))
    s, z = act_params(x, gs, act_bits)
    bias = torch.randn(n, generator=gen(2)) if m != 5 else None
    out = K.linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits, bias)
    close(out, K.ref_linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits, bias))


@pytest.mark.parametrize("kind", ["one", "uneven"])
@pytest.mark.parametrize("m,bits,act_bits", [(16, 4, 8), (45, 3, 4), (33, 2, 8)])
def test_linear_aq_tiles(isa, kind, m, bits, act_bits):
    """Shapes that take the tiled integer GEMM (AMX where present: ≥ 16 rows, ≥ 64 k per group)."""
    n, k = 100, 515
    qw, scales, zeros, gs = make_layer(n, k, bits, kind, seed=m)
    x = torch.randn(m, k, generator=gen(m))
    s, z = act_params(x, gs, act_bits)
    bias = torch.randn(n, generator=gen(3))
    out = K.linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits, bias)
    close(out, K.ref_linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits, bias))


def test_linear_aq_large(isa):
    n, k, m = 96, 1024, 20
    qw, scales, zeros, gs = make_layer(n, k, 4, "uneven", seed=5)
    x = torch.randn(m, k, generator=gen(9)) * 3
    s, z = act_params(x, gs, 8)
    close(K.linear_aq(x, qw, scales, zeros, gs, 4, s, z, 8), K.ref_linear_aq(x, qw, scales, zeros, gs, 4, s, z, 8))


# ---- the integer GEMV (AVX2 and AVX-512 VNNI, ≤ kGemvMaxRows rows) -----------------------------------------
INTEGER_GEMV = ("avx512vnni", "amx", "avx2")


def on_int16_grids(x, gs):
    """x as the integer GEMV rounds it: per (row, group) a symmetric int16 grid of step max|x_g| / 32767."""
    out = torch.empty_like(x)
    for cols in torch.split(torch.arange(x.shape[-1]), gs.tolist()):
        xg = x[:, cols]
        step = xg.abs().amax(-1, keepdim=True) / 32767
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        out[:, cols] = (xg * inv).round().clamp(-32767, 32767) * step
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["uneven", "fixed", "one", "tiny", "runs"])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k", [203, 1027])
def test_integer_gemv_is_the_reference_on_int16_activations(isa, bits, kind, m, k):
    # k: a last chunk of one block (a partial load), and of 3 codes. AVX2 takes runs (and fixes where a run crosses
    # groups) for the 7 uneven groups over 203 codes, visits over 1027; runs for g32 and the tiny groups at both
    n = 37
    qw, scales, zeros, gs = make_layer(n, k, bits, kind, seed=m + 40)
    x = torch.randn(m, k, generator=gen(m)) * torch.linspace(0.1, 20, k)  # channels of very different ranges
    bias = torch.randn(n, generator=gen(1))
    out = K.linear_a16(x, qw, scales, zeros, gs, bits, bias)
    ref = K.ref_linear_a16(x, qw, scales, zeros, gs, bits, bias)
    if isa not in INTEGER_GEMV:
        return close(out, ref)  # the op's contract: within 1e-4
    # exactly the reference on the rounded activations, up to float32 summation order
    close(out, K.ref_linear_a16(on_int16_grids(x, gs), qw, scales, zeros, gs, bits, bias), rtol=2e-6)
    # so off the reference by at most what the rounding can move an output: |x − x̂| ≤ max|x_g| / 65534 per code.
    # 1e-4 of the largest output is not a bound: one group over 1027 channels of ranges 0.1..20 reaches 1.9e-4
    weight = K.ref_linear_a16(torch.eye(k), qw, scales, zeros, gs, bits).T  # [n, k]
    half_step = torch.cat([xg.abs().amax(-1, keepdim=True).expand_as(xg) for xg in x.split(gs.tolist(), -1)], -1) / 65534
    bound = half_step @ weight.abs().T
    assert ((out - ref).abs() <= bound + 2e-6 * ref.abs().max()).all()


@pytest.mark.parametrize("bits,act_bits", [(4, 8), (4, 4), (3, 4), (2, 8), (8, 8)])
@pytest.mark.parametrize("kind", ["uneven", "tiny", "runs"])
def test_integer_gemv_of_linear_aq_uses_the_activation_codes(isa, bits, act_bits, kind):
    n, k, m = 37, 203, 3
    qw, scales, zeros, gs = make_layer(n, k, bits, kind, seed=act_bits)
    x = torch.randn(m, k, generator=gen(4))
    s, z = act_params(x, gs, act_bits)
    out = K.linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits)
    close(out, K.ref_linear_aq(x, qw, scales, zeros, gs, bits, s, z, act_bits), rtol=2e-6)


@pytest.mark.parametrize("m,n", [(0, 8), (3, 0)])
def test_linear_on_empty_inputs(isa, m, n):
    qw, scales, zeros, gs = make_layer(8, 64, 4, "fixed", seed=1)
    x, s, z = torch.randn(m, 64), torch.ones(gs.numel()), torch.zeros(gs.numel(), dtype=torch.int32)
    assert K.linear_a16(x, qw[:n], scales[:n], zeros[:n], gs, 4).shape == (m, n)
    assert K.linear_aq(x, qw[:n], scales[:n], zeros[:n], gs, 4, s, z, 4).shape == (m, n)


@pytest.mark.parametrize("bits,first", [(4, None), (8, 16), (4, 16)])
def test_integer_gemv_long_group(isa, bits, first):
    # one group of 65536 codes: 1024 chunks of int32 partial sums, each converted on its own (no overflow); after a
    # first group of one run, the run path, whose int32 lanes gather up to 2^31 / (2·255·32767) runs of 8 bits
    n, k = 40, 65536
    qw, scales, zeros, gs = make_layer(n, k, bits, "one", seed=3)
    if first:
        gs = torch.tensor([first, k - first], dtype=torch.int32)
        scales, zeros = scales.repeat(1, 2), zeros.repeat(1, 2)
    x = 25 + 25 * torch.rand(1, k, generator=gen(8))  # all positive: the partial sums only grow
    out = K.linear_a16(x, qw, scales, zeros, gs, bits)
    close(out, K.ref_linear_a16(x, qw, scales, zeros, gs, bits))
    if isa in INTEGER_GEMV:
        close(out, K.ref_linear_a16(on_int16_grids(x, gs), qw, scales, zeros, gs, bits), rtol=2e-6)


@needs_compiled
def test_float_gemv_switch():
    # RPTQ_FLOAT_GEMV=1 keeps float32 activations in the 4-bit GEMV: closer to the reference than int16 grids allow
    code = ("import torch\n"
            "from rptq_cli import kernels as K\n"
            "from test_kernels_cpu import make_layer, gen\n"
            "qw, s, z, gs = make_layer(64, 512, 4, 'uneven', seed=1)\n"
            "x = torch.randn(1, 512, generator=gen(2)) * torch.linspace(0.01, 30, 512)\n"
            "with K.using_backend('compiled'):\n"
            "    out = K.linear_a16(x, qw, s, z, gs, 4)\n"
            "ref = K.ref_linear_a16(x.double(), qw, s, z, gs, 4)\n"
            "print((out.double() - ref).abs().max().item() / ref.abs().max().item())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    errors = {}
    for name, value in (("float", "1"), ("int16", None)):
        run_env = {key: v for key, v in env.items() if key != "RPTQ_FLOAT_GEMV"}
        if value:
            run_env["RPTQ_FLOAT_GEMV"] = value
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
        errors[name] = float(out.stdout.split()[-1])
    assert errors["float"] < 1e-6
    assert errors["int16"] < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_act_bit_exact(isa, bits):
    x = torch.randn(7, 101, generator=gen(4)) * 5
    gs = random_groups(101, "uneven", gen(4))
    s, z = act_params(x, gs, bits)
    assert torch.equal(K.fake_quant_act(x, s, z, gs, bits), K.ref_fake_quant_act(x, s, z, gs, bits))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(K.fake_quant_act(x.to(dtype), s, z, gs, bits), K.ref_fake_quant_act(x.to(dtype), s, z, gs, bits))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("kind", ["one", "tiny", "uneven"])
def test_fake_quant_act_token_bit_exact(isa, bits, kind):
    x = torch.randn(2, 9, 101, generator=gen(5)) * torch.rand(101, generator=gen(6)) * 5
    x[0, 3, 17] = 300.0  # a token with an outlier gets a coarse grid; the others keep theirs
    x[1, 4] = 0.0  # an all-zero token: the minimum scale, every value exact
    gs = random_groups(101, kind, gen(7))
    clip = 0.6 + 0.4 * torch.rand(gs.numel(), generator=gen(8))
    out = K.fake_quant_act_token(x, gs, clip, bits)
    assert torch.equal(out, K.ref_fake_quant_act_token(x, gs, clip, bits))
    assert torch.equal(out[1, 4], x[1, 4])
    assert torch.equal(K.fake_quant_act_token(x.bfloat16(), gs, clip, bits),
                       K.ref_fake_quant_act_token(x.bfloat16(), gs, clip, bits))


# ---- reorder-norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("c", [1, 67, 256])
def test_reorder_norm(isa, rms, with_bias, c):
    x = torch.randn(3, 5, c, generator=gen(c)) * 2 + 0.5
    perm = torch.randperm(c, generator=gen(c + 1))
    w = torch.randn(c, generator=gen(2))
    b = torch.randn(c, generator=gen(3)) if with_bias else None
    close(K.reorder_norm(x, perm, w, b, 1e-5, rms), K.ref_reorder_norm(x, perm, w, b, 1e-5, rms), rtol=1e-5)


# ---- KV cache -----------------------------------------------------------------------------------------
def kv_params(h, d, bits, seed):
    g = gen(seed)
    lo = -torch.rand(h, d, generator=g) * 3
    hi = torch.rand(h, d, generator=g) * 3
    return grid.affine_params(lo, hi, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 80])
def test_kv_pack_append_unpack(isa, bits, d):
    b, h, t, s_len = 2, 3, 5, 9
    x = torch.randn(b, h, t, d, generator=gen(d)) * 2
    scale, zero = kv_params(h, d, bits, bits)
    packed = K.kv_pack(x, scale, zero, bits)
    assert packed.shape == (b, h, t, K.kv_row_bytes(d, bits))
    assert torch.equal(packed, K.ref_kv_pack(x, scale, zero, bits))
    assert torch.equal(K.kv_unpack(packed, scale, zero, bits, d), K.ref_kv_unpack(packed, scale, zero, bits, d))
    cache = torch.zeros(b, h, s_len, K.kv_row_bytes(d, bits), dtype=torch.uint8)
    ref = cache.clone()
    K.kv_append(cache, x, scale, zero, bits, 3)
    K.ref_kv_append(ref, x, scale, zero, bits, 3)
    assert torch.equal(cache, ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("hq,hkv,tq,d", [(4, 2, 1, 128), (4, 4, 3, 64), (6, 2, 2, 80), (2, 1, 1, 32)])
@pytest.mark.parametrize("p_bits", [16, 8])
def test_decode_attention(isa, bits, hq, hkv, tq, d, p_bits):
    b, s_len, kv_len = 2, 50, 37
    g = gen(bits * 1000 + d + tq)
    k_scale, k_zero = kv_params(hkv, d, bits, 1)
    v_scale, v_zero = kv_params(hkv, d, bits, 2)
    k = K.kv_pack(torch.randn(b, hkv, s_len, d, generator=g) * 2, k_scale, k_zero, bits)
    v = K.kv_pack(torch.randn(b, hkv, s_len, d, generator=g) * 2, v_scale, v_zero, bits)
    q = torch.randn(b, hq, tq, d, generator=g)
    args = (q, k, v, k_scale, k_zero, v_scale, v_zero, bits, kv_len, d ** -0.5, p_bits)
    out, ref = K.decode_attention(*args), K.ref_decode_attention(*args)
    if p_bits == 16:
        close(out, ref)
    else:  # P on a 1/255 grid: a probability within float rounding of a midpoint may round the other way
        vmax = (v_scale * (1 << bits)).max().item()
        assert (out - ref).abs().max().item() <= 4 / 255 * vmax


INTEGER_ATTENTION = ("avx2",)  # scores and P·V on int16 queries and probabilities


def on_int16_queries(q, k_scale, scaling):
    """q as AVX2's decode attention rounds it: q' = q·k_scale·scaling on one symmetric int16 grid per query row
    (step max|q'| / 32767), mapped back through k_scale·scaling."""
    rep = q.shape[1] // k_scale.shape[0]
    factor = k_scale.repeat_interleave(rep, 0)[None, :, None, :] * scaling
    qs = q.float() * factor
    step = qs.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    return (qs * inv).round().clamp(-32767, 32767) * step / factor


def attention_on_int16_probs(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, scaling):
    """The reference's math with P as AVX2's integer P·V rounds it: one int16 grid per query row, step
    max P / 32767 (p_bits 16)."""
    d = q.shape[-1]
    k = K.ref_kv_unpack(k_packed[:, :, :kv_len], k_scale, k_zero, bits, d)
    v = K.ref_kv_unpack(v_packed[:, :, :kv_len], v_scale, v_zero, bits, d)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    tq = q.shape[2]
    scores = (q.float() @ k.transpose(-1, -2)) * scaling
    hidden = torch.arange(kv_len)[None, :] > torch.arange(kv_len - tq, kv_len)[:, None]
    p = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
    top = p.amax(-1, keepdim=True)
    return ((p * (32767 / top)).round() * (top / 32767)) @ v


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("hq,hkv,tq,d,kv_len", [(4, 2, 1, 128, 700), (6, 2, 2, 80, 37), (2, 1, 1, 32, 9)])
def test_integer_attention_is_the_reference_on_int16_queries_and_probs(isa, bits, hq, hkv, tq, d, kv_len):
    if isa not in INTEGER_ATTENTION:
        pytest.skip(f"{isa} computes the attention in float32")
    g = gen(bits + d)
    k_scale, k_zero = kv_params(hkv, d, bits, 5)
    v_scale, v_zero = kv_params(hkv, d, bits, 6)
    k = K.kv_pack(torch.randn(1, hkv, kv_len, d, generator=g) * 2, k_scale, k_zero, bits)
    v = K.kv_pack(torch.randn(1, hkv, kv_len, d, generator=g) * 2, v_scale, v_zero, bits)
    q = torch.randn(1, hq, tq, d, generator=g) * 3  # a sharp softmax: the int16 rounding shows most
    rest = (k, v, k_scale, k_zero, v_scale, v_zero, bits, kv_len, d ** -0.5, 16)
    out = K.decode_attention(q, *rest)
    exact = attention_on_int16_probs(on_int16_queries(q, k_scale, d ** -0.5), *rest[:-1])
    # the integer sums are exact; float32 order moves a score by an ulp, and a probability that sits on a midpoint
    # of its grid then rounds to the neighbouring level (max P / 32767: measured ≤ 2.7e-5 at 4000 positions)
    close(out, exact, rtol=5e-5)
    close(out, K.ref_decode_attention(q, *rest), rtol=5e-4)  # what the rounding costs: measured ≤ 2.8e-4


def test_decode_attention_bf16_long(isa):
    b, hq, hkv, d, s_len = 1, 8, 2, 128, 700
    k_scale, k_zero = kv_params(hkv, d, 4, 3)
    v_scale, v_zero = kv_params(hkv, d, 4, 4)
    g = gen(5)
    k = K.kv_pack(torch.randn(b, hkv, s_len, d, generator=g), k_scale, k_zero, 4)
    v = K.kv_pack(torch.randn(b, hkv, s_len, d, generator=g), v_scale, v_zero, 4)
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    args = (q, k, v, k_scale, k_zero, v_scale, v_zero, 4, s_len, d ** -0.5, 16)
    out = K.decode_attention(*args)
    assert out.dtype == torch.bfloat16
    close(out, K.ref_decode_attention(*args))


# ---- misuse: the same ValueError on every backend, never an out-of-bounds read -------------------------
BACKENDS = ["reference", pytest.param("compiled", marks=needs_compiled)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", bad_calls(), ids=lambda c: c[0])
def test_every_backend_rejects_the_same_arguments(backend, case):
    _, op, args, match = case
    with K.using_backend(backend), pytest.raises(ValueError, match=match):
        getattr(torch.ops.rptq, op)(*args)


def test_misuse_cases_cover_every_op():
    assert {op for _, op, _, _ in bad_calls()} == set(OPS) == {
        name for name in K.__all__ if isinstance(getattr(K, name), torch._ops.OpOverloadPacket)}


def test_non_contiguous_inputs(isa):
    qw, scales, zeros, gs = make_layer(16, 96, 4, "uneven", seed=3)
    x = torch.randn(96, 3, generator=gen(1)).t()  # non-contiguous
    ref = K.ref_linear_a16(x.contiguous(), qw, scales, zeros, gs, 4)
    close(K.linear_a16(x, qw, scales, zeros, gs, 4), ref)
    close(torch.ops.rptq.linear_a16(x, qw, scales, zeros, gs, 4), ref)
    wide = torch.zeros(16, qw.shape[1] * 2, dtype=torch.uint8)
    wide[:, ::2] = qw
    close(K.linear_a16(x, wide[:, ::2], scales, zeros, gs, 4), ref)


# ---- backend, switch, fake --------------------------------------------------------------------------
@needs_compiled
def test_backend_switch_holds_for_every_caller():
    """The switch is a dispatcher registration: direct ``torch.ops.rptq`` calls follow it too."""
    qw, scales, zeros, gs = make_layer(64, 1000, 4, "uneven", seed=1)
    x = torch.randn(1, 1000, generator=gen(2))
    ref = K.ref_linear_a16(x, qw, scales, zeros, gs, 4)
    with K.using_backend("compiled"):
        assert K.backend().startswith("cpu-")
        # the GEMV sums in another order than the reference's matmul: not bit-identical
        assert not torch.equal(torch.ops.rptq.linear_a16(x, qw, scales, zeros, gs, 4), ref)
        with K.using_backend("reference"):
            assert K.backend() == "reference" and K.use_reference()
            assert torch.equal(torch.ops.rptq.linear_a16(x, qw, scales, zeros, gs, 4), ref)
            assert torch.equal(K.linear_a16(x, qw, scales, zeros, gs, 4), ref)
        assert not torch.equal(K.linear_a16(x, qw, scales, zeros, gs, 4), ref)
    with pytest.raises(ValueError, match="backend"):
        K.set_backend("fast")


def test_environment_chooses_the_reference_at_import():
    code = ("from rptq_cli import kernels as K\n"
            "print(K.backend(), K.set_backend('compiled'), K.backend() != 'reference' or not K.compiled_available())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RPTQ_KERNELS": "reference"})
    assert out.stdout.split() == ["reference", "reference", "True"]


def test_fake_shapes():  # the fakes are registered in Python: no extension needed
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 5, 70)
        y = torch.ops.rptq.linear_a16(x, torch.empty(9, packed_row_bytes(70, 4), dtype=torch.uint8),
                                      torch.empty(9, 2), torch.empty(9, 2, dtype=torch.uint8),
                                      torch.empty(2, dtype=torch.int32), 4)
        assert y.shape == (3, 5, 9)
        kv = torch.ops.rptq.kv_pack(torch.empty(1, 2, 3, 80), torch.empty(2, 80), torch.empty(2, 80, dtype=torch.int32), 3)
        assert kv.shape == (1, 2, 3, 36)
        o = torch.ops.rptq.decode_attention(torch.empty(1, 4, 1, 64), kv, kv, torch.empty(2, 64),
                                            torch.empty(2, 64, dtype=torch.int32), torch.empty(2, 64),
                                            torch.empty(2, 64, dtype=torch.int32), 3, 3, 0.1)
        assert o.shape == (1, 4, 1, 64)


def test_missing_extension_warns_once_and_runs_reference():
    code = (
        "import sys, warnings; sys.modules['rptq_cli._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "import torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    from rptq_cli import kernels as K\n"
        "    from rptq_cli.quant import grid\n"
        "    s, z = grid.affine_params(-torch.ones(3), torch.ones(3), 8)\n"
        "    gs = torch.tensor([1, 2, 3], dtype=torch.int32)\n"
        "    for _ in range(3): K.fake_quant_act(torch.randn(2, 6), s, z, gs, 8)\n"
        "    print(K.backend(), sum('compiled kernels not available' in str(x.message) for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "1"]


def test_decode_attention_over_query_blocks(isa):
    """A prefill through the cache: 2 × 90 queries of a GQA group, attended 128 at a time (kQueryBlock), each
    block over the rows its last query sees."""
    b, hq, hkv, tq, d, kv_len, bits = 1, 4, 2, 90, 64, 100, 4
    g = gen(17)
    k_scale, k_zero = kv_params(hkv, d, bits, 7)
    v_scale, v_zero = kv_params(hkv, d, bits, 8)
    k = K.kv_pack(torch.randn(b, hkv, kv_len, d, generator=g) * 2, k_scale, k_zero, bits)
    v = K.kv_pack(torch.randn(b, hkv, kv_len, d, generator=g) * 2, v_scale, v_zero, bits)
    q = torch.randn(b, hq, tq, d, generator=g)
    args = (q, k, v, k_scale, k_zero, v_scale, v_zero, bits, kv_len, d ** -0.5, 16)
    close(K.decode_attention(*args), K.ref_decode_attention(*args), rtol=5e-4)
