"""Models in: a hub id or a local directory → (model, tokenizer, family), with errors a user can act on."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import RptqError
from .gguf_source import resolve_gguf
from .models import Family, family_for
from .strict import require_complete, require_float_weights, require_fp_source, require_tokenizer

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(spec: str = "auto") -> torch.device:
    """auto → the first GPU if there is one, else the CPU; cuda[:N] must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RptqError(f"--device {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RptqError(f"--device {spec} asked for a GPU but torch sees none; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RptqError(f"--device {spec!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto → float32 on the CPU (fp16 matmuls are slow there), float16 on a GPU."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise RptqError(f"--dtype {spec!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_config(name: str):
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise RptqError(f"model directory {name} does not exist; pass a local model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()) if _looks_local(name) else name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RptqError(f"cannot load model {name!r}: {first}; pass a local directory with config.json "
                        "or a hub id reachable from this machine") from None


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, Family]:
    """The FP model on the CPU in ``dtype``, its tokenizer and its family adapter (a ``.gguf`` file is read
    through its dequantized fp16 copy in the cache)."""
    name = resolve_gguf(name)
    local = Path(name).expanduser() if _looks_local(name) else None
    require_fp_source(name, local)
    config = load_config(name)
    family = family_for(config)
    path = str(local) if local is not None else name
    try:
        with quiet_transformers():  # its load report would add lines; require_complete says what matters
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RptqError(f"cannot load model {name!r}: {first}; the files are truncated, corrupted or missing") from None
    require_complete(info, name)
    require_float_weights(local, {key for key, _ in model.named_parameters()}, name)
    require_tokenizer(tokenizer, name)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, family


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging for the duration (our own checks report what went wrong)."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def default_seqlen(config) -> int:
    """GPTQ's 2048, or the model's maximum positions when shorter."""
    return min(2048, getattr(config, "max_position_embeddings", 2048) or 2048)
