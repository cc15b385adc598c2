"""GGUF files as a model source: dequantized once to an fp16 Hugging Face directory in a cache.

A ``.gguf`` file given as MODEL goes through transformers' GGUF loader (the ``gguf`` package) and is
written as a plain fp16 model directory (config, safetensors, tokenizer) under the cache, keyed by the
file's SHA-256; every later command reads that directory like any other local model. The weights of a
GGUF are usually already quantized (Q4_1, Q8_0, ...): requantizing them with rptq is for testing on a real
pretrained model, not a way to build a production checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import RptqError

CACHE_ENV = "RPTQ_CACHE"
HASH_CHUNK = 1 << 20


def cache_root() -> Path:
    """``$RPTQ_CACHE``, else ``$XDG_CACHE_HOME/rptq``, else ``~/.cache/rptq``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rptq"


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write ``gguf_path`` as an fp16 HF model directory at ``out_dir`` (atomically: temp dir, then rename)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise RptqError("reading a .gguf file needs the gguf package; pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float16,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RptqError(f"cannot read GGUF file {gguf_path}: {first}") from None
    # the GGUF quantization is undone: the directory is a plain fp16 model
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"dequantized from {gguf_path.name} (sha256 {out_dir.name}) by rptq\n")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_gguf(name: str) -> str:
    """The fp16 HF directory of a ``.gguf`` MODEL (converted on first use); other names unchanged."""
    if not is_gguf(name):
        return name
    path = Path(name).expanduser()
    if not path.is_file():
        raise RptqError(f"GGUF file {name} does not exist; pass an existing .gguf file or a model directory")
    out_dir = cache_root() / "gguf" / file_sha256(path)
    if not (out_dir / "config.json").is_file():
        print(f"note: dequantizing {path.name} to fp16 in {out_dir} (once). Its weights were already quantized "
              "by GGUF: requantizing them is for testing rptq on a real model.", flush=True)
        dequantize_gguf(path, out_dir)
    return str(out_dir)
