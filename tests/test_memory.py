"""`rptq memory`: its formulas against the bytes rptq really writes and allocates, and the command itself."""
import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from rptq_cli import memory, quantize
from rptq_cli.cli import main
from rptq_cli.config import QuantConfig
from rptq_cli.export import load_quantized, save_quantized
from rptq_cli.memory import Groups, checkpoint_bytes, kv_bytes, kv_token_groups, model_shapes, resident_bytes
from rptq_cli.models import family_for
from rptq_cli.nn.kv_cache import PackedKVCache, PackedKVLayer
from rptq_cli.outliers import inject_outliers
from rptq_cli.quantize import quantize_model
from tiny import build_model, build_tokenizer, corpus_text, tiny_config
from cli_run import assert_user_error

SMALL = dict(R1=8, R2=2, R3=2, R4=8, R5=8)
LLAMA = dict(hidden=64, heads=4, kv_heads=2, ffn=96)  # head_dim 16: KV rows padded to a 32-code block
OPT = dict(hidden=64, heads=2, ffn=160)              # head_dim 32: whole blocks

CASES = [
    ("opt", QuantConfig(wbits=4, abits=16, clusters=SMALL), OPT),                       # W4A16, cluster groups
    ("llama", QuantConfig(wbits=4, abits=16, clusters=SMALL), LLAMA),
    ("opt", QuantConfig(wbits=3, abits=16, weight_groups=32, clusters=SMALL), OPT),     # W3A16 g32
    ("llama", QuantConfig(wbits=3, abits=16, weight_groups=32, clusters=SMALL), dict(LLAMA, ffn=80)),  # last group short
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL), LLAMA),      # W4A4KV
    ("opt", QuantConfig(wbits=8, abits=8, clusters=SMALL), OPT),                        # W8A8, per-token inputs
    ("llama", QuantConfig(wbits=8, abits=8, mode="paper", clusters=SMALL), LLAMA),      # W8A8, static inputs
    ("qwen2", QuantConfig(wbits=4, abits=4, mode="strict", clusters=SMALL), dict(hidden=64, heads=2, kv_heads=1,
                                                                                  ffn=96)),  # q/k/v biases
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, kv_grid="token", clusters=SMALL), LLAMA),  # per-token KV
    ("opt", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL, head_bits=8), OPT),  # 8-bit head, tied
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL, head_bits=8), LLAMA),  # untied
]


def quantized(family, config, cfg, tmp_path):
    """A tiny model quantized with ``config`` and saved; returns (raw config dict, checkpoint dir)."""
    tok = build_tokenizer()
    raw = tiny_config(family, vocab=len(tok), **cfg).to_dict()
    model = build_model(family, vocab=len(tok), **cfg)
    fam = family_for(model.config)
    inject_outliers(model, fam, channels=2)
    for p in model.parameters():
        p.data.copy_(p.data.half().float())
    tokens = tok(corpus_text(), return_tensors="pt").input_ids[0]
    calib = torch.stack([tokens[i * 48:(i + 1) * 48] for i in range(6)])
    quantize_model(model, fam, calib, config, progress=False, seed=1)
    out = save_quantized(model, tok, config, tmp_path / "q", provenance={"source_model": "tiny"})
    return raw, out


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def header_bytes(directory: Path) -> int:
    """safetensors: an 8-byte little-endian length, then that many bytes of JSON header, then the tensors."""
    return sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in directory.glob("*.safetensors"))


def real_groups(tensors, raw, config) -> list[Groups]:
    """Each layer's group counts as the checkpoint stores them (KMeans may leave a cluster empty); a point
    that stores no group table keeps the nominal count (it costs no bytes)."""
    shapes = model_shapes(raw)
    fam = family_for(tiny_config(raw["model_type"]))
    nominal = Groups.nominal(shapes, config)
    weight = config.weight_groups == "cluster"  # then a weight's groups are its input's clusters
    sources = {"x1": fam.q, "o_in": fam.o, "x2": fam.mlp_in[0], "down_in": fam.mlp_out}
    out = []
    for i in range(shapes.layers):
        counts = {}
        for point in ("x1", "q", "k", "v", "o_in", "x2", "down_in"):
            names = ([f"{fam.attn}.rptq.{point}"] if point in ("q", "k", "v") else
                     [sources[point] + ".act", *([sources[point]] if weight else [])])
            found = [tensors[f"{fam.layers}.{i}.{n}.group_sizes"].numel() for n in names
                     if f"{fam.layers}.{i}.{n}.group_sizes" in tensors]
            counts[point] = found[0] if found else getattr(nominal, point)
        out.append(Groups(**counts))
    return out


