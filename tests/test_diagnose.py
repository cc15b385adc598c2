"""The error report: per-quantizer relative MSE, clipped tokens, extremes and KL against the FP model."""
import copy
import json

import torch
from click.testing import CliRunner

from rptq_cli.cli import main
from rptq_cli.config import QuantConfig
from rptq_cli.diagnose import activation_report
from rptq_cli.models import family_for
from rptq_cli.quantize import quantize_model
from tiny import build_model, build_tokenizer, corpus_text

SMALL = dict(R1=4, R2=2, R3=2, R4=4, R5=4)


def quantized(config):
    tok = build_tokenizer()
    fp = build_model("llama", vocab=len(tok), hidden=64, heads=4, kv_heads=2, ffn=96)
    tokens = tok(corpus_text(), return_tensors="pt").input_ids
    model = copy.deepcopy(fp)
    calib = torch.stack([tokens[0, i * 48:(i + 1) * 48] for i in range(4)])
    quantize_model(model, family_for(model.config), calib, config, progress=False)
    return fp, model, tokens


def test_report_covers_every_quantizer_and_measures_kl():
    fp, model, tokens = quantized(QuantConfig(wbits=16, abits=4, mode="strict", clusters=SMALL))
    report = activation_report(model, tokens, seqlen=32, max_windows=2, fp_model=fp)
    points = report["points"]
    # 2 layers × (q/k/v/o/gate/up/down inputs + the attention's q, k, v)
    assert len(points) == 2 * 10
    assert "model.layers.1.mlp.down_proj.act" in points and "model.layers.0.self_attn.rptq.k" in points
    for name, e in points.items():
        assert 0 < e["rel_mse"] < 0.5, (name, e)
        assert 0 <= e["clipped_token_share"] <= 1 and e["max_abs"] > 0 and e["max_channel"] >= 0
    assert report["kl_vs_fp"] > 0 and report["windows"] == 2


def test_static_ranges_clip_and_per_token_grids_do_not():
    _, static, tokens = quantized(QuantConfig(wbits=16, abits=4, mode="strict", clusters=SMALL, act_clip="mse"))
    _, dynamic, _ = quantized(QuantConfig(wbits=16, abits=4, mode="token", clusters=SMALL))
    s = activation_report(static, tokens, seqlen=32, max_windows=2)["points"]
    d = activation_report(dynamic, tokens, seqlen=32, max_windows=2)["points"]
    assert any(e["clipped_token_share"] > 0 for e in s.values())  # MSE-clipped ranges cut some tokens
    name = "model.layers.0.mlp.down_proj.act"
    assert d[name]["clipped_token_share"] == 0
    assert d[name]["rel_mse"] < s[name]["rel_mse"]  # each token's own grid fits it better


def test_eval_writes_the_report(tiny_llama_dir, corpus_file, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--data-path", str(corpus_file), "--seqlen", "32",
                                       "--wbits", "4", "--abits", "8", "--nsamples", "4", "--calib-path",
                                       str(corpus_file), "--report", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["label"] == "W4A8-token" and report["kl_vs_fp"] > 0 and report["points"]
    assert "largest relative MSE" in result.output
