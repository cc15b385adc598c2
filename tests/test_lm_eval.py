"""`rptq eval --lm-eval-task`: lm-evaluation-harness on rptq's model objects equals lm-eval's own HF backend.

The two tasks under tests/data/lm_eval (multiple choice, last-word prediction) read local json files whose
paths are relative to the repository root, as lm-eval reads data_files relative to the working directory.
"""
import json
from pathlib import Path

import pytest

from cli_run import assert_user_error, run

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = "tests/data/lm_eval"
TASKS = ("rptq_mc", "rptq_last_word")
LM_EVAL = [arg for task in TASKS for arg in ("--lm-eval-task", task)] + ["--lm-eval-include", INCLUDE]


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_fp_model_equals_lm_eval_hf_backend(tiny_opt_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    out = tmp_path / "res.json"
    result = run("eval", tiny_opt_dir, *LM_EVAL, "--json", out)
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())["results"]
    assert set(ours) == set(TASKS)  # only --lm-eval-task given: no perplexity task runs
    assert "rptq_mc: acc" in result.output

    reference = simple_evaluate(model="hf", model_args=f"pretrained={tiny_opt_dir},dtype=float32,device=cpu",
                                tasks=list(TASKS), task_manager=TaskManager(include_path=INCLUDE,
                                                                            include_defaults=False),
                                bootstrap_iters=0, log_samples=False, batch_size=1)["results"]
    for task, metrics in (("rptq_mc", ("acc", "acc_norm")), ("rptq_last_word", ("acc", "perplexity"))):
        assert ours[task]["samples"] == 20 and ours[task]["num_fewshot"] == 0
        for metric in metrics:
            assert ours[task][metric] == pytest.approx(reference[task][f"{metric},none"], rel=1e-9), (task, metric)
    assert 0 <= ours["rptq_mc"]["acc"] <= 1 and ours["rptq_last_word"]["perplexity"] > 1


def test_packed_checkpoint(tiny_opt_dir, corpus_file, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "res.json"
    result = run("quantize", tiny_opt_dir, "--config", "w4a8", "--calib-path", corpus_file, "--nsamples", 4,
                 "--seqlen", 32, "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8", "-o", ckpt)
    assert result.exit_code == 0, result.output
    result = run("eval", ckpt, *LM_EVAL, "--limit", 5, "--num-fewshot", 1, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["quantization"]["label"] == "W4A8-token"
    for task in TASKS:
        r = data["results"][task]
        assert r["samples"] == 5 and r["num_fewshot"] == 1 and 0 <= r["acc"] <= 1
    recorded = json.loads((ckpt / "rptq.json").read_text())["evaluations"][-1]["results"]
    assert recorded["rptq_mc"]["acc"] == data["results"]["rptq_mc"]["acc"]
    assert "rptq_mc" in (ckpt / "README.md").read_text()


def test_lm_eval_flags_need_a_task(tiny_opt_dir):
    # (an unknown task name is refused too, after lm-eval indexes its ~8 s of built-in tasks: not tested here)
    assert_user_error(run("eval", tiny_opt_dir, "--limit", 3), "--lm-eval-task")


def test_without_lm_eval(tiny_opt_dir, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert_user_error(run("eval", tiny_opt_dir, "--lm-eval-task", "rptq_mc"), "pip install lm-eval")
