"""The KV cache on per-token grids (``--kv-grid token``): the compiled kernels against the reference, the
simulation against the stored cache, and the grids themselves.

Codes and grids are bit-exact; attention outputs within ``rtol = 1e-4`` of the output scale (float32
accumulation in a different order), except AVX2's integer attention: within 1e-5 of the output scale of the
reference on its int16-rounded queries and weights (:func:`on_int16_grids`), within 5e-4 of the reference itself.
"""
import pytest
import torch

from rptq_cli import kernels as K
from rptq_cli.quant import grid
from rptq_cli.quant.pack import unpack_rows

needs_compiled = pytest.mark.skipif(not K.compiled_available(), reason="compiled extension not built")
BACKENDS = ["reference", pytest.param("compiled", marks=needs_compiled)]


def head_groups(h, d, seed):
    """Uneven groups per head, some heads with fewer groups (rows padded with empty groups)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(h):
        n = 1 + (i + seed) % 4
        cuts = (torch.randperm(d - 1, generator=g)[: n - 1].sort().values + 1).tolist()
        rows.append([b - a for a, b in zip([0, *cuts], [*cuts, d])])
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)


def keys(b, h, t, d, seed):
    """Keys with a token far larger than the rest (an attention sink) and per-channel offsets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g) + torch.randn(d, generator=g) * 3
    x[:, :, 0] *= 40
    return x


def filled_cache(b, h, s, d, bits, groups, clip, x, backend):
    g = groups.shape[1]
    cache = torch.zeros(b, h, s, K.kv_row_bytes(d, bits), dtype=torch.uint8)
    scale = torch.zeros(b, h, s, g, dtype=torch.float16)
    zero = torch.zeros(b, h, s, g, dtype=torch.uint8)
    with K.using_backend(backend):
        K.kv_append_token(cache, scale, zero, x[:, :, :3], groups, clip, bits, 0)  # prefill, then one by one
        for t in range(3, x.shape[2]):
            K.kv_append_token(cache, scale, zero, x[:, :, t:t + 1], groups, clip, bits, t)
    return cache, scale, zero


