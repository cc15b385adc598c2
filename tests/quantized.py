"""Tiny quantized checkpoints for tests: a random tiny model with outliers, quantized and saved by rptq."""
from __future__ import annotations

from pathlib import Path

import torch

from rptq_cli.config import QuantConfig
from rptq_cli.export import save_quantized
from rptq_cli.models import family_for
from rptq_cli.outliers import inject_outliers
from rptq_cli.quantize import quantize_model
from tiny import build_model, build_tokenizer, corpus_text

SMALL = dict(R1=8, R2=2, R3=2, R4=8, R5=8)  # clusters per reorder point for 64-channel models

# (family, config, model shape): one per family the tests of other runtimes need
FAMILIES = {
    "opt": (QuantConfig(wbits=4, abits=16, clusters=SMALL), dict(hidden=64, heads=2)),
    "llama": (QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL), dict(hidden=64, heads=4, kv_heads=2, ffn=96)),
    "qwen2": (QuantConfig(wbits=4, abits=8, mode="token", clusters=SMALL), dict(hidden=64, heads=2, kv_heads=1, ffn=96)),
}


def corpus_ids(tokenizer) -> torch.Tensor:
    """The carried corpus as token ids [1, T]."""
    return tokenizer(corpus_text(), return_tensors="pt").input_ids


def simulated(family: str, config: QuantConfig, **cfg):
    """(model with simulated quantization, tokenizer): fp16-exact weights, two outlier channels, 6x48 tokens."""
    tok = build_tokenizer()
    model = build_model(family, vocab=len(tok), **cfg)
    fam = family_for(model.config)
    inject_outliers(model, fam, channels=2)
    for p in model.parameters():  # the rescale leaves values fp16 can't hold; the checkpoint stores fp16
        p.data.copy_(p.data.half().float())
    tokens = corpus_ids(tok)[0]
    calib = torch.stack([tokens[i * 48:(i + 1) * 48] for i in range(6)])
    quantize_model(model, fam, calib, config, progress=False, seed=1)
    return model, tok


def quantized_checkpoint(path: Path, family: str, config: QuantConfig | None = None, **cfg) -> Path:
    """Write an rptq checkpoint of a tiny ``family`` model to ``path`` (FAMILIES' config and shape by default)."""
    if config is None:
        config, shape = FAMILIES[family]
        cfg = {**shape, **cfg}
    model, tok = simulated(family, config, **cfg)
    return save_quantized(model, tok, config, path, provenance={"source_model": f"tiny-{family}"})
