"""The CPU rows of ``rptq bench``: the read bandwidth, then each rptq op against its torch baselines.

First the read bandwidth (a large streaming reduction: the ceiling of every memory-bound op), then for each op
our time and every baseline's on the same shapes (:func:`timing.time_pair`), one row per (op, baseline)::

    {"op": "w4a16_gemv", "shape": "1x4096 @ 4096x4096", "backend": "cpu-avx512vnni", "ms": 0.61,
     "baseline": "torch_bf16", "baseline_ms": 2.9, "speedup": 4.7, "gbps": 14.1, "bw_frac": 0.82}

``gbps`` is the bytes our op must read (packed weights, scales, zeros; the packed KV cache) per second, and
``bw_frac`` that over the measured read bandwidth; compute-bound ops give ``gops`` (2·M·N·K / s).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rptq_cli import kernels
from rptq_cli.quant import grid

from .inputs import cluster_sizes, nbytes, quantized_linear
from .table import row
from .timing import rotation_bytes, time_pair


def _row(op, shape, ms, baseline, baseline_ms, **extra) -> dict:
    return row(op, shape, kernels.backend(), ms, baseline, baseline_ms, **extra)


def read_bandwidth(reps: int) -> dict:
    """GB/s of streaming reads over a buffer larger than the last-level cache: the best of a float32 sum and a
    float32 GEMV over the same buffer (the strictest ceiling to compare memory-bound ops with)."""
    n = max(rotation_bytes("cpu"), 512 * 2**20) // 4 // 4096 * 4096
    buf = torch.ones(n)
    vec = torch.ones(1, 4096)
    # the buffer alone overflows the cache: no copies
    ms_sum, ms_gemv = time_pair((torch.sum, (buf,)), (lambda b: F.linear(vec, b.view(-1, 4096)), (buf,)), reps,
                                rotate=False)
    ms = min(ms_sum, ms_gemv)
    how = "sum" if ms_sum <= ms_gemv else "gemv"
    return _row("read_bandwidth", f"{n * 4 // 2**20}MiB fp32 {how}", ms, None, None, gbps=n * 4 / ms / 1e6)


def bench_gemv(n, k, bits, reps, bw, groups=32, baselines=("torch_fp32", "torch_bf16"), uneven=False,
               multiple=1) -> list[dict]:
    qweight, scales, zeros, gs = quantized_linear(n, k, bits, cluster_sizes(k, groups, uneven, multiple=multiple))
    x = torch.randn(1, k)
    ours = (lambda qw, s, z: kernels.linear_a16(x, qw, s, z, gs, bits), (qweight, scales, zeros))
    weight_bytes = nbytes(qweight, scales, zeros)
    shape = f"1x{k} @ {k}x{n}" + (f" {groups} clusters" if uneven else "") + (f" x{multiple}" if multiple > 1 else "")
    rows = []
    for name in baselines:
        dtype = torch.float32 if name == "torch_fp32" else torch.bfloat16
        xb = x.to(dtype)
        ms, bms = time_pair(ours, (lambda w: F.linear(xb, w), ((torch.randn(n, k) * 0.02).to(dtype),)), reps)
        gbps = weight_bytes / ms / 1e6
        rows.append(_row(f"w{bits}a16_gemv", shape, ms, name, bms, gbps=gbps, bw_frac=gbps / bw))
    return rows


def bench_gemm_a16(m, n, k, reps) -> list[dict]:
    qweight, scales, zeros, gs = quantized_linear(n, k, 4, cluster_sizes(k, 32, False))
    x = torch.randn(m, k)
    ms, bms = time_pair((lambda: kernels.linear_a16(x, qweight, scales, zeros, gs, 4), ()),
                        (lambda w: F.linear(x, w), (torch.randn(n, k) * 0.02,)), reps, rotate=False)
    return [_row("w4a16_gemm", f"{m}x{k} @ {k}x{n}", ms, "torch_fp32", bms, gops=2 * m * n * k / ms / 1e6)]


def bench_gemm_aq(m, n, k, act_bits, reps) -> list[dict]:
    qweight, scales, zeros, gs = quantized_linear(n, k, 4, cluster_sizes(k, 32, False))
    x = torch.randn(m, k)
    s, z = grid.affine_params(torch.full((32,), -3.0), torch.full((32,), 3.0), act_bits)
    ours = (lambda: kernels.linear_aq(x, qweight, scales, zeros, gs, 4, s, z, act_bits), ())
    baselines = {"torch_fp32": (lambda w: F.linear(x, w), (torch.randn(n, k) * 0.02,)),
                 "torch_int_mm": (torch._int_mm, (torch.randint(-128, 128, (m, k), dtype=torch.int8),
                                                  torch.randint(-128, 128, (k, n), dtype=torch.int8)))}
    rows = []
    for name, baseline in baselines.items():
        ms, bms = time_pair(ours, baseline, reps, rotate=False)
        rows.append(_row(f"w4a{act_bits}_gemm", f"{m}x{k} @ {k}x{n}", ms, name, bms, gops=2 * m * n * k / ms / 1e6))
    return rows


def bench_attention(heads, d, ctx, bits, reps, bw) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, ctx, d, generator=g)
    v = torch.randn(1, heads, ctx, d, generator=g)
    q = torch.randn(1, heads, 1, d, generator=g)
    scale, zero = grid.affine_params(torch.full((heads, d), -3.0), torch.full((heads, d), 3.0), bits)
    packed = (kernels.kv_pack(k, scale, zero, bits), kernels.kv_pack(v, scale, zero, bits))
    ours = (lambda kp, vp: kernels.decode_attention(q, kp, vp, scale, zero, scale, zero, bits, ctx, d ** -0.5),
            packed)
    rows = []
    for name, dtype in (("sdpa_fp32", torch.float32), ("sdpa_bf16", torch.bfloat16)):
        qd = q.to(dtype)
        ms, bms = time_pair(ours, (lambda kf, vf: F.scaled_dot_product_attention(qd, kf, vf),
                                   (k.to(dtype), v.to(dtype))), reps)
        gbps = nbytes(*packed) / ms / 1e6
        rows.append(_row(f"kv{bits}_decode_attention", f"{heads}x{d} ctx {ctx}", ms, name, bms, gbps=gbps,
                         bw_frac=gbps / bw))
    return rows


def bench_attention_token(heads, d, ctx, bits, groups, reps, bw) -> list[dict]:
    """Decode attention over a cache on per-token grids (``--kv-grid token``; ``groups`` clusters per head)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, ctx, d, generator=g)
    v = torch.randn(1, heads, ctx, d, generator=g)
    q = torch.randn(1, heads, 1, d, generator=g)
    sizes = torch.full((heads, groups), d // groups, dtype=torch.int32)
    clip = torch.ones(heads, groups)
    caches = []
    for x in (k, v):
        codes = torch.empty(1, heads, ctx, kernels.kv_row_bytes(d, bits), dtype=torch.uint8)
        scale = torch.empty(1, heads, ctx, groups, dtype=torch.float16)
        zero = torch.empty(1, heads, ctx, groups, dtype=torch.uint8)
        kernels.kv_append_token(codes, scale, zero, x, sizes, clip, bits, 0)
        caches.append((codes, scale, zero))
    (kc, ks, kz), (vc, vs, vz) = caches
    ours = (lambda kp, vp: kernels.decode_attention_token(q, kp, vp, ks, kz, vs, vz, sizes, sizes, bits, ctx,
                                                          d ** -0.5), (kc, vc))
    streamed = nbytes(kc, vc, ks, kz, vs, vz)
    rows = []
    for name, dtype in (("sdpa_fp32", torch.float32), ("sdpa_bf16", torch.bfloat16)):
        qd = q.to(dtype)
        ms, bms = time_pair(ours, (lambda kf, vf: F.scaled_dot_product_attention(qd, kf, vf),
                                   (k.to(dtype), v.to(dtype))), reps)
        gbps = streamed / ms / 1e6
        rows.append(_row(f"kv{bits}_token_decode_attention", f"{heads}x{d} ctx {ctx} g{groups}", ms, name, bms,
                         gbps=gbps, bw_frac=gbps / bw))
    return rows


def bench_kv_append(heads, d, bits, reps) -> list[dict]:
    x = torch.randn(1, heads, 1, d)
    scale, zero = grid.affine_params(torch.full((heads, d), -3.0), torch.full((heads, d), 3.0), bits)
    cache = torch.zeros(1, heads, 64, kernels.kv_row_bytes(d, bits), dtype=torch.uint8)
    fp_cache = torch.zeros(1, heads, 64, d)
    ms, bms = time_pair((lambda: kernels.kv_append(cache, x, scale, zero, bits, 5), ()),
                        (lambda: fp_cache[:, :, 5:6].copy_(x), ()), reps, rotate=False)
    return [_row(f"kv{bits}_append", f"{heads}x{d} 1 token", ms, "torch_fp32_copy", bms)]


def bench_norm(rows_, c, rms, reps) -> list[dict]:
    """The fused gather + norm against torch's gather then ``F.rms_norm`` / ``F.layer_norm``."""
    x = torch.randn(rows_, c)
    perm = torch.randperm(c)
    w, b = torch.randn(c), torch.randn(c)
    if rms:
        baseline = (lambda: F.rms_norm(x.index_select(-1, perm), (c,), w, 1e-5), ())
    else:
        baseline = (lambda: F.layer_norm(x.index_select(-1, perm), (c,), w, b, 1e-5), ())
    ms, bms = time_pair((lambda: kernels.reorder_norm(x, perm, w, None if rms else b, 1e-5, rms), ()), baseline, reps,
                        rotate=False)
    name = "torch_fp32_rms_norm" if rms else "torch_fp32_layer_norm"
    return [_row("reorder_rmsnorm" if rms else "reorder_layernorm", f"{rows_}x{c}", ms, name, bms)]


def cpu_rows(quick: bool, add) -> None:
    """Measure every CPU row, handing each list of rows to ``add`` as soon as it is measured."""
    reps = 7 if quick else 21
    few = max(3, reps // 3)  # compute-bound ops: seconds per call at 512 rows
    bw_row = read_bandwidth(5 if quick else 10)
    add([bw_row])
    bw = bw_row["gbps"]
    add(bench_gemv(4096, 4096, 4, reps, bw))
    add(bench_gemv(11008, 4096, 4, reps, bw))
    add(bench_gemv(4096, 4096, 3, reps, bw, baselines=("torch_bf16",)))
    # RPTQ's default weight groups are the input's KMeans clusters: uneven, 32 over the hidden size (R1, R4)
    # and 4 per head (R3, o_proj's input)
    add(bench_gemv(4096, 4096, 4, reps, bw, groups=32, baselines=("torch_bf16",), uneven=True))
    add(bench_gemv(4096, 4096, 4, reps, bw, groups=128, baselines=("torch_bf16",), uneven=True))
    # the same with every cluster a multiple of 16 channels (--cluster-multiple 16)
    add(bench_gemv(4096, 4096, 4, reps, bw, groups=128, baselines=("torch_bf16",), uneven=True, multiple=16))
    if not quick:
        add(bench_gemv(4096, 11008, 4, reps, bw))
    add(bench_gemm_aq(512, 4096, 4096, 8, few))
    add(bench_gemm_aq(512, 4096, 4096, 4, few))
    add(bench_gemm_a16(128 if quick else 512, 4096, 4096, few))
    add(bench_attention(32, 128, 4096, 4, reps, bw))
    if not quick:
        add(bench_attention(32, 128, 4096, 3, reps, bw))
    add(bench_attention_token(32, 128, 4096, 4, 4, reps, bw))
    add(bench_kv_append(32, 128, 4, reps))
    add(bench_norm(1, 4096, False, reps))
    add(bench_norm(512, 4096, True, few))
