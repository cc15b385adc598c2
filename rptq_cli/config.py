"""What to quantize and how: one dataclass, loadable from the presets in ``rptq_cli/configs/``.

The activation points it gives bits to, and the reorder points it gives cluster counts to, are described in
``points.py`` (DESIGN §2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import RptqError
from .points import ACT_POINTS, POINTS, REORDER_POINT_NAMES, REORDER_POINTS

#: the presets (NAME.yaml) and big models' config.json (models/NAME/), shipped as package data (setup.py)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CLUSTERS = {r.name: r.default_clusters for r in REORDER_POINTS}
WBITS = (2, 3, 4, 8, 16)
ABITS = (3, 4, 8, 16)
HEAD_BITS = (8, 16)  # the lm_head: packed 8-bit codes or float16
FP = 16  # "bits" of a tensor that stays in floating point
MODES = {
    "paper": "the official RPTQ: static per-cluster ranges; norm outputs and softmax at max(8, abits)",
    "strict": "static per-cluster ranges, every point at abits",
    "token": "paper's bits, but linear inputs and queries get per-token scales per cluster at run time "
             "and the softmax output stays in floating point; the KV cache keeps static per-cluster ranges",
}
# per-token scales in mode "token": every calibrated point but K and V, whose scales the cache stores (those
# are per token only with kv_grid "token")
TOKEN_POINTS = tuple(p.name for p in ACT_POINTS if p.observed and not p.kv_cache)
KV_GRIDS = {
    "static": "one (scale, zero) per cluster of each KV head, fixed at calibration (the official RPTQ)",
    "token": "each token's own (scale, zero) per cluster of each KV head, computed as it enters the cache and "
             "stored beside its codes (float16 scale + uint8 zero per cluster)",
}


@dataclass
class QuantConfig:
    wbits: int = 16
    abits: int = 16
    kv_only: bool = False               # only K and V at abits (W4A4KV and friends)
    mode: str = "token"                 # see MODES; "paper" reproduces the official RPTQ code
    weight_quantizer: str = "gptq"      # gptq | rtn
    weight_groups: str | int = "cluster"  # cluster | channel | group size
    clusters: dict = field(default_factory=lambda: dict(DEFAULT_CLUSTERS))
    reorder: bool = True                # False: one cluster per point (the per-tensor baseline)
    cluster_multiple: int = 1           # cluster sizes rounded to multiples of this (16: the AVX2 GEMV's fast path)
    act_clip: str = "mse"               # minmax | mse: static activation ranges from calibration
    kv_grid: str = "static"             # see KV_GRIDS: how the KV cache's grids are chosen
    head_bits: int = 16                 # 8: the lm_head packed at 8 bits (nn/head.py), else float16
    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.wbits not in WBITS:
            raise RptqError(f"--wbits {self.wbits} is not supported; choose one of {', '.join(map(str, WBITS))}")
        if self.abits not in ABITS:
            raise RptqError(f"--abits {self.abits} is not supported; choose one of {', '.join(map(str, ABITS))}")
        if self.mode not in MODES:
            raise RptqError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.weight_quantizer not in ("gptq", "rtn"):
            raise RptqError(f"--weight-quantizer {self.weight_quantizer!r} is unknown; choose gptq or rtn")
        if self.kv_grid not in KV_GRIDS:
            raise RptqError(f"--kv-grid {self.kv_grid!r} is unknown; choose one of {', '.join(KV_GRIDS)}")
        if self.head_bits not in HEAD_BITS:
            raise RptqError(f"--head-bits {self.head_bits} is not supported; choose 8 or 16 (float16, the default)")
        if self.act_clip not in ("minmax", "mse"):
            raise RptqError(f"--act-clip {self.act_clip!r} is unknown; choose minmax or mse")
        groups = self.weight_groups
        if isinstance(groups, str) and groups.isdigit():
            self.weight_groups = groups = int(groups)
        if not (groups in ("cluster", "channel") or (isinstance(groups, int) and groups > 0)):
            raise RptqError(f"--weight-groups {groups!r} is invalid; use cluster, channel or a positive group size")
        if not isinstance(self.cluster_multiple, int) or not 1 <= self.cluster_multiple <= 64:
            raise RptqError(f"--cluster-multiple {self.cluster_multiple!r} is invalid; use 1 (KMeans' own sizes) "
                            "up to 64, e.g. 16")
        unknown = set(self.clusters) - set(REORDER_POINT_NAMES)
        if unknown:
            raise RptqError(f"--clusters names unknown points {sorted(unknown)}; use R1..R5")
        for point, n in self.clusters.items():
            if not isinstance(n, int) or n < 1:
                raise RptqError(f"--clusters {point}={n} is invalid; cluster counts are positive integers")
        self.clusters = {**DEFAULT_CLUSTERS, **self.clusters}

    def act_bits(self, point: str) -> int:
        """Bits of activation point ``point`` (16 = not quantized), DESIGN §2's table."""
        a, spec = self.abits, POINTS[point]
        if a >= FP:
            return FP
        if self.kv_only:
            return a if spec.kv_cache else FP
        softmax = not spec.observed
        if self.mode == "token" and softmax:
            return FP  # a fixed 8-bit grid zeroes every probability below 1/510: most of a long context
        if self.mode != "strict" and (spec.norm is not None or softmax):  # norm outputs and the softmax
            return max(8, a)
        return a

    def per_token(self, point: str) -> bool:
        """True when ``point`` is quantized with per-token scales computed at run time."""
        kv_token = self.kv_grid == "token" and POINTS[point].kv_cache
        token = (self.mode == "token" and point in TOKEN_POINTS) or kv_token
        return token and self.act_bits(point) < FP

    @property
    def quantizes_weights(self) -> bool:
        return self.wbits < FP

    @property
    def quantizes_acts(self) -> bool:
        return any(self.act_bits(p.name) < FP for p in ACT_POINTS)

    @property
    def label(self) -> str:
        kv = "KV" if self.kv_only else ""
        mode = f"-{self.mode}" if self.mode != "paper" and self.abits < FP and not self.kv_only else ""
        kv_grid = "-kvtoken" if self.kv_grid == "token" and self.act_bits("k") < FP else ""
        head = f"-head{self.head_bits}" if self.head_bits < FP else ""
        return f"W{self.wbits}A{self.abits}{kv}{mode}{kv_grid}{head}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RptqError(f"unknown quantization settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RptqError(f"unknown --config {name!r}; choose one of {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def parse_clusters(text: str) -> dict:
    """``"R1=32,R2=4"`` → ``{"R1": 32, "R2": 4}``."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise RptqError(f"--clusters item {item!r} is invalid; write e.g. R1=32,R2=4,R3=4,R4=32,R5=32")
        out[name.strip().upper()] = int(value)
    return out


def build_config(preset: str | None = None, **overrides) -> QuantConfig:
    """A preset (if any) with the flags the user gave on top (``None`` = not given)."""
    data = load_preset(preset) if preset else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "clusters" in given:  # --clusters R1=16 changes R1 and keeps the preset's other points
        given["clusters"] = {**data.get("clusters", {}), **given["clusters"]}
    data.update(given)
    return QuantConfig.from_dict(data)
