"""The GPU rows of ``rptq bench``: the CUDA kernels against cuBLAS / SDPA in fp16, on this machine's GPU.

Each row has the CPU rows' format (``op, shape, backend, ms, baseline, baseline_ms, speedup`` and ``gbps`` or
``gops``), plus ``device``; :mod:`.timing` says how both sides are timed (CUDA graphs over rotating copies of
the inputs). The ops are ``torch.ops.rptq`` (``rptq_cli.kernels``); their checks read group sizes and permutations
on the host; under a CUDA graph they are skipped (the eager call before capture ran them), so the rows time the
kernels.

    python -m rptq_cli.bench.cuda [--quick] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from rptq_cli import kernels  # defines the rptq:: ops and loads the extension
from rptq_cli.quant import grid

from .inputs import cluster_sizes, nbytes, quantized_linear
from .table import format_row, row
from .timing import time_pair


def _row(op, shape, ms, baseline, baseline_ms, **extra) -> dict:
    return {**row(op, shape, "cuda", ms, baseline, baseline_ms, **extra), "device": torch.cuda.get_device_name()}


def _time(ours, baseline, reps, rotate=True):
    return time_pair(ours, baseline, reps, rotate=rotate, device="cuda")


def bench_copy(reps: int) -> dict:
    n = 1 << 28  # 512 MiB fp16: far beyond L2 without copies
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms, _ = _time((lambda: b.copy_(a), ()), None, reps, rotate=False)
    return _row("d2d_copy", f"{n * 2 >> 20}MiB fp16", ms, None, None, gbps=2 * n * 2 / ms / 1e6)


def bench_gemv(n, k, bits, reps, groups=32, uneven=False, m=1) -> dict:
    qweight, scales, zeros, gs = quantized_linear(n, k, bits, cluster_sizes(k, groups, uneven), device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ours = (lambda qw, s, z: torch.ops.rptq.linear_a16(x, qw, s, z, gs, bits, None), (qweight, scales, zeros))
    baseline = (lambda w: F.linear(x, w), (torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02,))
    ms, bms = _time(ours, baseline, reps)
    shape = f"{m}x{k} @ {k}x{n} g={'uneven' if uneven else k // groups}x{groups}"
    return _row(f"w{bits}a16_gemv", shape, ms, "cublas_fp16", bms, gbps=nbytes(qweight, scales, zeros) / ms / 1e6)


def bench_gemm_aq(m, n, k, act_bits, reps, groups=32, uneven=False) -> dict:
    qweight, scales, zeros, gs = quantized_linear(n, k, 4, cluster_sizes(k, groups, uneven), device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    flat_lo, flat_hi = grid.group_min_max(x.float().amin(0), x.float().amax(0), gs)
    a_scale, a_zero = grid.affine_params(flat_lo, flat_hi, act_bits)
    ours = (lambda: torch.ops.rptq.linear_aq(x, qweight, scales, zeros, gs, 4, a_scale, a_zero, act_bits, None), ())
    baseline = (lambda w: F.linear(x, w), (torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02,))
    ms, bms = _time(ours, baseline, reps, rotate=False)
    shape = f"{m}x{k} @ {k}x{n} g={'uneven' if uneven else k // groups}x{groups}"
    return _row(f"w4a{act_bits}_gemm", shape, ms, "cublas_fp16", bms, gops=2 * m * n * k / ms / 1e6)


def bench_attention(b, heads, d, ctx, bits, reps) -> dict:
    row_bytes = kernels.kv_row_bytes(d, bits)
    packed = tuple(torch.randint(0, 256, (b, heads, ctx, row_bytes), dtype=torch.uint8, device="cuda")
                   for _ in range(2))
    ks = torch.rand(heads, d, device="cuda") * 0.1 + 0.01
    kz = torch.randint(0, 1 << bits, (heads, d), dtype=torch.int32, device="cuda")
    q = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.float16)
    scaling = d ** -0.5
    ours = (lambda kp, vp: torch.ops.rptq.decode_attention(q, kp, vp, ks, kz, ks, kz, bits, ctx, scaling, 16),
            packed)
    fp = tuple(torch.randn(b, heads, ctx, d, device="cuda", dtype=torch.float16) for _ in range(2))
    ms, bms = _time(ours, (lambda kf, vf: F.scaled_dot_product_attention(q, kf, vf, scale=scaling), fp), reps)
    return _row(f"kv{bits}_decode_attention", f"B={b} H={heads} D={d} ctx={ctx}", ms, "sdpa_fp16", bms,
                gbps=nbytes(*packed) / ms / 1e6)


def cuda_rows(quick: bool, add) -> None:
    """Measure every GPU row, handing each list of rows to ``add``; nothing when there is no GPU or the CUDA
    kernels are not built."""
    if not torch.cuda.is_available() or kernels._C is None or not kernels._C.has_cuda():
        return
    reps = 10 if quick else 30
    add([bench_copy(reps)])
    add([bench_gemv(4096, 4096, 4, reps)])
    add([bench_gemv(11008, 4096, 4, reps)])
    add([bench_gemv(4096, 11008, 4, reps)])
    add([bench_gemv(11008, 4096, 4, reps, uneven=True)])
    if not quick:
        add([bench_gemv(4096, 4096, 3, reps)])
        add([bench_gemv(11008, 4096, 4, reps, m=4)])
    for m in ((512,) if quick else (512, 2048)):
        add([bench_gemm_aq(m, 4096, 4096, 8, reps)])
    if not quick:
        add([bench_gemm_aq(512, 11008, 4096, 8, reps)])
        add([bench_gemm_aq(512, 4096, 4096, 8, reps, uneven=True)])
        add([bench_gemm_aq(512, 4096, 4096, 4, reps)])
    add([bench_attention(1, 32, 128, 4096, 4, reps)])
    add([bench_attention(8, 32, 128, 4096, 4, reps)])
    if not quick:
        add([bench_attention(1, 32, 128, 16384, 4, reps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: list[dict] = []

    def add(new):
        for r in new:
            rows.append(r)
            print(format_row(r), flush=True)

    cuda_rows(args.quick, add)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
