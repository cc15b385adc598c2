"""Perplexity table of the README: FP, the per-tensor baseline (--no-reorder) and RPTQ at every preset, on the
trained dev models in ../shared/models with outlier channels injected (a function-preserving rescale, see
rptq_cli/outliers.py), WikiText-2 test text, calibration on PTB valid.

    .venv/bin/python benchmarks/ppl_table.py [--models opt-dev llama-dev] [--nsamples 32] [--weight-groups 32]
                                             [--presets w4a8 ...] [--rptq-only] [--json out.json]

Three quantizations per preset, so that the table isolates what reordering buys:

- ``per_tensor``: ``--no-reorder --weight-groups G``: one activation group per tensor;
- ``rptq_same_groups``: ``--weight-groups G``: the reordered activation clusters, the same weight groups as
  ``per_tensor`` (``--no-reorder`` alone would also change the weights to one group per row, since a weight's
  default groups are its input's clusters);
- ``rptq``: the preset as shipped (weight groups = the input's clusters).

``--rptq-only`` runs the last one alone. Each is one `rptq eval MODEL --task wikitext --data-path wiki.test.raw
--config NAME [flags] --calib-path ptb.valid.txt` on the injected model, run through the Python API so that the FP
model, the stats and the token windows are computed once.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from rptq_cli.calibrate import LayerRunner, collect_stats
from rptq_cli.stats_file import StatsFile
from rptq_cli.config import build_config
from rptq_cli.data import calibration_windows, eval_tokens
from rptq_cli.evaluate import perplexity
from rptq_cli.loading import default_seqlen, load_model
from rptq_cli.outliers import inject_outliers
from rptq_cli.quantize import quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRESETS = ["w4a16", "w4a8", "w4a4", "w4a4-strict", "w4a4kv", "w4a3kv", "w3a3kv"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["opt-dev", "llama-dev"])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mode", default=None, help="Activation mode for every preset (default: the preset's).")
    ap.add_argument("--rptq-only", action="store_true", help="Only the preset as shipped (no baseline).")
    ap.add_argument("--weight-groups", type=int, default=32,
                    help="Weight group size G of the per-tensor baseline and of the RPTQ row beside it [32].")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    g = args.weight_groups
    runs = {"per_tensor": dict(reorder=False, weight_groups=g), "rptq_same_groups": dict(reorder=True, weight_groups=g),
            "rptq": dict(reorder=True)}
    if args.rptq_only:
        runs = {"rptq": runs["rptq"]}
    rows = []
    for name in args.models:
        model, tokenizer, family = load_model(str(args.shared / "models" / name), torch.float32)
        inject_outliers(model, family, channels=4, low=20, high=60, seed=0)
        seqlen = default_seqlen(model.config)
        text = eval_tokens("wikitext", tokenizer, seqlen=seqlen,
                           data_path=str(args.shared / "data/wikitext-2-raw/wiki.test.raw"))
        calib, _ = calibration_windows(tokenizer, dataset=None, path=str(args.shared / "data/ptb/ptb.valid.txt"),
                                       nsamples=args.nsamples, seqlen=seqlen, seed=2)
        stats = StatsFile(collect_stats(LayerRunner(copy.deepcopy(model), family, calib, "cpu"), progress=False))
        fp = perplexity(model, text, seqlen=seqlen, batch_size=4, progress=False)["ppl"]
        rows.append({"model": name, "config": "FP", **{key: fp for key in runs}})
        print(f"{name} FP: {fp:.2f}", flush=True)
        for preset in args.presets:
            row = {"model": name, "config": build_config(preset, mode=args.mode).label}
            for key, flags in runs.items():
                start = time.perf_counter()
                quant = copy.deepcopy(model)
                quantize_model(quant, family, calib, build_config(preset, mode=args.mode, **flags), stats=stats, seed=2,
                               progress=False)
                row[key] = perplexity(quant, text, seqlen=seqlen, batch_size=4, progress=False)["ppl"]
                row[f"{key}_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(f"{name} {row['config']}: " + "  ".join(f"{key} {row[key]:.2f}" for key in runs), flush=True)
    print()
    headers = {"per_tensor": f"per-tensor (--no-reorder), g{g}", "rptq_same_groups": f"RPTQ, g{g}",
               "rptq": "RPTQ (cluster weight groups)"}
    print("| model | config | " + " | ".join(headers[key] for key in runs) + " | RPTQ vs FP |")
    print("|---|---|" + "---|" * len(runs) + "---|")
    fp_of = {r["model"]: r["rptq"] for r in rows if r["config"] == "FP"}
    for r in rows:
        delta = f"{100 * (r['rptq'] / fp_of[r['model']] - 1):+.1f}%"
        cells = ["—" if r["config"] == "FP" and key != "rptq" else f"{r[key]:.2f}" for key in runs]
        print(f"| {r['model']} | {r['config']} | " + " | ".join(cells) + f" | {delta} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
