"""The stats file of `rptq calibrate`: per-channel (min, max) at every calibrated point of every layer.

One safetensors file: ``layers.{i}.{point}.{min,max}`` float32 [channels] for each point of
``points.STAT_POINTS``, and metadata ``format`` (``rptq-stats``), ``version`` and ``meta`` (JSON: the model,
its model_type, the calibration data's provenance, the tool version). ``rptq quantize --stats`` reads it
instead of observing the FP model again.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_write
from .errors import RptqError
from .models.base import Family
from .points import STAT_POINTS

STATS_FORMAT = "rptq-stats"
STATS_VERSION = "1"

LayerStats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # point -> (per-channel min, per-channel max)



@dataclass
class StatsFile:
    layers: list[LayerStats]
    meta: dict = field(default_factory=dict)  # model, model_type, data provenance, tool version

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"layers.{i}.{p}.{which}": t.float().contiguous()
                   for i, layer in enumerate(self.layers) for p, (lo, hi) in layer.items()
                   for which, t in (("min", lo), ("max", hi))}
        metadata = {"format": STATS_FORMAT, "version": STATS_VERSION, "meta": json.dumps(self.meta, sort_keys=True)}
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StatsFile":
        path = Path(path)
        if not path.is_file():
            raise RptqError(f"stats file {path} does not exist; create it with `rptq calibrate MODEL -o {path}`")
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != STATS_FORMAT:
                    raise RptqError(f"{path} is not an rptq stats file; create one with `rptq calibrate`")
                if metadata.get("version") != STATS_VERSION:
                    raise RptqError(f"{path} is a stats file of format version {metadata.get('version')}, "
                                    f"this rptq reads version {STATS_VERSION}; re-run `rptq calibrate`")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except RptqError:
            raise
        except Exception as exc:  # truncated or foreign file
            raise RptqError(f"cannot read stats file {path} ({exc}); re-run `rptq calibrate`") from None
        n_layers = 1 + max(int(k.split(".")[1]) for k in tensors)
        layers = [{p: (tensors[f"layers.{i}.{p}.min"], tensors[f"layers.{i}.{p}.max"]) for p in STAT_POINTS}
                  for i in range(n_layers)]
        return cls(layers, json.loads(metadata.get("meta", "{}")))

    def check_model(self, config, family: Family, path: str) -> None:
        """Refuse stats recorded on another model: every point must have this model's channel count."""
        widths = family.point_channels(config)
        found = [{p: lo.numel() for p, (lo, _) in layer.items()} for layer in self.layers]
        if len(found) != config.num_hidden_layers or any(f != widths for f in found):
            raise RptqError(f"stats file {path} was recorded on {self.meta.get('model', 'another model')}, whose "
                            f"layers differ from this model's; re-run `rptq calibrate` for this model")


def stats_metadata(model_name: str, config, provenance: dict) -> dict:
    return {"model": model_name, "model_type": config.model_type, "data": provenance, "tool_version": __version__}


def is_stats_file(path: Path) -> bool:
    """Whether ``path`` is a stats file rptq wrote (the only kind of file `calibrate --force` replaces)."""
    with contextlib.suppress(Exception):  # anything unreadable is not ours
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == STATS_FORMAT
    return False