def resident(shapes, config, per_layer: list[Groups]) -> int:
    """resident_bytes with each layer's own groups."""
    outside = 4 * sum(shapes.outside.values())
    return sum(resident_bytes(shapes, config, g) - outside for g in per_layer) // shapes.layers + outside


@pytest.mark.parametrize("family,config,cfg", CASES, ids=[f"{f}-{c.label}-{c.weight_groups}" for f, c, _ in CASES])
def test_checkpoint_bytes_are_exact(tmp_path, family, config, cfg):
    raw, out = quantized(family, config, cfg, tmp_path)
    tensors = stored_tensors(out)
    measured = sum(t.numel() * t.element_size() for t in tensors.values())
    shapes = model_shapes(raw)
    predicted = sum(checkpoint_bytes(shapes, config, real_groups(tensors, raw, config)).values())
    assert predicted == measured
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk == predicted + header_bytes(out)
    # the config's cluster counts are an upper bound: KMeans can only use fewer
    nominal = sum(checkpoint_bytes(shapes, config).values())
    assert nominal >= measured
    if config.weight_groups != "cluster" and not config.quantizes_acts:
        assert nominal == measured  # fixed groups and no cluster-sized tensors: no KMeans in the count


@pytest.mark.parametrize("family,config,cfg", [CASES[4], CASES[5], CASES[7], CASES[8], CASES[9], CASES[10]],
                         ids=["llama-W4A4KV", "opt-W8A8", "qwen2-W4A4", "llama-W4A4KV-kvtoken", "opt-W4A4KV-head8",
                              "llama-W4A4KV-head8"])
def test_kv_cache_and_resident_bytes(tmp_path, family, config, cfg):
    raw, out = quantized(family, config, cfg, tmp_path)
    shapes = model_shapes(raw)
    model, _ = load_quantized(out)
    seen, measured = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("inv_freq") or t.data_ptr() in seen:  # RoPE frequencies are computed, not loaded
            continue
        seen.add(t.data_ptr())
        measured += t.numel() * t.element_size()
    assert measured == resident(shapes, config, real_groups(stored_tensors(out), raw, config))
    bits = config.act_bits("k")
    for batch, seqlen, new in ((1, 40, 3), (3, 200, 0)):
        cache = PackedKVCache.from_model(model, max_length=seqlen + new)
        ids = torch.randint(1, shapes.vocab, (batch, seqlen))
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            for _ in range(new):
                model(ids[:, :1], past_key_values=cache, use_cache=True)
        groups = kv_token_groups(shapes, config)
        assert cache.nbytes() == kv_bytes(shapes, batch, seqlen + new, bits, token_groups=groups)
        assert cache.reserved_nbytes() == kv_bytes(shapes, batch, seqlen + new, bits, reserved=True,
                                                   token_groups=groups)
    assert kv_bytes(shapes, 2, 10) == 2 * shapes.layers * 2 * shapes.n_kv * 10 * shapes.head_dim * 2


def test_constants_follow_the_code():
    assert memory.GROWTH_TOKENS == PackedKVLayer.GROWTH_TOKENS
    assert memory.CLIP_SAMPLE_ROWS == quantize.CLIP_SAMPLE_ROWS
    from rptq_cli.points import STAT_POINTS
    assert tuple(f.name for f in dataclasses.fields(memory.Groups)) == STAT_POINTS  # one count per calibrated point


