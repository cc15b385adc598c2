"""What this process has used, for the time-and-memory lines of the CLI and the bench's memory columns.

Kept free of torch and rptq imports: the bench's baseline process imports it too, and must not pay for rptq's
modules in the peak it reports.
"""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries the parent's high-water
    mark across fork + exec, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
