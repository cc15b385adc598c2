"""Every checkpoint carries a generated README.md (the model card); `rptq eval CKPT` appends its results to
rptq.json and the card without breaking the checkpoint's integrity hashes."""
import json

import pytest

from rptq_cli.export import load_quantized
from rptq_cli.integrity import file_sha256
from rptq_cli.model_card import EVALUATIONS_KEY, render_card
from test_cli import CALIB, run


@pytest.fixture(scope="module")
def checkpoint(tiny_opt_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "w4a16"
    result = run("quantize", tiny_opt_dir, "--wbits", 4, "--calib-path", corpus_file, *CALIB,
                 "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_card_says_what_the_checkpoint_is(checkpoint, tiny_opt_dir, corpus_file):
    card = (checkpoint / "README.md").read_text()
    record = json.loads((checkpoint / "rptq.json").read_text())
    assert record["command"].startswith(f"rptq quantize {tiny_opt_dir} --wbits 4 --calib-path {corpus_file}")
    assert record["command"] in card
    assert "# w4a16: RPTQ W4A16 (token mode)" in card
    assert str(tiny_opt_dir) in card
    source_hash = file_sha256(tiny_opt_dir / "model.safetensors")
    assert record["source_files_sha256"]["model.safetensors"] == source_hash and source_hash in card
    assert record["calibration"]["sha256"] in card and "`4`" in card  # calibration source hash, nsamples
    assert '| clusters | `{"R1": 8' in card and "| weight_quantizer | `\"gptq\"` |" in card
    assert "None recorded yet" in card
    assert "README.md" not in record["files_sha256"]


def test_eval_appends_results_and_keeps_the_checkpoint_valid(checkpoint, corpus_file):
    for seqlen in (32, 48):
        result = run("eval", checkpoint, "--data-path", corpus_file, "--seqlen", seqlen)
        assert result.exit_code == 0, result.output
    record = json.loads((checkpoint / "rptq.json").read_text())
    evaluations = record[EVALUATIONS_KEY]
    assert [e["results"]["wikitext"]["seqlen"] for e in evaluations[-2:]] == [32, 48]
    last = evaluations[-1]
    assert last["command"] == f"rptq eval {checkpoint} --data-path {corpus_file} --seqlen 48"
    assert last["data"] == {"wikitext": str(corpus_file)} and last["dtype"] == "float32"
    card = (checkpoint / "README.md").read_text()
    for e in evaluations[-2:]:
        assert f"ppl {e['results']['wikitext']['ppl']:.3f}" in card
    assert "None recorded yet" not in card
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    load_quantized(checkpoint)  # hashes still verify: neither file is covered by them


def test_api_checkpoint_card_without_command():
    card = render_card("x", {"quantization_config": {"label": "W4A16", "mode": "token", "wbits": 4}},
                       {"source_model": "hub/model"})
    assert "not recorded (written through the Python API)" in card and "`hub/model`" in card
    assert "weight files: not hashed" in card
