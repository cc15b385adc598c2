"""Perplexity table of the README: FP, per-tensor (--no-reorder) and RPTQ at every preset, on the trained
dev models in ../shared/models with outlier channels injected (a function-preserving rescale, see
rptq_cli/outliers.py), WikiText-2 test text, calibration on PTB valid.

    .venv/bin/python benchmarks/ppl_table.py [--models opt-dev llama-dev] [--nsamples 128] [--json out.json]

Each row is one `rptq eval MODEL --task wikitext --data-path wiki.test.raw --config NAME [--no-reorder]
--calib-path ptb.valid.txt` on the injected model, run through the Python API so that the FP model, the
stats and the token windows are computed once.
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
    ap.add_argument("--rptq-only", action="store_true", help="Skip the per-tensor (--no-reorder) baseline.")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
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
        rows.append({"model": name, "config": "FP", "per_tensor": fp, "rptq": fp})
        print(f"{name} FP: {fp:.2f}", flush=True)
        for preset in args.presets:
            row = {"model": name, "config": build_config(preset, mode=args.mode).label,
                   "per_tensor": float("nan")}
            for reorder, key in ((False, "per_tensor"), (True, "rptq"))[args.rptq_only:]:
                start = time.perf_counter()
                quant = copy.deepcopy(model)
                quantize_model(quant, family, calib, build_config(preset, reorder=reorder, mode=args.mode),
                               stats=stats, seed=2, progress=False)
                row[key] = perplexity(quant, text, seqlen=seqlen, batch_size=4, progress=False)["ppl"]
                row[f"{key}_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(f"{name} {row['config']}: per-tensor {row['per_tensor']:.2f}  rptq {row['rptq']:.2f}", flush=True)
    print()
    print("| model | config | per-tensor (--no-reorder) | RPTQ | RPTQ vs FP |")
    print("|---|---|---|---|---|")
    fp_of = {r["model"]: r["rptq"] for r in rows if r["config"] == "FP"}
    for r in rows:
        delta = f"{100 * (r['rptq'] / fp_of[r['model']] - 1):+.1f}%"
        per_tensor = "—" if r["config"] == "FP" else f"{r['per_tensor']:.2f}"
        print(f"| {r['model']} | {r['config']} | {per_tensor} | {r['rptq']:.2f} | {delta} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
