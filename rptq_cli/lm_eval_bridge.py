"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness 0.4, on any model rptq holds in memory.

lm-eval's own HF backend (:class:`lm_eval.models.huggingface.HFLM`) wraps our model object as it is: an FP
model, one quantized in memory (simulated), or a packed checkpoint running on rptq's kernels. So the numbers
are lm-eval's, computed the way `lm_eval --model hf` computes them, only on the model rptq built.
lm-eval is an optional extra; it is imported only here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import RptqError
from .loading import input_device, quiet_logger

# metrics written per task; lm-eval reports them as "acc,none" (metric, filter)
METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match")


def _lm_eval():
    """(simple_evaluate, HFLM, TaskManager), or a one-line error when lm-eval is missing."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RptqError("--lm-eval-task needs lm-evaluation-harness, which is not installed: run "
                        "`pip install lm-eval` (or `make install`)") from None
    return simple_evaluate, HFLM, TaskManager


def task_manager(tasks: list[str], include: str | None = None):
    """A TaskManager that knows ``tasks``; only the include directory is indexed when it holds them all
    (indexing lm-eval's thousands of built-in tasks takes seconds)."""
    _, _, TaskManager = _lm_eval()
    if include is not None:
        if not Path(include).is_dir():
            raise RptqError(f"--lm-eval-include {include} is not a directory; pass the folder of your task YAMLs")
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else "; pass --lm-eval-include DIR for your own task YAMLs"
        raise RptqError(f"lm-eval task(s) {', '.join(unknown)} not found among lm-eval's tasks{where}")
    return manager


def task_metrics(results: dict, n_samples: dict) -> dict:
    """lm-eval's results → {task: {metric: value, ..., "samples": n}} with the numeric metrics we keep, and
    the analytic standard error of accuracies (lm-eval's own, sqrt(p(1-p)/(n-1)), without its bootstrap)."""
    out = {}
    for task, r in results.items():
        row = {}
        for key, value in r.items():
            metric, _, _ = key.partition(",")
            if metric in METRICS and isinstance(value, (int, float)):
                row[metric] = float(value)
        n = (n_samples.get(task) or {}).get("effective")
        if n:
            row["samples"] = int(n)
            for metric in ("acc", "acc_norm"):
                if metric in row and n > 1:
                    row[f"{metric}_stderr"] = math.sqrt(row[metric] * (1 - row[metric]) / (n - 1))
        out[task] = row
    return out


def evaluate_tasks(model, tokenizer, tasks: list[str], *, include: str | None = None, manager=None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (a transformers model object, on its device) → :func:`task_metrics`.

    ``manager``: a :func:`task_manager` already made for these tasks (else one is made from ``include``).
    The defaults are lm-eval's (seeds, prompts); stderr bootstrap is off (it forks a process pool).
    """
    simple_evaluate, HFLM, _ = _lm_eval()
    manager = manager or task_manager(list(tasks), include)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with quiet_logger("lm_eval"):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # HFLM puts inputs on a model object's first parameter's device: the meta device when accelerate offloaded
        # the embeddings (--device-map); the main device of the map is where inputs belong
        lm._device = input_device(model)
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=0, log_samples=False)
    metrics = task_metrics(out["results"], out.get("n-samples") or {})
    for task, row in metrics.items():
        row["num_fewshot"] = (out.get("n-shot") or {}).get(task, num_fewshot or 0)
    return metrics


def format_metrics(row: dict) -> str:
    """One line: ``acc 0.612 ± 0.034  acc_norm 0.598 ± 0.035  (200 docs, 0-shot)``."""
    parts = []
    for metric in METRICS:
        if metric in row:
            err = row.get(f"{metric}_stderr")
            parts.append(f"{metric} {row[metric]:.4g}" + (f" ± {err:.3f}" if err is not None else ""))
    return "  ".join(parts) + f"  ({row.get('samples', '?')} docs, {row.get('num_fewshot', 0)}-shot)"
