"""The reorder points of one decoder layer (the paper's Fig. 3, DESIGN §2), described once.

Calibration (which tensors are observed, and where), clustering (which ranges are clustered together, per head
or over the whole tensor), folding (which norm gathers, which linears get permuted rows or columns),
quantization (which quantizer sits where) and export all read these two tables. They name the modules of a
layer by *role* (``"q"``, ``"mlp_in"``, ``"attn_norm"``, ...); a family (``models/``) maps each role to its
module paths, and declares everything else that differs between families.

| point     | tensor                                   | reorder point           | channels |
|-----------|------------------------------------------|-------------------------|----------|
| `x1`      | attention-norm output (q/k/v input)       | R1, global              | hidden   |
| `q`, `k`  | queries and keys (keys = the KV cache)    | R2, per KV head         | query, kv|
| `v`       | values (the KV cache)                     | R3, per KV head         | kv       |
| `p`       | softmax output, on a fixed [0, 1] grid    | none                    |          |
| `o_in`    | out_proj input (attention output)         | R3, per KV head         | query    |
| `x2`      | FFN-norm output (fc1 / gate+up input)     | R4, global              | hidden   |
| `down_in` | fc2 / down_proj input                     | R5, global              | ffn      |

Query-wide points (``q``, ``o_in``) take the clusters of the KV head each query head reads.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActPoint:
    """An activation tensor of the layer that RPTQ quantizes."""
    name: str
    tensor: str                       # what it is, for messages and docs
    reorder: str | None               # the reorder point that orders its channels; None: the softmax output
    width: str = ""                   # "hidden" | "query" | "kv" | "ffn": its channels (Family.widths)
    norm: str | None = None           # role of the norm whose output it is: the norm gathers it (R1, R4)
    producers: tuple[str, ...] = ()   # roles of the linears whose output rows it is: rows permuted
    consumers: tuple[str, ...] = ()   # roles of the linears reading it: columns permuted, input quantizer
    kv_cache: bool = False            # stored in the KV cache (K, V): static ranges, the kv_only points

    @property
    def observed(self) -> bool:
        """Per-channel ranges are calibrated (the softmax output has a fixed grid instead)."""
        return self.reorder is not None

    @property
    def in_attention(self) -> bool:
        """Observed and quantized inside the attention function, not at a linear's input (q, k, v, p)."""
        return not self.consumers


@dataclass(frozen=True)
class ReorderPoint:
    """A permutation of channels into contiguous clusters, folded into the layer."""
    name: str
    features: tuple[str, ...]  # the points whose (max…, min…) per channel are clustered together, in this order
    per_head: bool             # clustered inside each KV head, so attention keeps its meaning (R2, R3)
    default_clusters: int      # clusters asked for (per head when per_head)
    rotated: bool = False      # orders keys and queries, which RoPE families rotate: there the permutation is
                               # a gather after RoPE inside attention (nn/attention.py), not folded into weights


ACT_POINTS: tuple[ActPoint, ...] = (
    ActPoint("x1", "attention-norm output (q/k/v input)", "R1", "hidden", norm="attn_norm",
             consumers=("q", "k", "v")),
    ActPoint("q", "queries", "R2", "query", producers=("q",)),
    ActPoint("k", "keys", "R2", "kv", producers=("k",), kv_cache=True),
    ActPoint("v", "values", "R3", "kv", producers=("v",), kv_cache=True),
    ActPoint("p", "softmax output", None),
    ActPoint("o_in", "out_proj input", "R3", "query", consumers=("o",)),
    ActPoint("x2", "FFN-norm output (fc1 / gate+up input)", "R4", "hidden", norm="mlp_norm", consumers=("mlp_in",)),
    ActPoint("down_in", "fc2 / down_proj input", "R5", "ffn", producers=("mlp_in",), consumers=("mlp_out",)),
)
REORDER_POINTS: tuple[ReorderPoint, ...] = (
    ReorderPoint("R1", ("x1",), per_head=False, default_clusters=32),
    ReorderPoint("R2", ("q", "k"), per_head=True, default_clusters=4, rotated=True),
    ReorderPoint("R3", ("v", "o_in"), per_head=True, default_clusters=4),
    ReorderPoint("R4", ("x2",), per_head=False, default_clusters=32),
    ReorderPoint("R5", ("down_in",), per_head=False, default_clusters=32),
)

POINTS = {p.name: p for p in ACT_POINTS}
REORDERS = {r.name: r for r in REORDER_POINTS}
ACT_POINT_NAMES = tuple(POINTS)


def shown_point(reorder: ReorderPoint) -> str:
    """The point whose channels a reorder point's clusters are drawn on: the KV-wide one for R2/R3 (the KV
    cache's groups; the query-wide one takes them per query head)."""
    return next(f for f in reorder.features if POINTS[f].width != "query")
REORDER_POINT_NAMES = tuple(REORDERS)
STAT_POINTS = tuple(p.name for p in ACT_POINTS if p.observed)  # the points a stats file holds
