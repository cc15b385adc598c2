"""Layer streaming (issue 11): the FP model is read tensor by tensor from its safetensors shards, the packed
checkpoint is written shard by shard, and both give exactly what the whole-model paths gave."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rptq_cli import export
from rptq_cli.config import QuantConfig
from rptq_cli.errors import RptqError
from rptq_cli.loading import INDEX_NAME, WeightFiles, load_model, open_model
from tiny import build_model, build_tokenizer

FAMILIES = {"opt": {}, "llama": {"heads": 4, "kv_heads": 2}, "qwen2": {"heads": 4, "kv_heads": 2}}


def save_sharded(path: Path, family: str, max_shard_size: str = "20KB", **cfg) -> Path:
    """A tiny model written by transformers in several shards with their index."""
    tok = build_tokenizer()
    model = build_model(family, vocab=len(tok), **{**FAMILIES[family], **cfg})
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def sharded(request, tmp_path_factory):
    return save_sharded(tmp_path_factory.mktemp(f"sharded-{request.param}"), request.param)


def test_sharded_source_is_sharded(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_load_equals_transformers(sharded, dtype):
    """Same tensors, dtypes, tied embeddings, computed buffers (RoPE inv_freq) and logits as from_pretrained."""
    reference = AutoModelForCausalLM.from_pretrained(sharded, dtype=dtype).eval()
    model, _, _ = load_model(str(sharded), dtype)
    assert list(model.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    buffers = dict(reference.named_buffers())
    for name, b in model.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_materialize_and_release_one_layer(sharded):
    streamed = open_model(str(sharded))
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    prefix = f"{streamed.family.layers}.1"
    layer = streamed.materialize(prefix)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in layer.parameters())
    others = [p for n, p in streamed.model.named_parameters() if not n.startswith(prefix + ".")]
    assert others and all(p.device.type == "meta" for p in others)
    streamed.release(prefix)
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert streamed.materialize(prefix) is layer and all(p.device.type == "cpu" for p in layer.parameters())


def test_reads_one_tensor_at_a_time(sharded, monkeypatch):
    """Never the whole file: safetensors' load_file is not used, and each read returns one tensor."""
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read a whole file"))
    files = WeightFiles(sharded)
    key = sorted(files.names())[0]
    assert tuple(files.read(key).shape) == files.shape_of[key]


