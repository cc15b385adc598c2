"""``python -m rptq_cli.bench [--quick]``: the whole bench, as ``rptq bench`` runs it."""
import sys

from . import run_bench

run_bench(quick="--quick" in sys.argv[1:])
