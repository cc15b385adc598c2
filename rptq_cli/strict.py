"""Strict loading: a model is read whole or refused, never completed with random values.

transformers' lenient loading fills a missing tensor with a fresh random init and carries on, which
turns a damaged or mistaken input into a silently wrong model. These checks run around every load:

- :func:`require_fp_source` before an FP load: names an rptq checkpoint, a foreign quantized model, or an
  rptq checkpoint whose config.json lost its ``quantization_config``, instead of loading it as FP;
- :func:`require_complete` after it: every tensor the architecture needs was in the files, with its shape,
  and nothing else was;
- :func:`require_tokenizer`: a directory without tokenizer files yields an empty tokenizer (no error), which
  would tokenize any text to nothing.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .errors import RptqError

QUANT_METHOD = "rptq"
FILE_TAG = "rptq_format_version"  # safetensors metadata key that marks rptq weight files (export.py writes it)
SHOWN_NAMES = 3  # a message names the first few offenders, then says how many there are


def quant_method(directory: Path) -> str | None:
    """The ``quantization_config.quant_method`` recorded in ``directory/config.json`` (None when absent)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
        return qc.get("quant_method") or ("unknown" if qc else None)
    return None


def has_rptq_weights(directory: Path) -> bool:
    """True when a safetensors file of ``directory`` carries the rptq file tag (packed checkpoint weights)."""
    from safetensors import safe_open
    for file in sorted(directory.glob("*.safetensors")):
        with contextlib.suppress(Exception):  # unreadable files are reported by the load that follows
            with safe_open(str(file), "pt") as f:
                if FILE_TAG in (f.metadata() or {}):
                    return True
    return False


def require_fp_source(name: str, directory: Path | None) -> None:
    """Refuse a quantized model where an FP model is expected, saying what it is."""
    if directory is None or not directory.is_dir():
        return
    method = quant_method(directory)
    if method == QUANT_METHOD:
        source = _recorded_source(directory)
        hint = f"pass its FP source ({source})" if source else "pass the FP model it was made from"
        raise RptqError(f"{name} is an rptq checkpoint, not an FP model; {hint}, or use `rptq eval`/`rptq generate` "
                        "on the checkpoint itself")
    if method is not None:
        raise RptqError(f"{name} is a {method!r}-quantized model; rptq reads FP models (safetensors) and its own "
                        "checkpoints only: pass the FP model it was made from")
    if has_rptq_weights(directory):
        raise RptqError(f"{name} holds rptq packed weights but its config.json has no quantization_config (edited or "
                        "replaced?); restore the checkpoint's config.json or re-run `rptq quantize`")


def require_not_foreign_checkpoint(name: str, directory: Path) -> None:
    """Where an rptq checkpoint is expected: name what was given instead."""
    method = quant_method(directory)
    if method is not None and method != QUANT_METHOD:
        raise RptqError(f"{name} is a {method!r}-quantized model, not an rptq checkpoint; rptq reads FP models and "
                        "its own checkpoints only")
    if method is None and has_rptq_weights(directory):
        raise RptqError(f"{name} holds rptq packed weights but its config.json has no quantization_config (edited or "
                        "replaced?); restore the checkpoint's config.json or re-run `rptq quantize`")


def _recorded_source(directory: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((directory / "rptq.json").read_text()).get("source_model")
    return None


def _first_names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def require_complete(info: dict, name: str) -> None:
    """Refuse a load whose ``output_loading_info`` shows missing, unexpected or mis-shaped tensors."""
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or ()]
    if missing:
        raise RptqError(f"model {name} is missing {len(missing)} tensor(s) its architecture needs "
                        f"({_first_names(missing)}); the files are incomplete or of another model: nothing was "
                        "initialized at random, fix the model files")
    if mismatched:
        raise RptqError(f"model {name} has tensor(s) whose shape does not match its config.json "
                        f"({_first_names(mismatched)}); the weights belong to another model")
    if unexpected:
        raise RptqError(f"model {name} holds {len(unexpected)} tensor(s) its architecture does not use "
                        f"({_first_names(unexpected)}); the weights belong to another model or format")
    if info.get("error_msgs"):
        raise RptqError(f"model {name} did not load cleanly: {str(info['error_msgs'][0]).splitlines()[0]}")


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names an FP parameter may be stored in


def require_float_weights(directory: Path | None, parameter_names: set[str], name: str) -> None:
    """transformers casts whatever it reads to the model dtype, so int8 bytes would load as 'weights'."""
    from safetensors import safe_open
    if directory is None:
        return
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if key in parameter_names and dtype not in FLOAT_DTYPES:
                    raise RptqError(f"model {name} stores parameter {key} as {dtype}, not as floating point "
                                    f"({file.name}); the weights are corrupted or of another format")


def require_tokenizer(tokenizer, name: str) -> None:
    """A directory without tokenizer files loads as a tokenizer that knows only special tokens."""
    vocab = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else len(tokenizer)
    if vocab <= len(set(getattr(tokenizer, "all_special_tokens", []))):
        raise RptqError(f"{name} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); copy the "
                        "tokenizer of its source model into it")
