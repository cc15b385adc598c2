"""The command line end to end on tiny random models (Click's CliRunner), offline."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rptq_cli.stats_file import StatsFile
from cli_run import assert_user_error, run

CALIB = ["--nsamples", "4", "--seqlen", "32", "--seed", "0"]


def test_calibrate_writes_stats(stats_file, tiny_opt_dir):
    stats = StatsFile.load(stats_file)
    assert len(stats.layers) == 2
    lo, hi = stats.layers[0]["x1"]
    assert lo.shape == (64,) and bool((lo <= hi).all())
    assert stats.meta["data"]["nsamples"] == 4 and stats.meta["data"]["source"].startswith("file:")
    assert set(stats.layers[1]) == {"x1", "q", "k", "v", "o_in", "x2", "down_in"}


def test_eval_fp_and_quantized(stats_file, tiny_opt_dir, corpus_file, tmp_path):
    fp_json, q_json = tmp_path / "fp.json", tmp_path / "q.json"
    result = run("eval", tiny_opt_dir, "--task", "wikitext", "--data-path", corpus_file, "--seqlen", 32,
                 "--json", fp_json)
    assert result.exit_code == 0, result.output
    fp = json.loads(fp_json.read_text())
    assert fp["quantization"] is None and fp["results"]["wikitext"]["seqlen"] == 32
    assert fp["results"]["wikitext"]["windows"] >= 10

    result = run("eval", tiny_opt_dir, "--task", "wikitext", "--data-path", corpus_file, "--wbits", 4, "--abits", 4,
                 "--stats", stats_file, "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8", "--json", q_json)
    assert result.exit_code == 0, result.output
    q = json.loads(q_json.read_text())
    assert q["quantization"]["label"] == "W4A4-token" and q["quantization"]["mode"] == "token"  # the default
    assert q["quantization"]["calibration"]["source"].startswith("file:")  # taken from the stats file
    ppl_fp, ppl_q = fp["results"]["wikitext"]["ppl"], q["results"]["wikitext"]["ppl"]
    assert ppl_q > 0 and abs(ppl_q - ppl_fp) / ppl_fp < 0.5 and ppl_q != ppl_fp


def test_eval_preset_on_llama(tiny_llama_dir, corpus_file, tmp_path):
    out = tmp_path / "r.json"
    result = run("eval", tiny_llama_dir, "--data-path", corpus_file, "--config", "w4a4kv", "--calib-path",
                 corpus_file, *CALIB, "--weight-quantizer", "rtn", "--json", out)
    assert result.exit_code == 0, result.output
    q = json.loads(out.read_text())["quantization"]
    assert q["label"] == "W4A4KV" and q["kv_only"] and q["weight_quantizer"] == "rtn"


def test_missing_model(tmp_path):
    assert_user_error(run("eval", tmp_path / "nope"), "does not exist")


def test_unsupported_architecture(tmp_path, tiny_tokenizer):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=384)).save_pretrained(tmp_path)
    assert_user_error(run("eval", tmp_path), "GPT2LMHeadModel", "OPTForCausalLM", "LlamaForCausalLM")


@pytest.mark.parametrize("flags,words", [(["--wbits", "5"], ["--wbits 5", "2, 3, 4, 8, 16"]),
                                         (["--abits", "2"], ["--abits 2"]),
                                         (["--clusters", "R9=3"], ["R9"]),
                                         (["--config", "w9a9"], ["w9a9", "w4a4kv"])])
def test_bad_quantization_flags(tiny_opt_dir, corpus_file, flags, words):
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", corpus_file, *flags), *words)


def test_data_shorter_than_one_window(tiny_opt_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The river rises in the hills.")
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", short, "--seqlen", 64), "64")
    assert_user_error(run("calibrate", tiny_opt_dir, "--calib-path", short, "--seqlen", 64, "-o",
                          tmp_path / "s.safetensors"), "64")
    assert not (tmp_path / "s.safetensors").exists()


def test_missing_calibration_file(tiny_opt_dir, tmp_path):
    assert_user_error(run("calibrate", tiny_opt_dir, "--calib-path", tmp_path / "none.txt", "-o",
                          tmp_path / "s.safetensors"), "none.txt")
    assert list(tmp_path.iterdir()) == []


def test_nan_during_calibration(tiny_opt_dir, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir)
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn.q_proj.weight.fill_(float("inf"))
    model.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken").joinpath("tokenizer.json").write_bytes((tiny_opt_dir / "tokenizer.json").read_bytes())
    (tmp_path / "broken").joinpath("tokenizer_config.json").write_bytes(
        (tiny_opt_dir / "tokenizer_config.json").read_bytes())
    out = tmp_path / "s.safetensors"
    assert_user_error(run("calibrate", tmp_path / "broken", "--calib-path", corpus_file, *CALIB, "-o", out), "NaN")
    assert not out.exists()


def test_stats_of_another_model(stats_file, tiny_llama_dir, corpus_file):
    assert_user_error(run("eval", tiny_llama_dir, "--data-path", corpus_file, "--wbits", 4, "--stats", stats_file),
                      "re-run `rptq calibrate`")


def test_foreign_stats_file(tiny_opt_dir, corpus_file, tmp_path):
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", corpus_file, "--wbits", 4, "--stats", bogus), "x.safetensors")


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_opt_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "w4a4kv"
    result = run("quantize", tiny_opt_dir, "--config", "w4a4kv", "--calib-path", corpus_file, *CALIB,
                 "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output and "FP16" in result.output
    return out


def test_quantize_eval_generate(checkpoint_dir, tiny_opt_dir, corpus_file, tmp_path):
    assert json.loads((checkpoint_dir / "rptq.json").read_text())["calibration"]["nsamples"] == 4
    out = tmp_path / "res.json"
    result = run("eval", checkpoint_dir, "--data-path", corpus_file, "--seqlen", 32, "--json", out)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert res["quantization"]["label"] == "W4A4KV" and res["results"]["wikitext"]["ppl"] > 0

    result = run("generate", checkpoint_dir, "The river", "--max-new-tokens", 8, "--verbose")
    assert result.exit_code == 0, result.output
    kv_line = next(line for line in result.output.splitlines() if line.startswith("KV cache:"))
    assert "4-bit codes" in kv_line
    fp = run("generate", tiny_opt_dir, "The river", "--max-new-tokens", 4)
    assert fp.exit_code == 0 and "The river" in fp.output, fp.output


def test_generate_reports_a_float_kv_cache(tiny_opt_dir, corpus_file, tmp_path):
    """W4A16 keeps K/V in float: the preallocated float layers, 2 × 4 bytes a channel in float32."""
    out = tmp_path / "w4a16"
    assert run("quantize", tiny_opt_dir, "--config", "w4a16", "--weight-quantizer", "rtn", "--calib-path",
               corpus_file, *CALIB, "--clusters", "R1=8,R4=8,R5=8", "-o", out).exit_code == 0
    result = run("generate", out, "The river", "--max-new-tokens", 8, "--verbose")
    assert result.exit_code == 0, result.output
    kv_line = next(line for line in result.output.splitlines() if line.startswith("KV cache:"))
    assert "(float32 values)" in kv_line and "(2.0000×" in kv_line, kv_line


def test_quantize_refuses_to_overwrite(checkpoint_dir, tiny_opt_dir, corpus_file):
    before = (checkpoint_dir / "model.safetensors").read_bytes()
    assert_user_error(run("quantize", tiny_opt_dir, "--wbits", 4, "--calib-path", corpus_file, *CALIB, "-o",
                          checkpoint_dir), "--force")
    assert (checkpoint_dir / "model.safetensors").read_bytes() == before


def test_quantize_needs_something_to_quantize(tiny_opt_dir, tmp_path):
    assert_user_error(run("quantize", tiny_opt_dir, "-o", tmp_path / "out"), "--wbits")
    assert not (tmp_path / "out").exists()


def test_eval_of_a_checkpoint_refuses_quantization_flags(checkpoint_dir, corpus_file):
    assert_user_error(run("eval", checkpoint_dir, "--data-path", corpus_file, "--wbits", 4), "already quantized")


def test_import_bounds_openmp_spin_unless_told():
    # a short spin-wait (not libgomp's 300 000 turns, not PASSIVE's none): see rptq_cli/__init__.py
    code = "import os, rptq_cli; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    runs = {"default": {}, "policy": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {"GOMP_SPINCOUNT": "5"}}
    seen = {name: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**base, **extra}).stdout.split() for name, extra in runs.items()}
    assert seen == {"default": ["10000", "None"], "policy": ["None", "PASSIVE"], "spin": ["5", "None"]}
