"""Run an ``rptq`` command and log the resident memory at the edges of each quantize phase (stderr).

    python benchmarks/rss_probe.py quantize MODEL --config w4a16 ... -o OUT 2> probe.log

Each line: seconds since start, the phase edge, the current RSS (/proc/self/statm) and the peak so far
(ru_maxrss), in GiB: what ``rptq memory``'s phases (memory.quantize_phases) are held against.
"""
import functools
import os
import resource
import sys
import time

from rptq_cli import calibrate, cli, quantize
from rptq_cli.quant import gptq

T0 = time.time()
GiB = 2**30


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GiB


def log(tag: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # ru_maxrss is in KiB on Linux
    print(f"[probe {time.time() - T0:7.1f}s] {tag:32s} rss {rss():.2f} GiB  max {peak:.2f} GiB",
          file=sys.stderr, flush=True)


def wrap(owner, name: str, tag: str | None = None) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        log(f"before {tag or name}")
        out = fn(*args, **kwargs)
        log(f"after  {tag or name}")
        return out
    setattr(owner, name, inner)


if __name__ == "__main__":
    wrap(gptq.GPTQ, "quantize", "gptq")
    for name in ("forward", "materialize", "release"):
        wrap(calibrate.LayerRunner, name)
    wrap(quantize, "quantize_layer_weights")
    sys.argv = ["rptq", *sys.argv[1:]]
    try:
        cli.main()
    finally:
        log("end")
