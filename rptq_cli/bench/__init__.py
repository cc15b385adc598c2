"""``rptq bench``: our kernels against torch baselines, on this machine, in one run. Lab code: the product
(everything outside this package) never imports it.

- :mod:`.timing`: the one way every op row is timed (ours and its baseline: same warm-up, repetitions and
  rotation through copies of the inputs; CPU by ``perf_counter``, GPU by CUDA graphs and events);
- :mod:`.cpu`, :mod:`.cuda`: the op rows, one per (op, baseline) measured; ``python -m rptq_cli.bench.cuda``
  runs the GPU rows alone (scripts/gpu_check.sh);
- :mod:`.e2e`: the end-to-end decode rows (W4A16, W4A4KV, each also with an 8-bit head; a synthetic Llama, and a
  real model with ``--e2e-model``), each side loaded and timed the same way in its own process;
- :mod:`.table`: the row format and the printout.

:func:`run_bench` prints and returns every row it measures (``python -m rptq_cli.bench [--quick]``).
"""
from __future__ import annotations

import os
from typing import Callable

from .table import format_row, format_table


def _machine_busy() -> str | None:
    """A sentence when other processes keep the CPUs busy (1-minute load average ≥ the CPU count)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    return f"load average {load:.1f} on {cpus} CPUs" if load >= cpus else None


def run_bench(quick: bool = False, threads: int | None = None, json_path: str | None = None,
              echo: Callable[[str], None] = print, e2e_model: str | None = None) -> list[dict]:
    """Measure every op against each of its baselines on the CPU (and the GPU when there is one with the CUDA
    kernels built), then the end-to-end decode rows, of the model directory ``e2e_model`` too when given; print
    each row as it comes and the table of all of them; write them as JSON to ``json_path``."""
    import json

    import torch

    from .. import kernels
    from .cpu import cpu_rows
    from .cuda import cuda_rows
    from .e2e import decode_rows, model_decode_rows

    if threads is not None:
        torch.set_num_threads(int(threads))
    nthreads = torch.get_num_threads()
    echo(f"rptq bench: backend {kernels.backend()}, {nthreads} threads, torch {torch.__version__}"
         f"{' (quick)' if quick else ''}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
         f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    busy = _machine_busy()
    if busy:
        echo(f"warning: {busy}; timings are noisy (ours and the baseline alternate, so ratios are fairer "
             f"than times). rptq limits OpenMP's spin-wait (GOMP_SPINCOUNT=10000) unless told otherwise.")
    rows: list[dict] = []

    def add(new):
        for r in new:
            r.setdefault("threads", nthreads)
            rows.append(r)
            echo(format_row(r))

    cpu_rows(quick, add)
    add(decode_rows(quick, nthreads))
    if e2e_model:
        add(model_decode_rows(e2e_model, quick, nthreads))
    cuda_rows(quick, add)
    if torch.cuda.is_available():
        add(decode_rows(quick, nthreads, device="cuda"))

    echo("")
    echo(format_table(rows))
    if json_path:
        tmp = f"{json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, json_path)
        echo(f"wrote {json_path}")
    return rows