def test_checkpoint_of_the_bare_model(tmp_path):
    """Files saved from the bare model (facebook/opt-*: ``decoder.…`` without ``model.``) load the same."""
    from safetensors.torch import load_file
    src = save_sharded(tmp_path / "src", "opt", max_shard_size="10GB")
    tensors = load_file(src / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    model, _, _ = load_model(str(src))
    for key, value in tensors.items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture()
def damaged(sharded, tmp_path):
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def _index(directory: Path) -> dict:
    return json.loads((directory / INDEX_NAME).read_text())


def _one_line_error(directory: Path, *words):
    with pytest.raises(RptqError) as info:
        load_model(str(directory))
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_missing_shard(damaged):
    shard = sorted(set(_index(damaged)["weight_map"].values()))[-1]
    (damaged / shard).unlink()
    _one_line_error(damaged, shard, "is missing")


def test_truncated_shard(damaged):
    shard = sorted(set(_index(damaged)["weight_map"].values()))[0]
    data = (damaged / shard).read_bytes()
    (damaged / shard).write_bytes(data[: len(data) // 2])
    _one_line_error(damaged, shard, "truncated")


def test_index_names_a_tensor_no_shard_holds(damaged):
    index = _index(damaged)
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (damaged / INDEX_NAME).write_text(json.dumps(index))
    _one_line_error(damaged, "model.layers.9.mlp.up_proj.weight", shard, "does not hold it")


def test_index_missing_a_tensor_is_refused(damaged):
    index = _index(damaged)
    key = sorted(index["weight_map"])[-1]
    del index["weight_map"][key]
    (damaged / INDEX_NAME).write_text(json.dumps(index))
    _one_line_error(damaged, key, "missing", "nothing was initialized at random")


def test_bin_only_directory(damaged):
    for f in [*damaged.glob("*.safetensors"), damaged / INDEX_NAME]:
        f.unlink()
    (damaged / "pytorch_model.bin").write_bytes(b"\0" * 16)
    _one_line_error(damaged, ".bin", "safetensors")


def test_cli_exit_code_for_bad_shard(damaged, tmp_path):
    from click.testing import CliRunner
    from rptq_cli.cli import main
    shard = sorted(set(_index(damaged)["weight_map"].values()))[-1]
    (damaged / shard).unlink()
    text = tmp_path / "t.txt"
    text.write_text("The river flows. " * 50)
    result = CliRunner().invoke(main, ["eval", str(damaged), "--data-path", str(text), "--seqlen", "32"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and shard in errors[0] and "Traceback" not in result.output, result.output


# ------------------------------------------------------------------------------------------ shard writer


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(export.SAFETENSORS_DTYPES):
        if dtype in (torch.uint16, torch.uint32, torch.uint64):
            values = torch.randint(0, 200, (3, 5), generator=g).to(dtype)
        else:
            values = (torch.randn(3, 5, generator=g) * 50).to(dtype)
        tensors[f"t{(7 * i) % 11}.{dtype}".replace("torch.", "")] = values
    tensors.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4, dtype=torch.int32),
                    "layers.0.a": torch.arange(7, dtype=torch.float16),
                    "layers.0.b": torch.arange(3, dtype=torch.float16),
                    "noncontiguous": torch.randn(4, 6, generator=g).T})
    return tensors


@pytest.mark.parametrize("order,copy", [("sorted", "kernel"), ("reversed", "kernel"), ("reversed", "buffer")])
def test_writer_bytes_equal_save_file(tmp_path, monkeypatch, order, copy):
    """One shard: the same bytes as safetensors' save_file for the same tensors, whatever the arrival order."""
    if copy == "buffer":  # a system without copy_file_range
        monkeypatch.delattr("os.copy_file_range")
    tensors = _all_dtype_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "reference.safetensors",
              metadata={export.FILE_TAG: "1"})
    (tmp_path / "new").mkdir()
    writer = export.ShardWriter(tmp_path / "new", metadata={export.FILE_TAG: "1"})
    for key in sorted(tensors, reverse=order == "reversed"):
        writer.add(key, tensors[key])
    assert writer.finish() == [tmp_path / "new" / export.WEIGHTS_NAME]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [export.WEIGHTS_NAME]  # no spill left
    assert (tmp_path / "new" / export.WEIGHTS_NAME).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_shards_like_transformers(tmp_path):
    """Several shards: transformers' names and index, each shard the bytes save_file writes for its tensors."""
    tensors = {f"layers.{i}.w": torch.full((64,), float(i)) for i in range(10)}  # 256 bytes each
    writer = export.ShardWriter(tmp_path, max_shard_bytes=600)
    for key, value in tensors.items():
        writer.add(key, value)
    files = writer.finish()
    assert [f.name for f in files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 10 * 256
    assert index["weight_map"]["layers.0.w"] == "model-00001-of-00005.safetensors"
    assert index["weight_map"]["layers.9.w"] == "model-00005-of-00005.safetensors"
    for file in files:
        held = {k: tensors[k] for k, f in index["weight_map"].items() if f == file.name}
        save_file(held, tmp_path / "reference")
        assert file.read_bytes() == (tmp_path / "reference").read_bytes()
    files = WeightFiles(tmp_path)
    assert all(torch.equal(files.read(k), v) for k, v in tensors.items())


def test_checkpoint_bytes_unchanged(tmp_path):
    """save_quantized writes what save_file wrote for the whole dict before the streaming writer."""
    from test_export import SMALL, save, simulated
    config = QuantConfig(wbits=4, abits=4, clusters=SMALL)
    model, tok = simulated("llama", config, hidden=64, heads=4, kv_heads=2, ffn=96)
    save(model, tok, config, tmp_path / "q")
    save_file(export.checkpoint_tensors(model), tmp_path / "reference", metadata={export.FILE_TAG: "1"})
    assert (tmp_path / "q" / export.WEIGHTS_NAME).read_bytes() == (tmp_path / "reference").read_bytes()


def test_sharded_checkpoint_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """load_quantized takes each tensor from its shard when it needs it, never a whole file."""
    from test_export import SMALL, save, simulated
    import safetensors.torch
    config = QuantConfig(wbits=4, abits=8, clusters=SMALL)
    model, tok = simulated("opt", config, hidden=64, heads=2)
    save(model, tok, config, tmp_path / "q", max_shard_bytes=20_000)
    assert not (tmp_path / "q" / export.WEIGHTS_NAME).exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "q").iterdir())
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read a whole file"))
    reads = []
    real_read = WeightFiles.read
    monkeypatch.setattr(WeightFiles, "read", lambda self, key: reads.append(key) or real_read(self, key))
    loaded, _ = export.load_quantized(tmp_path / "q")
    assert len(reads) == len(set(reads)) == len(WeightFiles(tmp_path / "q").names())
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=1e-3, atol=1e-3)


