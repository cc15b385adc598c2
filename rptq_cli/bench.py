"""``rptq bench``: our kernels against torch baselines, on this machine, in one run.

First the read bandwidth (a large streaming reduction: the ceiling of every memory-bound op), then for
each op our time and the baseline's on the same shapes: warm-up, then repeats in which ours and the
baseline alternate (so background load hits both alike), and the median of each. One row per
(op, baseline) pair::

    {"op": "w4a16_gemv", "shape": "1x4096 @ 4096x4096", "backend": "cpu-avx512vnni", "ms": 0.61,
     "baseline": "torch_bf16", "baseline_ms": 2.9, "speedup": 4.7, "gbps": 14.1, "bw_frac": 0.82, "threads": 2}

``gbps`` is the bytes our op must read (packed weights, scales, zeros; the packed KV cache) per second,
and ``bw_frac`` that over the measured read bandwidth; compute-bound ops give ``gops`` (2·M·N·K / s).

The end-to-end decode row belongs to the model code: it registers a producer with
:func:`register_row_producer` (or passes ``extra_rows`` to :func:`run_bench`); a producer is called as
``producer(quick=..., threads=...)`` and returns a list of rows of the same form.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from rptq_cli import kernels
from rptq_cli.quant import grid
from rptq_cli.quant.pack import pack_rows

RowProducer = Callable[..., Iterable[dict]]
_PRODUCERS: list[RowProducer] = []


def register_row_producer(producer: RowProducer) -> None:
    """Add rows (e.g. the end-to-end decode row) to every ``rptq bench`` run."""
    _PRODUCERS.append(producer)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def _time_pair(ours: Callable, base: Callable | None, repeats: int, warmup: int = 2):
    """Median ms of ``ours(i)`` and ``base(i)`` (i = call index, to rotate through input copies), the
    calls alternating so that background load hits both alike."""
    for i in range(warmup):
        ours(i)
        if base is not None:
            base(i)
    t_ours, t_base = [], []
    for i in range(warmup, warmup + repeats):
        t = time.perf_counter()
        ours(i)
        t_ours.append(time.perf_counter() - t)
        if base is not None:
            t = time.perf_counter()
            base(i)
            t_base.append(time.perf_counter() - t)
    med = lambda xs: statistics.median(xs) * 1e3 if xs else None  # noqa: E731
    return med(t_ours), med(t_base)


def _last_level_cache_bytes() -> int:
    try:
        sizes = []
        for idx in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            text = open(idx).read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        return max(sizes) if sizes else 64 * 2**20
    except (OSError, ValueError):
        return 64 * 2**20


#: Memory-bound ops rotate through copies of their inputs totalling this many bytes, so that every call
#: reads from DRAM as a model's decode step does (a lone 8 MB weight would sit in the last-level cache).
ROTATE_BYTES = int(min(max(2 * _last_level_cache_bytes(), 256 * 2**20), 1024 * 2**20))


def _copies(tensors: tuple, rotate: bool = True) -> list[tuple]:
    """Enough clones of ``tensors`` to exceed ROTATE_BYTES (just the originals when not rotating)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    n = max(1, -(-ROTATE_BYTES // nbytes)) if rotate else 1
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def read_bandwidth(quick: bool) -> dict:
    """GB/s of streaming reads over a buffer larger than the last-level cache: the best of a float32 sum
    and a float32 GEMV over the same buffer (the strictest ceiling to compare memory-bound ops with)."""
    n = max(ROTATE_BYTES, 512 * 2**20) // 4 // 4096 * 4096
    buf = torch.ones(n)
    mat = buf.view(-1, 4096)
    vec = torch.ones(1, 4096)
    reps = 5 if quick else 10
    ms_sum, ms_gemv = _time_pair(lambda i: buf.sum(), lambda i: F.linear(vec, mat), repeats=reps, warmup=1)
    ms = min(ms_sum, ms_gemv)
    gbps = n * 4 / ms / 1e6
    how = "sum" if ms_sum <= ms_gemv else "gemv"
    return {"op": "read_bandwidth", "shape": f"{n * 4 // 2**20}MiB fp32 {how}", "backend": "torch", "ms": ms,
            "baseline": None, "baseline_ms": None, "speedup": None, "gbps": gbps}


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def cluster_sizes(k: int, groups: int, uneven: bool, seed: int = 0) -> torch.Tensor:
    """Group sizes summing to k: equal (g = k / groups), or uneven like the KMeans clusters of a real layer."""
    if not uneven:
        gs = torch.full((groups,), k // groups, dtype=torch.int32)
        gs[: k % groups] += 1
        return gs
    # KMeans-like uneven clusters: random positive sizes summing to k
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(groups, generator=g) + 0.2
    gs = (w / w.sum() * (k - groups)).floor().to(torch.int32) + 1
    gs[0] += k - int(gs.sum())
    return gs


def _qlinear(n: int, k: int, bits: int, groups: int, seed: int = 0, uneven: bool = False):
    g = torch.Generator().manual_seed(seed)
    gs = cluster_sizes(k, groups, uneven, seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    # stored as fp16, handed to the CPU kernels as float32 (QuantLinear.kernel_scales)
    scales = (torch.rand(n, groups, generator=g) * 0.01 + 0.001).half().float()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.uint8)
    qweight = pack_rows(codes, bits)
    return qweight, scales, zeros, gs


def _weight_bytes(qweight, scales, zeros) -> int:
    return qweight.nbytes + scales.nbytes + zeros.nbytes


def _row(op, shape, ms, baseline, baseline_ms, **extra) -> dict:
    row = {"op": op, "shape": shape, "backend": kernels.backend(), "ms": round(ms, 4), "baseline": baseline,
           "baseline_ms": None if baseline_ms is None else round(baseline_ms, 4),
           "speedup": None if baseline_ms is None else round(baseline_ms / ms, 3)}
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    return row


# --------------------------------------------------------------------------------------------------
# op benches
# --------------------------------------------------------------------------------------------------
def bench_gemv(n, k, bits, reps, bw, groups=32, baselines=("torch_fp32", "torch_bf16"), uneven=False) -> list[dict]:
    qlin = _copies(_qlinear(n, k, bits, groups, uneven=uneven))
    x = torch.randn(1, k)
    nbytes = _weight_bytes(*qlin[0][:3])
    gs = qlin[0][3]
    ours = lambda i: kernels.linear_a16(x, *qlin[i % len(qlin)][:3], gs, bits)  # noqa: E731
    rows = []
    for name in baselines:
        dtype = torch.float32 if name == "torch_fp32" else torch.bfloat16
        ws = _copies(((torch.randn(n, k) * 0.02).to(dtype),))
        xb = x.to(dtype)
        ms, bms = _time_pair(ours, lambda i: F.linear(xb, ws[i % len(ws)][0]), reps)
        del ws
        gbps = nbytes / ms / 1e6
        shape = f"1x{k} @ {k}x{n}" + (f" {groups} clusters" if uneven else "")
        rows.append(_row(f"w{bits}a16_gemv", shape, ms, name, bms, gbps=gbps, bw_frac=gbps / bw))
    return rows


def bench_gemm_a16(m, n, k, reps) -> list[dict]:
    qweight, scales, zeros, gs = _qlinear(n, k, 4, 32)
    x = torch.randn(m, k)
    w32 = torch.randn(n, k) * 0.02
    ms, bms = _time_pair(lambda i: kernels.linear_a16(x, qweight, scales, zeros, gs, 4), lambda i: F.linear(x, w32), reps)
    return [_row("w4a16_gemm", f"{m}x{k} @ {k}x{n}", ms, "torch_fp32", bms, gops=2 * m * n * k / ms / 1e6)]


def bench_gemm_aq(m, n, k, act_bits, reps) -> list[dict]:
    qweight, scales, zeros, gs = _qlinear(n, k, 4, 32)
    x = torch.randn(m, k)
    s, z = grid.affine_params(torch.full((32,), -3.0), torch.full((32,), 3.0), act_bits)
    ours = lambda i: kernels.linear_aq(x, qweight, scales, zeros, gs, 4, s, z, act_bits)  # noqa: E731
    w32 = torch.randn(n, k) * 0.02
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    gops = lambda ms: 2 * m * n * k / ms / 1e6  # noqa: E731
    rows = []
    for name, base in (("torch_fp32", lambda i: F.linear(x, w32)), ("torch_int_mm", lambda i: torch._int_mm(a8, b8))):
        ms, bms = _time_pair(ours, base, reps)
        rows.append(_row(f"w4a{act_bits}_gemm", f"{m}x{k} @ {k}x{n}", ms, name, bms, gops=gops(ms)))
    return rows


def bench_attention(heads, d, ctx, bits, reps, bw) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, ctx, d, generator=g)
    v = torch.randn(1, heads, ctx, d, generator=g)
    q = torch.randn(1, heads, 1, d, generator=g)
    scale, zero = grid.affine_params(torch.full((heads, d), -3.0), torch.full((heads, d), 3.0), bits)
    kv = _copies((kernels.kv_pack(k, scale, zero, bits), kernels.kv_pack(v, scale, zero, bits)))
    nbytes = kv[0][0].numel() + kv[0][1].numel()

    def ours(i):
        kp, vp = kv[i % len(kv)]
        return kernels.decode_attention(q, kp, vp, scale, zero, scale, zero, bits, ctx, d ** -0.5)

    rows = []
    for name, dtype in (("sdpa_fp32", torch.float32), ("sdpa_bf16", torch.bfloat16)):
        fkv = _copies((k.to(dtype), v.to(dtype)))
        qd = q.to(dtype)
        ms, bms = _time_pair(ours, lambda i: F.scaled_dot_product_attention(qd, *fkv[i % len(fkv)]), reps)
        del fkv
        gbps = nbytes / ms / 1e6
        rows.append(_row(f"kv{bits}_decode_attention", f"{heads}x{d} ctx {ctx}", ms, name, bms, gbps=gbps,
                         bw_frac=gbps / bw))
    return rows


def bench_kv_append(heads, d, bits, reps) -> list[dict]:
    x = torch.randn(1, heads, 1, d)
    scale, zero = grid.affine_params(torch.full((heads, d), -3.0), torch.full((heads, d), 3.0), bits)
    cache = torch.zeros(1, heads, 64, kernels.kv_row_bytes(d, bits), dtype=torch.uint8)
    fp_cache = torch.zeros(1, heads, 64, d)
    ms, bms = _time_pair(lambda i: kernels.kv_append(cache, x, scale, zero, bits, 5),
                         lambda i: fp_cache[:, :, 5:6].copy_(x), reps)
    return [_row(f"kv{bits}_append", f"{heads}x{d} 1 token", ms, "torch_fp32_copy", bms)]


def bench_norm(rows_, c, rms, reps) -> list[dict]:
    x = torch.randn(rows_, c)
    perm = torch.randperm(c)
    w, b = torch.randn(c), torch.randn(c)
    bias = None if rms else b

    def base(i):
        xp = x.index_select(-1, perm)
        if rms:
            return xp * torch.rsqrt(xp.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        return F.layer_norm(xp, (c,), w, b, 1e-5)

    ms, bms = _time_pair(lambda i: kernels.reorder_norm(x, perm, w, bias, 1e-5, rms), base, reps)
    return [_row("reorder_rmsnorm" if rms else "reorder_layernorm", f"{rows_}x{c}", ms, "torch_fp32", bms)]


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
_COLUMNS = ("op", "shape", "backend", "ms", "baseline", "baseline_ms", "speedup", "gbps", "gops", "bw_frac")


def _machine_busy() -> str | None:
    """A sentence when other processes keep the CPUs busy (1-minute load average ≥ the CPU count)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    return f"load average {load:.1f} on {cpus} CPUs" if load >= cpus else None


def format_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def run_bench(quick: bool = False, threads: int | None = None, json_path: str | None = None,
              extra_rows: RowProducer | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Measure every op against its baseline; print the table; write the rows as JSON to ``json_path``."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    nthreads = torch.get_num_threads()
    echo(f"rptq bench: backend {kernels.backend()}, {nthreads} threads, torch {torch.__version__}"
         f"{' (quick)' if quick else ''}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    busy = _machine_busy()
    if busy:
        echo(f"warning: {busy}; timings are noisy (ours and the baseline alternate, so ratios are fairer "
             f"than times). On a shared machine OMP_WAIT_POLICY=PASSIVE avoids threads spinning against each other.")
    reps = 7 if quick else 21
    rows: list[dict] = []

    def add(new):
        for r in new:
            r.setdefault("threads", nthreads)
            rows.append(r)
            echo(f"  {r['op']:<24} {r['shape']:<22} {r['ms']:.3f} ms"
                 + (f"  vs {r['baseline']} {r['baseline_ms']:.3f} ms  ×{r['speedup']:.2f}" if r.get("baseline") else ""))

    bw_row = read_bandwidth(quick)
    add([bw_row])
    bw = bw_row["gbps"]
    add(bench_gemv(4096, 4096, 4, reps, bw))
    add(bench_gemv(11008, 4096, 4, reps, bw))
    add(bench_gemv(4096, 4096, 3, reps, bw, baselines=("torch_bf16",)))
    # RPTQ's default weight groups are the input's KMeans clusters: uneven, 32 over the hidden size (R1, R4)
    # and 4 per head (R3, o_proj's input)
    add(bench_gemv(4096, 4096, 4, reps, bw, groups=32, baselines=("torch_bf16",), uneven=True))
    add(bench_gemv(4096, 4096, 4, reps, bw, groups=128, baselines=("torch_bf16",), uneven=True))
    if not quick:
        add(bench_gemv(4096, 11008, 4, reps, bw))
    add(bench_gemm_aq(512, 4096, 4096, 8, max(3, reps // 3)))
    add(bench_gemm_aq(512, 4096, 4096, 4, max(3, reps // 3)))
    add(bench_gemm_a16(128 if quick else 512, 4096, 4096, max(3, reps // 3)))
    add(bench_attention(32, 128, 4096, 4, reps, bw))
    if not quick:
        add(bench_attention(32, 128, 4096, 3, reps, bw)[:1])
    add(bench_kv_append(32, 128, 4, reps))
    add(bench_norm(1, 4096, False, reps))
    add(bench_norm(512, 4096, True, max(3, reps // 3)))
    # ---- end-to-end row(s): produced by the model code (hook) -------------------------------------
    for producer in ([extra_rows] if extra_rows else []) + _PRODUCERS:
        add(list(producer(quick=quick, threads=nthreads)))

    echo("")
    echo(format_table(rows))
    if json_path:
        tmp = f"{json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, json_path)
        echo(f"wrote {json_path}")
    return rows


if __name__ == "__main__":  # python -m rptq_cli.bench [--quick]
    import sys

    run_bench(quick="--quick" in sys.argv)
