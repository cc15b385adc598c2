"""--device-map and --max-memory (issue 11): a model spread with accelerate computes exactly what it computes on one
device, and bad maps or budgets are refused in one line before anything is written.

This machine may have no GPU, so the split that exercises accelerate's hooks is CPU + disk: the layers on disk sit
on the meta device and are read back from the offload folder for every forward.
"""
import hashlib
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

from cli_run import assert_user_error, run
from quantized import quantized_checkpoint
from rptq_cli.errors import RptqError
from rptq_cli.evaluate import perplexity
from rptq_cli.export import load_quantized
from rptq_cli.loading import load_model, parse_max_memory, place_model
from rptq_cli.models import family_for
from tiny import corpus_text, save_tiny

LAYERS = 4
SEQLEN = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Four-layer tiny models: packed checkpoints (OPT W4A16; Llama W4A4KV, post-RoPE R2 gather and packed KV cache)
    and an FP Llama."""
    root = tmp_path_factory.mktemp("device-map")
    return {"packed-opt": quantized_checkpoint(root / "packed-opt", "opt", layers=LAYERS),
            "packed-llama": quantized_checkpoint(root / "packed-llama", "llama", layers=LAYERS),
            "fp-llama": save_tiny(root / "fp-llama", "llama", heads=4, kv_heads=2, layers=LAYERS)}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(corpus_text()[:1500])
    return path


def half_on_disk(path: Path, prefix: str, others: dict) -> Path:
    """A map file: layers 0 and 2 on the CPU, 1 and 3 on disk, and ``others`` as given."""
    layers = {f"{prefix}.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(LAYERS)}
    path.write_text(json.dumps({**others, **layers}))
    return path


MAPS = {  # the embeddings of the Llamas on disk too: inputs must go to the main device, not to their meta weights
    "opt": ("model.decoder.layers", {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                                     "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu"}),
    "llama": ("model.layers", {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu",
                               "lm_head": "disk"}),
}


def map_file(tmp_path: Path, kind: str) -> Path:
    return half_on_disk(tmp_path / "map.json", *MAPS[kind.rpartition("-")[2]])


def ppl_line(result) -> str:
    """``LABEL  wikitext: ppl 384.441  (9 windows × 64)`` of ``MODEL  LABEL  wikitext: ppl …``."""
    assert result.exit_code == 0, result.output
    return re.search(r"\w+  wikitext: ppl [0-9.]+  \(\d+ windows × \d+\)", result.output).group(0)


def load(path: Path):
    if path.name.startswith("packed"):
        return load_quantized(path, verify=False)[0]
    return load_model(str(path))[0]


@pytest.mark.parametrize("kind", ["packed-opt", "packed-llama", "fp-llama"])
def test_layers_on_disk_are_offloaded_and_compute_the_same(models, text, tmp_path, tiny_tokenizer, kind):
    """After placement the disk layers hold no weights (meta), a hook loads them for each forward, and the
    perplexity is exactly the one of the model in memory."""
    tokens = tiny_tokenizer(text.read_text(), return_tensors="pt").input_ids
    reference = perplexity(load(models[kind]), tokens, seqlen=SEQLEN, progress=False)
    model = load(models[kind])
    family = family_for(model.config)
    device_map = json.loads(map_file(tmp_path, kind).read_text())
    main = place_model(model, family, device_map, offload_dir=str(tmp_path / "offload"))
    assert main == torch.device("cpu")
    layers = family.decoder_layers(model)
    for i, layer in enumerate(layers):
        on_disk = i % 2 == 1
        assert layer._hf_hook.offload == on_disk
        assert all((t.device.type == "meta") == on_disk for t in layer.state_dict().values())
    assert any(p.stat().st_size for p in (tmp_path / "offload").iterdir())  # the disk layers' tensors were written there
    assert perplexity(model, tokens, seqlen=SEQLEN, progress=False) == reference


@pytest.mark.parametrize("kind", ["packed-opt", "packed-llama", "fp-llama"])
def test_eval_with_a_split_map_gives_the_same_perplexity(models, text, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the offload folder goes
    plain = ppl_line(run("eval", models[kind], "--data-path", text, "--seqlen", SEQLEN, "--no-verify"))
    result = run("eval", models[kind], "--data-path", text, "--seqlen", SEQLEN, "--no-verify",
                 "--device-map", map_file(tmp_path, kind))
    assert ppl_line(result) == plain
    assert re.search(r"device map \(.*\): cpu: .*layers 0, 2 .*; disk: .*layers 1, 3 ", result.output), result.output
    assert not list(tmp_path.glob("rptq-offload-*"))  # the offload folder is gone


def test_auto_map_within_max_memory_spills_to_disk(models, text, tmp_path, monkeypatch):
    """accelerate's own map: the CPU budget takes the embeddings and a layer, the rest goes to disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    plain = ppl_line(run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--no-verify"))
    for kind in ("auto", "balanced"):
        result = run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--no-verify",
                     "--device-map", kind, "--max-memory", "cpu=200KiB,disk=1GB")
        assert ppl_line(result) == plain
        assert re.search(r"cpu: .*layers 0 .*; disk: layers 1-3 ", result.output), result.output
    assert not list(tmp_path.glob("rptq-offload-*"))