def test_checkpoint_with_missing_shard(tmp_path):
    from test_export import SMALL, save, simulated
    config = QuantConfig(wbits=4, abits=8, clusters=SMALL)
    model, tok = simulated("opt", config, hidden=64, heads=2)
    save(model, tok, config, tmp_path / "q", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "q").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(RptqError, match=f"{shard.name} named in .* is missing"):
        export.load_quantized(tmp_path / "q", verify=False)


# ------------------------------------------------------------------------------------------ streamed quantization


def _calibration_tokens(directory: Path) -> torch.Tensor:
    from tiny import corpus_text
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(directory)(corpus_text(), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * 48:(i + 1) * 48] for i in range(4)])


STREAM_CONFIGS = {  # an 8-bit head, read from the files: tied (OPT) and untied (Llama)
    "opt": QuantConfig(wbits=4, abits=4, clusters=dict(R1=8, R2=2, R3=2, R4=8, R5=8), head_bits=8),
    "llama": QuantConfig(wbits=4, abits=8, mode="token", clusters=dict(R1=8, R2=2, R3=2, R4=8, R5=8), head_bits=8),
    "qwen2": QuantConfig(wbits=3, abits=16, weight_quantizer="rtn", clusters=dict(R1=4, R4=4, R5=4))}


def test_streamed_quantization_writes_the_in_memory_bytes(sharded, tmp_path, monkeypatch):
    """One layer in memory at a time, packed as it finishes: the same checkpoint as the whole model in memory."""
    from rptq_cli.export import CheckpointWriter, save_quantized
    from rptq_cli.loading import StreamedModel
    from rptq_cli.quantize import quantize_model
    family_name = json.loads((sharded / "config.json").read_text())["model_type"]
    config, tokens = STREAM_CONFIGS[family_name], _calibration_tokens(sharded)
    provenance = {"source_model": "tiny"}

    model, tok, family = load_model(str(sharded))
    quantize_model(model, family, tokens, QuantConfig.from_dict(config.to_dict()), progress=False, seed=3)
    save_quantized(model, tok, config, tmp_path / "memory", provenance=provenance, max_shard_bytes=40_000)

    streamed = open_model(str(sharded))
    layers = family.decoder_layers(streamed.model)
    most = []
    materialize = StreamedModel.materialize

    def counting(self, prefix=""):
        module = materialize(self, prefix)
        most.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))
        return module

    monkeypatch.setattr(StreamedModel, "materialize", counting)
    with CheckpointWriter(tmp_path / "streamed", max_shard_bytes=40_000, fetch=streamed.read) as writer:
        quantize_model(streamed, family, tokens, QuantConfig.from_dict(config.to_dict()), progress=False, seed=3,
                       writer=writer)
        assert all(t.device.type == "meta" for t in layers.state_dict().values())  # every layer released
        save_quantized(streamed.model, streamed.tokenizer, config, tmp_path / "streamed", provenance=provenance,
                       writer=writer)
    assert max(most) == 1
    for name in ("memory", "streamed"):
        assert len(list((tmp_path / name).glob("model-*.safetensors"))) > 1
    def compared(directory):  # rptq.json holds timings; the model card names its own directory
        return sorted(p.name for p in directory.iterdir() if p.name not in ("rptq.json", "README.md"))
    files = compared(tmp_path / "memory")
    assert files == compared(tmp_path / "streamed")
    for name in files:
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_failed_streamed_quantization_leaves_nothing(sharded, tmp_path, monkeypatch):
    from rptq_cli import quantize
    from rptq_cli.export import CheckpointWriter
    streamed = open_model(str(sharded))
    calls = []

    def fail_on_second_layer(module, prefix):
        calls.append(prefix)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "out") as writer:
            monkeypatch.setattr(writer, "add_module", fail_on_second_layer)
            quantize.quantize_model(streamed, streamed.family, _calibration_tokens(sharded),
                                    STREAM_CONFIGS["qwen2"], progress=False, writer=writer)
    assert list(tmp_path.iterdir()) == []


def test_quantize_releases_every_layer(sharded, tmp_path):
    """After a streamed quantization no decoder layer holds a real tensor, cached CPU scales included."""
    from rptq_cli.quantize import quantize_model
    streamed = open_model(str(sharded))
    tokens = torch.randint(0, streamed.model.config.vocab_size, (2, 16))
    with export.CheckpointWriter(tmp_path / "q", fetch=streamed.read) as writer:
        quantize_model(streamed, streamed.family, tokens, QuantConfig(wbits=4, abits=16, clusters=dict(
            R1=4, R2=2, R3=2, R4=4, R5=4)), progress=False, writer=writer)
        writer.abort()
    for layer in streamed.family.decoder_layers(streamed.model):
        assert all(t.device.type == "meta" for t in layer.state_dict().values())
        assert all(getattr(m, "_cpu_scales", None) is None for m in layer.modules())
