"""Rows of ``rptq bench`` and how they are printed: one line per row as it is measured, then the table."""
from __future__ import annotations

COLUMNS = ("op", "shape", "backend", "device", "ms", "baseline", "baseline_ms", "speedup", "gbps", "gops", "bw_frac")


def row(op: str, shape: str, backend: str, ms: float, baseline: str | None, baseline_ms: float | None,
        **extra) -> dict:
    """One row: our ``ms`` against ``baseline``'s on the same shapes; ``speedup`` = baseline_ms / ms."""
    result = {"op": op, "shape": shape, "backend": backend, "ms": round(ms, 5), "baseline": baseline,
              "baseline_ms": None if baseline_ms is None else round(baseline_ms, 5),
              "speedup": None if baseline_ms is None else round(baseline_ms / ms, 3)}
    result.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    return result


def format_row(r: dict) -> str:
    """The progress line of one row: time, the baseline's and the speedup, bandwidth or throughput."""
    rate = f"  {r['gbps']:.1f} GB/s" if "gbps" in r else (f"  {r['gops']:.1f} GOP/s" if "gops" in r else "")
    base = f"  vs {r['baseline']} {r['baseline_ms']:.4f} ms  x{r['speedup']:.2f}" if r.get("baseline") else ""
    return f"  {r['op']:<26} {r['shape']:<36} {r['ms']:.4f} ms{base}{rate}"


def format_table(rows: list[dict]) -> str:
    """Every row, with the columns of :data:`COLUMNS` that any row has ('-' where a row has none)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)