def test_generate_with_a_split_map_gives_the_same_tokens(models, tmp_path):
    """The packed KV cache of the W4A4KV Llama takes its scales from layers that live on disk between forwards."""
    args = ("generate", models["packed-llama"], "the model", "--max-new-tokens", 12, "--no-verify")
    plain = run(*args)
    assert plain.exit_code == 0, plain.output
    split = run(*args, "--device-map", map_file(tmp_path, "packed-llama"))
    assert split.exit_code == 0, split.output
    assert split.stdout == plain.stdout


def checkpoint_digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_max_memory_too_small_for_one_layer(models, text, tmp_path, monkeypatch):
    """One line naming the smallest layer's size and the fix, exit 2; no --json, no evaluation recorded in the
    checkpoint, no offload folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = checkpoint_digest(models["packed-opt"])
    out = tmp_path / "results.json"
    result = run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--json", out,
                 "--device-map", "auto", "--max-memory", "cpu=10KiB,disk=1GB")
    assert_user_error(result, "smallest (model.decoder.layers.0) takes", "KiB", "--max-memory cpu=")
    assert not out.exists() and not list(tmp_path.glob("rptq-offload-*"))
    assert checkpoint_digest(models["packed-opt"]) == before


def test_max_memory_that_leaves_modules_without_a_device(models, text):
    result = run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--device-map", "auto",
                 "--max-memory", "cpu=150KiB")
    assert_user_error(result, "does not fit --max-memory cpu=150KiB", "disk=")
    result = run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--device-map", "auto",
                 "--max-memory", "cpu=60KiB,disk=1GB")
    assert_user_error(result, "leaves the whole model", "on disk")


def test_parse_max_memory():
    assert parse_max_memory("cpu=1.5GB,disk=10MiB") == {"cpu": 1_500_000_000, "disk": 10 * 2**20}
    assert parse_max_memory("cpu=1024") == {"cpu": 1024}
    if torch.cuda.is_available():
        assert parse_max_memory("0=70GiB,cpu=100GiB") == {0: 70 * 2**30, "cpu": 100 * 2**30}


@pytest.mark.parametrize("spec, words", [
    ("cpu", ["'cpu'", "DEVICE=SIZE"]),
    ("=1GiB", ["'=1GiB'", "DEVICE=SIZE"]),
    ("cpu=lots", ["'lots' is not a size"]),
    ("tpu=1GiB", ["'tpu' is not a device"]),
    ("cpu=1GiB,cpu=2GiB", ["names cpu twice"]),
    ("99=1GiB", ["GPU 99 does not exist"]),
])
def test_bad_max_memory(models, spec, words):
    with pytest.raises(RptqError, match=re.escape(words[0])):
        parse_max_memory(spec)
    assert_user_error(run("eval", models["packed-opt"], "--device-map", "auto", "--max-memory", spec), *words)


@pytest.mark.parametrize("edit, words", [
    (lambda m: {**m, "model.decoder.layer.9": "cpu"}, ["'model.decoder.layer.9'", "does not have",
                                                       "model.decoder.layers.0 … model.decoder.layers.3"]),
    (lambda m: {**m, "lm_head": "tpu"}, ["module 'lm_head'", "'tpu' is not a device"]),
    (lambda m: {**m, "lm_head": 7}, ["GPU 7 does not exist"]),
    (lambda m: {k: v for k, v in m.items() if k != "model.decoder.layers.3"},
     ["no device for", "model.decoder.layers.3."]),
    (lambda m: {**{k: v for k, v in m.items() if k != "model.decoder.layers.1"},
                "model.decoder.layers.1.self_attn": "cpu", "model.decoder.layers.1.fc1": "disk"},
     ["part of decoder layer model.decoder.layers.1", "as a whole"]),
    (lambda m: {**m, "model.decoder": "cpu"}, ["places both 'model.decoder' and", "once"]),
    (lambda m: {"": "disk"}, ["whole model", "one by one"]),
    (lambda m: [], ["JSON object"]),
])
def test_bad_device_map_file(models, text, tmp_path, edit, words):
    prefix, others = MAPS["opt"]
    path = half_on_disk(tmp_path / "map.json", prefix, others)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    out = tmp_path / "results.json"
    result = run("eval", models["packed-opt"], "--data-path", text, "--seqlen", SEQLEN, "--json", out,
                 "--device-map", path)
    assert_user_error(result, str(path), *words)
    assert not out.exists()


def test_device_map_file_that_is_not_json(models, tmp_path):
    path = tmp_path / "map.json"
    path.write_text("{model.layers.0: cpu")
    assert_user_error(run("eval", models["packed-opt"], "--device-map", path), "cannot read it as JSON")
    assert_user_error(run("eval", models["packed-opt"], "--device-map", tmp_path / "absent.json"),
                      "neither auto nor balanced nor a JSON file")


def test_flags_that_do_not_go_together(models, tmp_path):
    ckpt = models["packed-opt"]
    path = map_file(tmp_path, "packed-opt")
    assert_user_error(run("eval", ckpt, "--device", "cpu", "--device-map", "auto"), "--device and --device-map")
    assert_user_error(run("generate", ckpt, "hi", "--max-memory", "cpu=1GiB"), "add --device-map auto")
    assert_user_error(run("eval", ckpt, "--device-map", path, "--max-memory", "cpu=1GiB"),
                      "places every module itself")
    assert_user_error(run("eval", ckpt, "--device-map", "auto", "--report", tmp_path / "r.json"),
                      "--report measures the model on one device")
    assert not (tmp_path / "r.json").exists()
