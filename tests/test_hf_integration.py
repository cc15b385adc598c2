"""`import rptq_cli` makes transformers' AutoModelForCausalLM.from_pretrained load rptq checkpoints packed,
equal to rptq_cli.load_quantized; plain transformers refuses them instead of loading them as FP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import rptq_cli
from rptq_cli.errors import RptqError
from rptq_cli.models import family_for
from rptq_cli.nn.linear import QuantLinear
from rptq_cli.nn.kv_cache import FloatKVLayer, PackedKVLayer
from rptq_cli.nn.norm import ReorderNorm
from quantized import FAMILIES, quantized_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@torch.no_grad()
def test_from_pretrained_equals_load_quantized(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref, tok = rptq_cli.load_quantized(checkpoint)
    fam = family_for(model.config)
    layer = fam.decoder_layers(model)[0]
    assert isinstance(layer.get_submodule(fam.q), QuantLinear)
    assert isinstance(layer.get_submodule(fam.attn_norm), ReorderNorm)
    assert model.config._attn_implementation == "rptq"
    assert model.rptq_config.to_dict() == ref.rptq_config.to_dict()
    ids = tok("the quick brown fox jumps over the lazy dog " * 3, return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, ref(ids).logits)

    prompt, new = ids[:, :8], 16
    cache = rptq_cli.PackedKVCache.from_model(model, max_length=prompt.shape[1] + new)
    packed = model.rptq_config.act_bits("k") < 16  # else K/V stay float, in preallocated buffers
    assert all(type(layer) is (PackedKVLayer if packed else FloatKVLayer) for layer in cache.layers)
    got = model.generate(prompt, max_new_tokens=new, do_sample=False, past_key_values=cache)
    expected = ref.generate(prompt, max_new_tokens=new, do_sample=False,
                            past_key_values=rptq_cli.PackedKVCache.from_model(ref, prompt.shape[1] + new))
    assert torch.equal(got, expected)
    if not packed:  # the same tokens as on transformers' own DynamicCache
        assert torch.equal(got, ref.generate(prompt, max_new_tokens=new, do_sample=False))


@torch.no_grad()
def test_default_dtype_is_the_checkpoints_and_device_map_places_it(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu")
    assert model.dtype == torch.float16
    ref, tok = rptq_cli.load_quantized(checkpoint, dtype=torch.float16)
    ids = tok("a short prompt", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_damaged_checkpoint_is_refused(tmp_path):
    path = quantized_checkpoint(tmp_path / "ckpt", "opt")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RptqError, match="does not match the SHA-256"):
        AutoModelForCausalLM.from_pretrained(path)


def test_plain_transformers_refuses_and_names_the_import(tmp_path):
    path = quantized_checkpoint(tmp_path / "ckpt", "opt")
    run = python(f"import transformers as t; t.AutoModelForCausalLM.from_pretrained({str(path)!r}); print('LOADED')")
    assert run.returncode != 0 and "LOADED" not in run.stdout
    assert "import rptq_cli" in run.stderr.strip().splitlines()[-1]


def test_import_is_light_and_registers_when_transformers_loads():
    run = python("import sys, rptq_cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
                 "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; assert 'rptq' in m\n"
                 "print(rptq_cli.PackedKVCache.__name__)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "PackedKVCache"
