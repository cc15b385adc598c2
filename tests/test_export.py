"""The packed checkpoint: written atomically and deterministically, small, validated on load, and it runs
exactly like the simulated model it came from."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from rptq_cli import export
from rptq_cli.config import QuantConfig
from rptq_cli.errors import RptqError
from rptq_cli.evaluate import perplexity
from rptq_cli.export import load_quantized, save_quantized
from rptq_cli.models import family_for
from rptq_cli.nn.kv_cache import FloatKVLayer, PackedKVCache, PackedKVLayer
from rptq_cli.nn.linear import QuantLinear
from rptq_cli.quant.pack import ideal_bytes
from rptq_cli.quant.weights import rtn_quantize
from quantized import SMALL, simulated
from tiny import corpus_text


def save(model, tok, config, path, **kw):
    return save_quantized(model, tok, config, path, provenance={"source_model": "tiny"}, **kw)


CONFIGS = [
    ("opt", QuantConfig(wbits=4, abits=4, clusters=SMALL), dict(hidden=64, heads=2)),
    ("opt", QuantConfig(wbits=3, abits=3, kv_only=True, clusters=SMALL, weight_groups=32), dict(hidden=64, heads=2)),
    ("opt", QuantConfig(wbits=8, abits=8, mode="strict", clusters=SMALL), dict(hidden=64, heads=2)),
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL), dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    ("llama", QuantConfig(wbits=2, abits=8, clusters=SMALL, weight_groups="channel"),
     dict(hidden=128, heads=4, kv_heads=2, ffn=160)),
    ("qwen2", QuantConfig(wbits=4, abits=16, clusters=SMALL), dict(hidden=64, heads=2, kv_heads=1, ffn=96)),
    ("opt", QuantConfig(wbits=4, abits=4, mode="token", clusters=SMALL), dict(hidden=64, heads=2)),
    ("llama", QuantConfig(wbits=4, abits=8, mode="token", clusters=SMALL), dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    # K/V on per-token grids stored beside the codes (kv_grid="token")
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, kv_grid="token", clusters=SMALL),
     dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    ("opt", QuantConfig(wbits=4, abits=4, mode="token", kv_grid="token", clusters=SMALL), dict(hidden=64, heads=2)),
    # w4a4-fine's shape: many small groups (single RoPE pairs, 2-channel down_proj groups)
    ("llama", QuantConfig(wbits=4, abits=4, clusters=dict(SMALL, R2=8, R3=8, R5=48)),
     dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    # an 8-bit lm_head (--head-bits 8): tied (OPT) and untied (Llama)
    ("opt", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL, head_bits=8), dict(hidden=64, heads=2)),
    ("llama", QuantConfig(wbits=4, abits=16, clusters=SMALL, head_bits=8), dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
]


@pytest.mark.parametrize("family,config,cfg", CONFIGS, ids=[f"{f}-{c.label}" for f, c, _ in CONFIGS])
def test_round_trip_matches_simulation(tmp_path, family, config, cfg):
    model, tok = simulated(family, config, **cfg)
    save(model, tok, config, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(loaded.get_submodule(family_for(loaded.config).layers + ".0." + family_for(loaded.config).q),
                      QuantLinear)
    text = tok(corpus_text(), return_tensors="pt").input_ids
    sim, real = perplexity(model, text, seqlen=64, progress=False), perplexity(loaded, text, seqlen=64, progress=False)
    assert abs(real["ppl"] - sim["ppl"]) / sim["ppl"] < 1e-3, (sim, real)

    prompt = text[:, :8]
    expected = model.generate(prompt, max_new_tokens=32, do_sample=False)
    cache = PackedKVCache.from_model(loaded)  # (preallocated float layers where K/V are not quantized)
    kind = PackedKVLayer if config.act_bits("k") < 16 else FloatKVLayer
    assert all(type(layer) is kind for layer in cache.layers)
    got = loaded.generate(prompt, max_new_tokens=32, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)


def test_kv_cache_is_packed_and_small(tmp_path):
    config = QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL)
    model, tok = simulated("opt", config, hidden=64, heads=2)  # head_dim 32: whole blocks
    save(model, tok, config, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    cache = PackedKVCache.from_model(loaded)
    loaded.generate(torch.tensor([[0, 5, 9, 13]]), max_new_tokens=20, do_sample=False, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.uint8 and layer.length == 23
    fp16_per_token = 2 * 2 * 32 * 2 * len(cache.layers)  # K and V, 2 heads × 32, 2 bytes
    per_token = cache.nbytes() / layer.length
    assert per_token <= 1.02 * fp16_per_token * 4 / 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_weights_waste_nothing(bits):
    weight = torch.randn(256, 512)
    q = rtn_quantize(weight, torch.full((4,), 128, dtype=torch.int32), bits)
    layer = QuantLinear.from_linear(torch.nn.Linear(512, 256), q, None)
    tensors = export.checkpoint_tensors(torch.nn.Sequential(layer))
    stored = sum(tensors[f"0.{n}"].nbytes for n in ("qweight", "scales", "zeros"))
    assert stored <= 1.02 * ideal_bytes(256, 512, 4, bits)
    if bits == 4:
        assert stored <= 0.27 * 256 * 512 * 2


def test_cpu_scales_follow_the_stored_fp16_scales():
    q = rtn_quantize(torch.randn(64, 256), torch.full((2,), 128, dtype=torch.int32), 4)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 64), q, None)
    assert layer.scales.dtype == torch.float16 and layer.kernel_scales().dtype == torch.float32
    x = torch.randn(3, 256)
    expected = x @ layer.dequantized_weight().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-3)
    layer.scales.mul_(2)  # an in-place write must not leave the float32 copy stale
    torch.testing.assert_close(layer(x), 2 * expected - layer.bias, rtol=1e-4, atol=2e-3)
    with torch.inference_mode():  # scales made under inference mode have no version counter
        frozen_q = rtn_quantize(torch.randn(64, 256), q.group_sizes, 4)
        frozen = QuantLinear.from_linear(torch.nn.Linear(256, 64), frozen_q, None)
    assert frozen.scales.is_inference()
    torch.testing.assert_close(frozen(x), x @ frozen.dequantized_weight().T + frozen.bias, rtol=1e-4, atol=2e-3)
    layer.to(torch.float32)  # a replaced buffer: float32 scales are read as they are
    assert layer.kernel_scales() is layer.scales and layer._cpu_scales is None


def test_same_inputs_same_bytes(tmp_path):
    config = QuantConfig(wbits=4, abits=4, clusters=SMALL)
    for name in ("a", "b"):
        model, tok = simulated("llama", config, hidden=64, heads=4, kv_heads=2, ffn=96)
        save(model, tok, config, tmp_path / name)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_sharded_checkpoint_loads(tmp_path):
    config = QuantConfig(wbits=4, abits=8, clusters=SMALL)
    model, tok = simulated("opt", config, hidden=64, heads=2)
    save(model, tok, config, tmp_path / "q", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "q" / export.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "q" / export.WEIGHTS_NAME).exists()
    loaded, _ = load_quantized(tmp_path / "q")
    text = tok(corpus_text(), return_tensors="pt").input_ids
    assert perplexity(loaded, text, seqlen=64, progress=False)["ppl"] == pytest.approx(
        perplexity(model, text, seqlen=64, progress=False)["ppl"], rel=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL)
    model, tok = simulated("opt", config, hidden=64, heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "q"
    save(model, tok, config, path)
    return path, model, tok, config


def copy_of(checkpoint, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint[0], dst)
    return dst


def test_existing_output_needs_force(checkpoint, tmp_path):
    path, model, tok, config = checkpoint
    dst = copy_of(checkpoint, tmp_path)
    with pytest.raises(RptqError, match="--force"):
        save(model, tok, config, dst)
    (dst / "marker").write_text("old")
    save(model, tok, config, dst, force=True)
    assert not (dst / "marker").exists() and (dst / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary or old directory left behind


def test_failing_write_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    _, model, tok, config = checkpoint
    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "write_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        save(model, tok, config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_file(checkpoint, tmp_path):
    dst = copy_of(checkpoint, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RptqError, match="truncated or corrupted"):
        load_quantized(dst)


def test_other_format_version(checkpoint, tmp_path):
    dst = copy_of(checkpoint, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(RptqError, match="format version 99"):
        load_quantized(dst)


def _rewrite(dst, edit):
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={export.FILE_TAG: "1"})


def test_missing_tensor(checkpoint, tmp_path):
    dst = copy_of(checkpoint, tmp_path)
    _rewrite(dst, lambda t: t.pop("model.decoder.layers.1.fc2.scales"))
    with pytest.raises(RptqError, match="missing tensor model.decoder.layers.1.fc2.scales"):
        load_quantized(dst, verify=False)  # the structure checks, past the hashes


def test_wrong_shape_and_dtype(checkpoint, tmp_path):
    dst = copy_of(checkpoint, tmp_path)
    _rewrite(dst, lambda t: t.update({"model.decoder.layers.0.fc1.scales": torch.zeros(3, 3, dtype=torch.float16)}))
    with pytest.raises(RptqError, match="fc1.scales"):
        load_quantized(dst, verify=False)  # the structure checks, past the hashes
    _rewrite(dst, lambda t: t.update({"model.decoder.layers.0.fc1.qweight":
                                      t["model.decoder.layers.0.fc1.qweight"].float()}))
    with pytest.raises(RptqError, match="fc1.qweight"):
        load_quantized(dst, verify=False)  # the structure checks, past the hashes


def test_plain_fp_directory(tiny_opt_dir):
    with pytest.raises(RptqError, match="not an rptq checkpoint"):
        load_quantized(tiny_opt_dir)


def test_foreign_safetensors(checkpoint, tmp_path):
    dst = copy_of(checkpoint, tmp_path)
    save_file({"x": torch.zeros(2)}, dst / "model.safetensors")
    with pytest.raises(RptqError, match="not an rptq checkpoint file"):
        load_quantized(dst, verify=False)  # the structure checks, past the hashes


def test_provenance_and_config(checkpoint):
    path = checkpoint[0]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "rptq" and qc["format_version"] == export.FORMAT_VERSION and qc["label"] == "W4A4KV"
    assert json.loads((path / "rptq.json").read_text())["tool"] == "rptq"
    assert (path / "tokenizer.json").exists()
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o700)


def test_compiled_kernels_match_the_reference_backend(checkpoint):
    """`rptq eval` on a checkpoint runs the compiled kernels by default; the reference gives the same ppl."""
    from rptq_cli import kernels
    if not kernels.compiled_available():
        pytest.skip("the compiled extension is not built")
    path, _, tok, _ = checkpoint
    for config in (QuantConfig(wbits=4, abits=4, clusters=SMALL),
                   QuantConfig(wbits=3, abits=8, clusters=SMALL, weight_groups=32)):
        model, _ = simulated("opt", config, hidden=64, heads=2)
        text = tok(corpus_text(), return_tensors="pt").input_ids
        compiled = perplexity(model, text, seqlen=64, progress=False)["ppl"]
        with kernels.using_backend("reference"):
            reference = perplexity(model, text, seqlen=64, progress=False)["ppl"]
        assert abs(compiled - reference) / reference < 1e-3, (compiled, reference)


def test_embeddings_and_lm_head_stay_float16(checkpoint):
    """The packed model keeps the vocabulary tables as stored (float16); logits lose at most ~1e-3 relative."""
    from rptq_cli.nn.head import HalfEmbedding, HalfLinear
    model, _ = load_quantized(checkpoint[0])
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, HalfEmbedding) and isinstance(head, HalfLinear)
    assert embed.weight.dtype == head.weight.dtype == torch.float16
    ids = torch.arange(10)[None]
    assert embed(ids).dtype == torch.float32
    x = torch.randn(3, head.in_features) * 4
    exact = x.double() @ head.weight.double().T
    got = head(x)
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-3


@pytest.mark.parametrize("family,cfg", [("opt", dict(hidden=64, heads=2)),
                                        ("llama", dict(hidden=64, heads=4, kv_heads=2, ffn=96))])
def test_head_bits_8_packs_the_head_and_keeps_the_embeddings(tmp_path, family, cfg):
    """--head-bits 8: the lm_head is packed 8-bit codes within half a grid step of the float16 head; the embedding
    table stays the float16 one, also where the two were tied (OPT)."""
    from rptq_cli.nn.head import HEAD_GROUP, HalfEmbedding
    config = QuantConfig(wbits=4, abits=16, clusters=SMALL)
    fp16_head = load_quantized(save(*simulated(family, config, **cfg), config, tmp_path / "h16"))[0]
    config8 = QuantConfig(wbits=4, abits=16, clusters=SMALL, head_bits=8)
    model, _ = load_quantized(save(*simulated(family, config8, **cfg), config8, tmp_path / "h8"))
    head, float_head = model.get_output_embeddings(), fp16_head.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.bits == 8 and head.act is None
    assert set(head.group_sizes.tolist()) <= {HEAD_GROUP, head.in_features % HEAD_GROUP}
    step = head.scales.float().repeat_interleave(head.group_sizes.long(), 1)
    assert ((head.dequantized_weight() - float_head.weight.float()).abs() <= step / 2 + 1e-6).all()
    embed = model.get_input_embeddings()
    assert isinstance(embed, HalfEmbedding) and torch.equal(embed.weight, fp16_head.get_input_embeddings().weight)
    x = torch.randn(3, head.in_features)
    exact = x.double() @ float_head.weight.double().T
    assert ((head(x).double() - exact).abs().max() / exact.abs().max()).item() < 2e-2