@needs_compiled
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 80])
def test_append_and_unpack_are_bit_exact(bits, d):
    b, h, t = 2, 3, 9
    groups = head_groups(h, d, seed=bits + d)
    clip = torch.rand(groups.shape, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.7
    x = keys(b, h, t, d, seed=bits)
    ours = filled_cache(b, h, t + 2, d, bits, groups, clip, x, "compiled")
    ref = filled_cache(b, h, t + 2, d, bits, groups, clip, x, "reference")
    for got, want in zip(ours, ref):
        assert torch.equal(got, want)
    with K.using_backend("compiled"):
        out = K.kv_unpack_token(*ours, groups, bits, d)
    assert torch.equal(out, K.ref_kv_unpack_token(*ref, groups, bits, d))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_cache_is_the_simulation(backend):
    """What the cache stores dequantizes to exactly what the simulated model computes (fake_quant_kv_token)."""
    b, h, t, d, bits = 1, 2, 7, 64, 4
    groups, clip = head_groups(h, d, seed=3), None
    clip = torch.ones(groups.shape)
    x = keys(b, h, t, d, seed=4).half()
    cache, scale, zero = filled_cache(b, h, t, d, bits, groups, clip, x, backend)
    with K.using_backend(backend):
        stored = K.kv_unpack_token(cache, scale, zero, groups, bits, d)
    assert torch.equal(stored.half(), K.fake_quant_kv_token(x, groups, clip, bits))


def test_grids_follow_each_token():
    """A sink token 40× larger than the rest does not widen the grid of the others (as one static range
    per cluster would): every token keeps its error within half a step of its own grid."""
    b, h, t, d, bits = 1, 1, 16, 64, 4
    groups = torch.tensor([[32, 32]], dtype=torch.int32)
    x = keys(b, h, t, d, seed=5)
    scale, zero = K.kv_token_grids(x, groups, torch.ones(1, 2), bits)
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8 and scale.shape == (b, h, t, 2)
    assert scale[0, 0, 0].min() > 10 * scale[0, 0, 1:].max()  # the sink's grid is its own
    err = (K.fake_quant_kv_token(x, groups, torch.ones(1, 2), bits) - x).abs()
    step = grid.expand_groups(scale.float(), groups[0])
    assert (err <= step / 2 + 1e-6).all()


def on_int16_grids(q, k, v, k_groups, v_groups, bits, kv_len, scaling, p_bits):
    """Decode attention as AVX2's integer kernel rounds it: q' = q·scaling on one symmetric int16 grid per query
    (step max|q'| / 32767); P as the reference makes it; then w = p·a per token and V group on one int16 grid
    per query and group (step max_s w / 32767), against V's codes less their zeros."""
    d, tq = q.shape[-1], q.shape[2]
    rep = q.shape[1] // k[0].shape[1]
    keys_f = K.ref_kv_unpack_token(k[0][:, :, :kv_len], k[1][:, :, :kv_len], k[2][:, :, :kv_len], k_groups, bits, d)
    qs = q.float() * scaling
    step = qs.abs().amax(-1, keepdim=True) / 32767
    qs = (qs * torch.where(step > 0, 1 / step, torch.zeros_like(step))).round().clamp(-32767, 32767) * step
    scores = qs @ keys_f.repeat_interleave(rep, 1).transpose(-1, -2)
    causal = torch.arange(kv_len)[None, :] > torch.arange(kv_len - tq, kv_len)[:, None]
    p = scores.masked_fill(causal, float("-inf")).softmax(-1)
    if p_bits < 16:
        p = torch.round(p * ((1 << p_bits) - 1)) / ((1 << p_bits) - 1)
    codes = unpack_rows(v[0][:, :, :kv_len], bits, d).float()  # [B, Hkv, S, D]
    out = []
    for i in range(q.shape[1]):
        h, sizes = i // rep, v_groups[i // rep]
        w = p[:, i, :, :, None] * v[1][:, h, None, :kv_len].float()  # [B, Tq, S, G]
        wstep = w.amax(2, keepdim=True) / 32767
        w = (w * torch.where(wstep > 0, 1 / wstep, torch.zeros_like(wstep))).round().clamp(max=32767) * wstep
        centered = codes[:, h] - grid.expand_groups(v[2][:, h, :kv_len].float(), sizes)  # [B, S, D]
        out.append((grid.expand_groups(w, sizes) * centered[:, None]).sum(2))
    return torch.stack(out, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("hq,hkv,tq,p_bits", [(4, 2, 1, 16), (6, 3, 3, 16), (2, 2, 2, 8)])
def test_decode_attention_token(backend, bits, hq, hkv, tq, p_bits):
    b, s, kv_len, d = 2, 40, 33, 64
    k_groups, v_groups = head_groups(hkv, d, seed=7), head_groups(hkv, d, seed=8)
    ones = torch.ones(k_groups.shape), torch.ones(v_groups.shape)
    k = filled_cache(b, hkv, s, d, bits, k_groups, ones[0], keys(b, hkv, kv_len, d, seed=9), "reference")
    v = filled_cache(b, hkv, s, d, bits, v_groups, ones[1], keys(b, hkv, kv_len, d, seed=10), "reference")
    q = torch.randn(b, hq, tq, d, generator=torch.Generator().manual_seed(11))
    args = (q, k[0], v[0], k[1], k[2], v[1], v[2], k_groups, v_groups, bits, kv_len, d ** -0.5, p_bits)
    with K.using_backend(backend):
        out = K.decode_attention_token(*args)
    ref = K.ref_decode_attention_token(*args)
    integer = backend == "compiled" and K._C.cpu_isa() == "avx2"
    if integer:  # the int16 grids are the whole difference (measured ≤ 1.4e-6 of the output scale)
        exact = on_int16_grids(q, k, v, k_groups, v_groups, bits, kv_len, d ** -0.5, p_bits)
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-5 * ref.abs().max().item())
    if p_bits == 16:  # AVX2: measured ≤ 2.1e-4, the weights of the tokens beside a sink on the sink's int16 grid
        tol = 5e-4 if integer else 1e-4
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    else:  # P on a 1/255 grid: a probability within float rounding of a midpoint may round the other way
        assert (out - ref).abs().max().item() <= 4 / 255 * ref.abs().max().item() * 2
    # the reference itself: the same attention over the dequantized cache
    keys_f = K.ref_kv_unpack_token(k[0][:, :, :kv_len], k[1][:, :, :kv_len], k[2][:, :, :kv_len], k_groups, bits, d)
    vals_f = K.ref_kv_unpack_token(v[0][:, :, :kv_len], v[1][:, :, :kv_len], v[2][:, :, :kv_len], v_groups, bits, d)
    rep = hq // hkv
    scores = q @ keys_f.repeat_interleave(rep, 1).transpose(-1, -2) * d ** -0.5
    causal = torch.arange(kv_len)[None, :] > torch.arange(kv_len - tq, kv_len)[:, None]
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    if p_bits == 16:
        torch.testing.assert_close(ref, probs @ vals_f.repeat_interleave(rep, 1), rtol=1e-4, atol=1e-5)


@needs_compiled
@pytest.mark.parametrize("d,kv_len,groups", [(80, 300, 4), (128, 301, 8), (64, 130, 9)])
def test_token_attention_over_tiles_and_groups(d, kv_len, groups):
    """Several 128-row tiles, an odd last row, a head_dim that ends in half a chunk, eight groups (the most one
    vector of grids holds) and nine (the portable kernel's)."""
    b, hkv, hq, bits = 1, 2, 4, 4
    g = torch.Generator().manual_seed(groups)
    sizes = []
    for _ in range(hkv):
        cuts = (torch.randperm(d - 1, generator=g)[: groups - 1].sort().values + 1).tolist()
        sizes.append([hi - lo for lo, hi in zip([0, *cuts], [*cuts, d])])
    k_groups = v_groups = torch.tensor(sizes, dtype=torch.int32)
    ones = torch.ones(k_groups.shape)
    k = filled_cache(b, hkv, kv_len, d, bits, k_groups, ones, keys(b, hkv, kv_len, d, seed=12), "compiled")
    v = filled_cache(b, hkv, kv_len, d, bits, v_groups, ones, keys(b, hkv, kv_len, d, seed=13), "compiled")
    q = torch.randn(b, hq, 1, d, generator=g)
    args = (q, k[0], v[0], k[1], k[2], v[1], v[2], k_groups, v_groups, bits, kv_len, d ** -0.5)
    with K.using_backend("compiled"):
        out = K.decode_attention_token(*args)
    ref = K.ref_decode_attention_token(*args)
    scale = ref.abs().max().item()
    if K._C.cpu_isa() == "avx2" and groups <= 8:
        exact = on_int16_grids(q, k, v, k_groups, v_groups, bits, kv_len, d ** -0.5, 16)
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out, ref, rtol=5e-4, atol=5e-4 * scale)


@needs_compiled
def test_token_attention_over_query_blocks():
    """A prefill through the cache: 3 × 60 queries of a GQA group, attended 128 at a time (kQueryBlock)."""
    b, hkv, hq, tq, d, kv_len, bits = 1, 1, 3, 60, 64, 70, 4
    k_groups, v_groups = head_groups(hkv, d, seed=21), head_groups(hkv, d, seed=22)
    k = filled_cache(b, hkv, kv_len, d, bits, k_groups, torch.ones(k_groups.shape), keys(b, hkv, kv_len, d, seed=23),
                     "compiled")
    v = filled_cache(b, hkv, kv_len, d, bits, v_groups, torch.ones(v_groups.shape), keys(b, hkv, kv_len, d, seed=24),
                     "compiled")
    q = torch.randn(b, hq, tq, d, generator=torch.Generator().manual_seed(25))
    args = (q, k[0], v[0], k[1], k[2], v[1], v[2], k_groups, v_groups, bits, kv_len, d ** -0.5)
    with K.using_backend("compiled"):
        out = K.decode_attention_token(*args)
    ref = K.ref_decode_attention_token(*args)
    torch.testing.assert_close(out, ref, rtol=5e-4, atol=5e-4 * ref.abs().max().item())
