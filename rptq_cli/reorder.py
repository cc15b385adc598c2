"""Reorder points R1..R5: cluster channels from their calibrated ranges, fold the permutations into the layer.

Which tensors each point orders, and which modules it touches, is ``points.py``'s description. The fold is
exact in floating point (a test checks the logits):
- R1, R4: the norm gathers its input and uses permuted gamma/beta (:class:`ReorderNorm`); the consuming
  linears' columns are permuted. The residual stream is never permuted.
- R2: q_proj/k_proj rows (and bias) permuted inside each head, so q·kᵀ is unchanged; for RoPE families
  the same within-head permutation is applied after RoPE instead (see ``nn/attention.py``).
- R3: v_proj rows inside each KV head; out_proj columns of every query head that reads that KV head.
- R5: rows of fc1 (or gate_proj and up_proj together), columns of fc2 (down_proj).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cluster import Clustering, cluster_channels, single_cluster
from .config import QuantConfig
from .models.base import Family, HeadLayout, norm_eps, replace
from .nn.attention import AttentionQuant
from .nn.norm import ReorderNorm
from .points import ACT_POINTS, POINTS, REORDER_POINTS, REORDERS
from .stats_file import LayerStats


@dataclass
class LayerPlan:
    """The clusterings of one layer's reorder points, by name ("R1".."R5"; R2 and R3 over kv_heads × head_dim
    channels)."""
    clusterings: dict[str, Clustering]

    def __getitem__(self, reorder_point: str) -> Clustering:
        return self.clusterings[reorder_point]

    def perm(self, point: str, heads: HeadLayout) -> torch.Tensor:
        """The permutation of activation point ``point``'s channels (query-wide points: every query head)."""
        clustering = self[POINTS[point].reorder]
        return heads.to_query_heads(clustering.perm) if POINTS[point].width == "query" else clustering.perm

    def group_sizes(self, heads: HeadLayout) -> dict[str, torch.Tensor]:
        """Activation group sizes (after the reorder) at every calibrated point of the layer."""
        out = {}
        for p in ACT_POINTS:
            if p.observed:
                clustering = self[p.reorder]
                out[p.name] = heads.query_group_sizes(clustering) if p.width == "query" else clustering.cluster_sizes
        return out


def plan_layer(stats: LayerStats, heads: HeadLayout, config: QuantConfig, seed: int = 0) -> LayerPlan:
    """KMeans on each point's (min, max) per channel; R2 joint on Q and K, R3 joint on V and out_proj input."""
    clusterings = {}
    for r in REORDER_POINTS:
        if not config.reorder:
            channels = heads.n_kv * heads.head_dim if r.per_head else stats[r.features[0]][0].numel()
            clusterings[r.name] = single_cluster(channels)
            continue
        # query-wide points are clustered over the KV head each query head reads
        ranges = [heads.reduce_query_heads(*stats[f]) if POINTS[f].width == "query" else stats[f]
                  for f in r.features]
        features = torch.stack([hi for _, hi in ranges] + [lo for lo, _ in ranges], dim=1).float()
        clusterings[r.name] = cluster_channels(features, config.clusters[r.name],
                                               n_heads=heads.n_kv if r.per_head else 1, seed=seed,
                                               multiple=config.cluster_multiple)
    return LayerPlan(clusterings)


def _permute_rows(linear: nn.Linear, perm: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[perm].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[perm].contiguous()


def _permute_columns(linear: nn.Linear, perm: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, perm].contiguous()


def fold_layer(layer: nn.Module, family: Family, heads: HeadLayout, plan: LayerPlan) -> None:
    """Apply ``plan`` to ``layer`` in place; the layer computes exactly the same function afterwards."""
    get = layer.get_submodule
    rms = family.norm_kind == "rms"
    gathered = None  # the rotated reorder point's permutation, applied inside attention
    for p in ACT_POINTS:
        if not p.observed:
            continue
        perm = plan.perm(p.name, heads)
        if p.norm is not None:
            norm_path = getattr(family, p.norm)
            norm = get(norm_path)
            replace(layer, norm_path, ReorderNorm.fold(norm, perm, rms, norm_eps(norm)))
        for path in family.paths(*p.consumers):
            _permute_columns(get(path), perm)
        if family.rope and REORDERS[p.reorder].rotated:
            gathered = plan[p.reorder]
            continue
        for path in family.paths(*p.producers):
            _permute_rows(get(path), perm)
    get(family.attn).rptq = AttentionQuant(qk_perm=None if gathered is None else heads.kv_local(gathered.perm))
