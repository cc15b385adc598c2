"""GPU rows of ``rptq bench``: the CUDA kernels against cuBLAS / SDPA in fp16, on this machine's GPU.

Each row has the CPU bench's format (``op, shape, backend, ms, baseline, baseline_ms, speedup`` and
``gbps`` or ``gops``), plus ``device``. Timing: every candidate is captured in a CUDA graph as a run of
calls that rotate through enough copies of the inputs to overflow the L2 cache (so weights and KV come
from HBM, as in a real model), warmed up, replayed many times between CUDA events; the row gives the
median time per call. Ours and the baseline are replayed alternately, so clock drift hits both alike.
The compiled ops are called through ``torch.ops.rptq`` directly: the public wrappers validate their
inputs on the host (which synchronizes), which a model does once at load time, not per call.

    python -m rptq_cli.bench_cuda [--quick] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from rptq_cli import kernels  # noqa: F401  (defines the rptq:: ops and loads the extension)
from rptq_cli.bench import cluster_sizes
from rptq_cli.quant import grid
from rptq_cli.quant.pack import pack_rows

_CALLS_PER_GRAPH = 20


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def _n_copies(bytes_per_copy: int) -> int:
    """Copies of the inputs so that one pass over them is ≥ 3 L2 sizes (capped)."""
    return max(1, min(64, -(-3 * _l2_bytes() // max(1, bytes_per_copy))))


def _graph(calls: list) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up outside the capture: kernel attributes, cuBLAS handles, allocations
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(_CALLS_PER_GRAPH):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    return g


def _time_pair(ours: list, base: list | None, repeats: int) -> tuple[float, float | None]:
    """Median ms per call of ``ours`` and ``base`` (lists of closures over input copies)."""
    g_ours = _graph(ours)
    g_base = _graph(base) if base else None
    for _ in range(3):
        g_ours.replay()
        if g_base is not None:
            g_base.replay()
    t_ours, t_base = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for g, acc in ((g_ours, t_ours), (g_base, t_base)):
            if g is None:
                continue
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            acc.append(start.elapsed_time(end) / _CALLS_PER_GRAPH)
    return statistics.median(t_ours), (statistics.median(t_base) if t_base else None)


def _row(op, shape, ms, baseline, baseline_ms, **extra) -> dict:
    row = {"op": op, "shape": shape, "backend": "cuda", "ms": round(ms, 5), "baseline": baseline,
           "baseline_ms": None if baseline_ms is None else round(baseline_ms, 5),
           "speedup": None if baseline_ms is None else round(baseline_ms / ms, 3)}
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    row["device"] = torch.cuda.get_device_name()
    return row


def _qlinear(n, k, bits, gs, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, gs.numel(), generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, gs.numel()), generator=g, dtype=torch.uint8)
    return pack_rows(codes, bits).to(device), scales.to(device), zeros.to(device), gs.to(device)


# ---------------------------------------------------------------------------------------------------
def bench_copy(reps: int) -> dict:
    n = 1 << 28  # 512 MiB fp16
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms, _ = _time_pair([lambda: b.copy_(a)], None, reps)
    return _row("d2d_copy", f"{n * 2 >> 20}MiB fp16", ms, None, None, gbps=2 * n * 2 / ms / 1e6)


def bench_gemv(n, k, bits, reps, groups=32, uneven=False, m=1) -> dict:
    gs = cluster_sizes(k, groups, uneven)
    w = _qlinear(n, k, bits, gs)
    wbytes = w[0].numel() + w[1].numel() * 2 + w[2].numel()
    ours_in = [w] + [tuple(t.clone() for t in w) for _ in range(_n_copies(wbytes) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    fp = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(_n_copies(n * k * 2))]
    ours = [lambda t=t: torch.ops.rptq.linear_a16(x, t[0], t[1], t[2], t[3], bits, None) for t in ours_in]
    base = [lambda wf=wf: F.linear(x, wf) for wf in fp]
    ms, bms = _time_pair(ours, base, reps)
    shape = f"{m}x{k} @ {k}x{n} g={'uneven' if uneven else k // groups}x{groups}"
    return _row(f"w{bits}a16_gemv", shape, ms, "cublas_fp16", bms, gbps=wbytes / ms / 1e6)


def bench_gemm_aq(m, n, k, act_bits, reps, groups=32, uneven=False) -> dict:
    gs = cluster_sizes(k, groups, uneven)
    w = _qlinear(n, k, 4, gs)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    flat_lo, flat_hi = grid.group_min_max(x.float().amin(0), x.float().amax(0), gs)
    a_scale, a_zero = grid.affine_params(flat_lo, flat_hi, act_bits)
    wf = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    ours = [lambda: torch.ops.rptq.linear_aq(x, w[0], w[1], w[2], w[3], 4, a_scale, a_zero, act_bits, None)]
    base = [lambda: F.linear(x, wf)]
    ms, bms = _time_pair(ours, base, reps)
    shape = f"{m}x{k} @ {k}x{n} g={'uneven' if uneven else k // groups}x{groups}"
    return _row(f"w4a{act_bits}_gemm", shape, ms, "cublas_fp16", bms, gops=2 * m * n * k / ms / 1e6)


def bench_attention(b, heads, d, ctx, bits, reps) -> dict:
    row_bytes = kernels.kv_row_bytes(d, bits)
    kv_bytes = 2 * b * heads * ctx * row_bytes
    nq = _n_copies(kv_bytes)
    packed = [tuple(torch.randint(0, 256, (b, heads, ctx, row_bytes), dtype=torch.uint8, device="cuda")
                    for _ in range(2)) for _ in range(nq)]
    ks = torch.rand(heads, d, device="cuda") * 0.1 + 0.01
    kz = torch.randint(0, 1 << bits, (heads, d), dtype=torch.int32, device="cuda")
    q = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.float16)
    scaling = d ** -0.5
    ours = [lambda kv=kv: torch.ops.rptq.decode_attention(q, kv[0], kv[1], ks, kz, ks, kz, bits, ctx, scaling, 16)
            for kv in packed]
    fp_bytes = 2 * b * heads * ctx * d * 2
    fp = [tuple(torch.randn(b, heads, ctx, d, device="cuda", dtype=torch.float16) for _ in range(2))
          for _ in range(_n_copies(fp_bytes))]
    base = [lambda kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], scale=scaling) for kv in fp]
    ms, bms = _time_pair(ours, base, reps)
    return _row(f"kv{bits}_decode_attention", f"B={b} H={heads} D={d} ctx={ctx}", ms, "sdpa_fp16", bms,
                gbps=kv_bytes / ms / 1e6)


def run_cuda_bench(quick: bool = False) -> list[dict]:
    """The GPU rows; [] when there is no GPU or the CUDA kernels are not built."""
    if not torch.cuda.is_available() or kernels._C is None or not kernels._C.has_cuda():
        return []
    reps = 10 if quick else 30
    rows = [bench_copy(reps)]
    rows.append(bench_gemv(4096, 4096, 4, reps))
    rows.append(bench_gemv(11008, 4096, 4, reps))
    rows.append(bench_gemv(4096, 11008, 4, reps))
    rows.append(bench_gemv(11008, 4096, 4, reps, uneven=True))
    if not quick:
        rows.append(bench_gemv(4096, 4096, 3, reps))
        rows.append(bench_gemv(11008, 4096, 4, reps, m=4))
    for m in ((512,) if quick else (512, 2048)):
        rows.append(bench_gemm_aq(m, 4096, 4096, 8, reps))
    if not quick:
        rows.append(bench_gemm_aq(512, 11008, 4096, 8, reps))
        rows.append(bench_gemm_aq(512, 4096, 4096, 8, reps, uneven=True))
        rows.append(bench_gemm_aq(512, 4096, 4096, 4, reps))
    rows.append(bench_attention(1, 32, 128, 4096, 4, reps))
    rows.append(bench_attention(8, 32, 128, 4096, 4, reps))
    if not quick:
        rows.append(bench_attention(1, 32, 128, 16384, 4, reps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = run_cuda_bench(args.quick)
    for r in rows:
        extra = f"  {r['gbps']:.0f} GB/s" if "gbps" in r else (f"  {r['gops'] / 1e3:.0f} TOPS" if "gops" in r else "")
        base = f"  vs {r['baseline']} {r['baseline_ms']:.4f} ms  x{r['speedup']:.2f}" if r["baseline"] else ""
        print(f"{r['op']:<26} {r['shape']:<40} {r['ms']:.4f} ms{base}{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