def test_big_configs_offline():
    llama = model_shapes(memory.read_config("llama-70b"))
    assert (llama.layers, llama.hidden, llama.intermediate, llama.n_heads, llama.n_kv, llama.vocab) == \
        (80, 8192, 28672, 64, 8, 32000)
    assert 68.9e9 < llama.params < 69.1e9  # Llama-2-70b: 68.98B
    opt = model_shapes(memory.read_config("opt-66b"))
    assert (opt.layers, opt.hidden, opt.intermediate, opt.n_heads, opt.vocab) == (64, 9216, 36864, 72, 50272)
    assert 65.5e9 < opt.params < 66.5e9
    w4 = sum(checkpoint_bytes(llama, QuantConfig(wbits=4)).values())
    assert 0.25 < w4 / memory.fp16_bytes(llama) < 0.28  # 4 bits + scales, zeros and fp16 embeddings


# ------------------------------------------------------------------------------------------ the command


def run(*args):
    return CliRunner().invoke(main, ["memory", *map(str, args)])


def test_cli_table_for_a_local_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_config("llama", **LLAMA).to_dict()))
    result = run(tmp_path / "m", "--config", "w4a4kv", "--batch", "2", "--seqlen", "64", "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.output
    assert "W4A4KV" in result.output and "KV cache" in result.output and "peak of rptq quantize" in result.output
    data = json.loads((tmp_path / "o.json").read_text())
    shapes = model_shapes(json.loads((tmp_path / "m" / "config.json").read_text()))
    assert data["columns"]["W4A4KV"]["KV cache"] == kv_bytes(shapes, 2, 64, 4)
    assert data["columns"]["FP16"]["weights"] == 2 * shapes.params
    result = run(tmp_path / "m" / "config.json", "--wbits", "3", "--weight-groups", "32")  # a config.json path
    assert result.exit_code == 0 and "W3A16" in result.output, result.output
    result = run(tmp_path / "m", "--weight-groups", "32", "--json", tmp_path / "o.json", "--force")  # paper's columns
    assert result.exit_code == 0, result.output
    columns = json.loads((tmp_path / "o.json").read_text())["columns"]
    assert {"FP16", "W4A16", "W4A4KV", "W3A3KV"} <= set(columns)
    assert json.loads((tmp_path / "o.json").read_text())["configs"]["W4A16"]["weight_groups"] == 32
    assert_user_error(run(tmp_path / "m", "--json", tmp_path / "m" / "config.json"), "config.json")  # not ours


@pytest.mark.parametrize("name", ["llama-70b", "opt-66b"])
def test_cli_big_models_without_weights(name):
    result = run(name)
    assert result.exit_code == 0, result.output
    for label in ("FP16", "W4A16", "W4A4KV", "W3A3KV"):
        assert label in result.output


def test_cli_errors(tmp_path):
    assert_user_error(run(tmp_path / "nowhere" / "config.json"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run(tmp_path / "empty"), "no config.json")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_user_error(run(tmp_path / "gpt2"), "unsupported architecture", "GPT2LMHeadModel")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    assert_user_error(run(tmp_path / "odd"), "unsupported architecture")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert_user_error(run(tmp_path / "bad"), "cannot read")


def test_quantize_peak_is_the_largest_phase():
    """A Llama-7B shape (benchmarks/big_model.py): the peak is one phase's sum, the shards are never in memory,
    and GPTQ holds four [K, K] buffers of the linear it quantizes."""
    from transformers import LlamaConfig
    shapes = model_shapes(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, tie_word_embeddings=False).to_dict())
    config = QuantConfig(wbits=4, abits=16)
    phases = memory.quantize_phases(shapes, config, nsamples=8, seqlen=512)
    assert set(phases) == {"embed", "calibrate", "GPTQ", "write"}
    peak = memory.quantize_peak(shapes, config, nsamples=8, seqlen=512)
    assert sum(peak.values()) == max(sum(t.values()) for t in phases.values())
    assert not any("shard" in term for t in phases.values() for term in t)
    down = memory.gptq_step(shapes, config, len(shapes.linears) - 1)
    assert down["GPTQ workspace"] == 4 * 4 * 11008**2 + 4 * 4096 * 11008 and down["GPTQ Hessians"] == 0
    assert sum(phases["GPTQ"].values()) >= sum(down.values())
    assert memory.quantize_phases(shapes, QuantConfig(wbits=4, abits=16, weight_quantizer="rtn"), 8, 512).keys() \
        == {"embed", "calibrate", "write"}
