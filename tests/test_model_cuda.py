"""Packed checkpoints on a GPU, end to end: the CUDA kernels through the model and the CLI agree with the CPU.

Skipped without a GPU. The checkpoints are quantized here without reorder, so the test needs no faiss (GPU
images often lack it); reorder changes the tensors in the checkpoint, not the kernels that run it.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from rptq_cli import kernels
from rptq_cli.cli import main
from rptq_cli.config import QuantConfig
from rptq_cli.evaluate import perplexity
from rptq_cli.export import load_quantized, save_quantized
from rptq_cli.models import family_for
from rptq_cli.nn.kv_cache import PackedKVCache
from rptq_cli.quantize import quantize_model
from tiny import build_model, build_tokenizer, corpus_text

GPU = "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(kernels._C is None or not kernels._C.has_cuda(),
                       reason="rptq_cli._C was built without the CUDA kernels"),
]

CHECKPOINTS = {  # name: (family, model shape, quantization) — W·A4 + KV4, W4 + KV4 only, W3A8 in groups of 64
    "opt-w4a4": ("opt", dict(hidden=128, heads=2, ffn=320), QuantConfig(wbits=4, abits=4, reorder=False)),
    "llama-w4kv4": ("llama", dict(hidden=128, heads=4, kv_heads=2, ffn=256),
                    QuantConfig(wbits=4, abits=4, kv_only=True, reorder=False)),
    "llama-w3a8-g64": ("llama", dict(hidden=128, heads=4, kv_heads=2, ffn=256),
                       QuantConfig(wbits=3, abits=8, weight_groups=64, reorder=False)),
}
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    family, shape, config = CHECKPOINTS[request.param]
    tok = build_tokenizer()
    model = build_model(family, vocab=len(tok), **shape)
    ids = tok(corpus_text(), return_tensors="pt").input_ids[0]
    calib = torch.stack([ids[i * 96:(i + 1) * 96] for i in range(8)])
    quantize_model(model, family_for(model.config), calib, config, progress=False, seed=0)
    path = tmp_path_factory.mktemp("gpu") / request.param
    save_quantized(model, tok, config, path, provenance={"source_model": "tiny"})
    return path


def greedy(model, prompt: torch.Tensor) -> tuple[torch.Tensor, PackedKVCache | None]:
    cache = PackedKVCache.from_model(model, max_length=prompt.shape[1] + NEW_TOKENS)
    out = model.generate(prompt.to(model.device), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, past_key_values=cache, pad_token_id=0)
    return out[0, prompt.shape[1]:].cpu(), cache


@torch.no_grad()
def test_gpu_runs_the_checkpoint_like_the_cpu(checkpoint):
    cpu, tok = load_quantized(checkpoint, dtype=torch.float32)
    gpu, _ = load_quantized(checkpoint, dtype=torch.float16)
    gpu.to(GPU)
    text = tok(corpus_text() * 2, return_tensors="pt").input_ids
    ppl_cpu = perplexity(cpu, text, seqlen=128, progress=False)["ppl"]
    ppl_gpu = perplexity(gpu, text, seqlen=128, progress=False)["ppl"]
    assert abs(ppl_gpu - ppl_cpu) / ppl_cpu < 2e-3  # fp16 activations against float32: measured 1.7e-4

    tokens_cpu, _ = greedy(cpu, text[:, :8])
    tokens_gpu, cache = greedy(gpu, text[:, :8])
    agree = int((tokens_cpu == tokens_gpu).long().cumprod(0).sum())
    assert agree >= NEW_TOKENS // 2, f"greedy decoding diverges after {agree} tokens"  # fp16 may flip a near-tie
    if cache is not None:  # the K/V codes live on the GPU, written in place by rptq::kv_append
        layer = cache.layers[0]
        assert layer.keys.device.type == GPU and layer.keys.dtype == torch.uint8
        assert layer.length == 8 + NEW_TOKENS - 1 and layer.capacity >= 8 + NEW_TOKENS


def test_cli_eval_and_generate_pick_the_cuda_kernels(checkpoint, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text() * 2)
    runner, out = CliRunner(), tmp_path / "res.json"
    result = runner.invoke(main, ["eval", str(checkpoint), "--data-path", str(corpus), "--seqlen", "64",
                                  "--device", GPU, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"backend: {kernels.backend(GPU)}" in result.output and kernels.backend(GPU) == "cuda"
    assert json.loads(out.read_text())["results"]["wikitext"]["ppl"] > 0

    result = runner.invoke(main, ["generate", str(checkpoint), "The river", "--max-new-tokens", "8",
                                  "--device", GPU, "--verbose"])
    assert result.exit_code == 0, result.output
    assert "backend: cuda" in result.output
