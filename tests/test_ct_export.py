"""`rptq export --format compressed-tensors`: plain transformers (with the compressed-tensors package) loads
the export as stock modules, and it evaluates to rptq's own perplexity for the checkpoint."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rptq_cli.config import QuantConfig
from rptq_cli.evaluate import perplexity
from rptq_cli.export import load_quantized
from quantized import SMALL, corpus_ids, quantized_checkpoint
from test_cli import assert_user_error, run
from tiny import build_tokenizer

pytest.importorskip("compressed_tensors")

CASES = [  # (family, config, shape): act-order groups, W3 act-order, W8 per channel
    ("opt", QuantConfig(wbits=4, abits=16, clusters=SMALL, weight_groups=32), dict(hidden=64, heads=2)),
    ("llama", QuantConfig(wbits=3, abits=16, clusters=SMALL, weight_groups=16), dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    ("qwen2", QuantConfig(wbits=8, abits=16, clusters=SMALL, weight_groups="channel"),
     dict(hidden=64, heads=2, kv_heads=1, ffn=96)),
    # an 8-bit head: written dequantized and untied (OPT ties it to the embeddings)
    ("opt", QuantConfig(wbits=4, abits=16, clusters=SMALL, weight_groups=32, head_bits=8), dict(hidden=64, heads=2)),
]


@pytest.mark.parametrize("family,config,shape", CASES, ids=[f"{f}-{c.label}-g{c.weight_groups}" for f, c, _ in CASES])
def test_export_evaluates_like_the_checkpoint(tmp_path, family, config, shape):
    ckpt = quantized_checkpoint(tmp_path / "q", family, config, **shape)
    result = run("export", ckpt, "--format", "compressed-tensors", "-o", tmp_path / "ct")
    assert result.exit_code == 0, result.output
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and weights["num_bits"] == config.wbits
    assert weights["actorder"] == ("group" if config.weight_groups != "channel" else None)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    layer = exported.model.decoder.layers[0] if family == "opt" else exported.model.layers[0]
    assert type(layer.self_attn.q_proj) is nn.Linear  # stock modules, dequantized by compressed-tensors
    norm = layer.self_attn_layer_norm if family == "opt" else layer.input_layernorm
    assert "Reorder" not in type(norm).__name__
    ids = corpus_ids(build_tokenizer())
    packed, _ = load_quantized(ckpt)
    ours = perplexity(packed, ids, seqlen=64, progress=False)["ppl"]
    theirs = perplexity(exported, ids, seqlen=64, progress=False)["ppl"]
    assert abs(theirs - ours) / ours < 1e-3, (ours, theirs)


def test_activation_quantized_and_cluster_group_checkpoints_are_refused(tmp_path):
    kv = quantized_checkpoint(tmp_path / "kv", "llama")  # W4A4KV
    assert_user_error(run("export", kv, "--format", "compressed-tensors", "-o", tmp_path / "o1"),
                      "W4A4KV", "per-cluster scales", "compressed-tensors")
    clusters = quantized_checkpoint(tmp_path / "cl", "opt")  # W4A16 with cluster groups (uneven)
    assert_user_error(run("export", clusters, "--format", "compressed-tensors", "-o", tmp_path / "o2"),
                      "uneven", "--weight-groups 128")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
