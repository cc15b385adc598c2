"""Reorder points R1..R5: cluster channels from their calibrated ranges, fold the permutations into the layer.

The fold is exact in floating point (a test checks the logits):
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

from .calibrate import LayerStats
from .cluster import Clustering, cluster_channels
from .config import QuantConfig
from .models.base import Family, HeadLayout, norm_eps, replace
from .nn.attention import AttentionQuant
from .nn.norm import ReorderNorm


@dataclass
class LayerPlan:
    """The clusterings of one layer's reorder points (R2 and R3 over kv_heads × head_dim channels)."""
    r1: Clustering
    r2: Clustering
    r3: Clustering
    r4: Clustering
    r5: Clustering


def single_cluster(channels: int) -> Clustering:
    """No reorder: the whole tensor is one group (the per-tensor baseline)."""
    return Clustering(torch.arange(channels), torch.tensor([channels], dtype=torch.int32), [1])


def plan_layer(stats: LayerStats, heads: HeadLayout, config: QuantConfig, seed: int = 0) -> LayerPlan:
    """KMeans on each point's (min, max) per channel; R2 joint on Q and K, R3 joint on V and out_proj input."""
    if not config.reorder:
        kv = heads.n_kv * heads.head_dim
        return LayerPlan(single_cluster(stats["x1"][0].numel()), single_cluster(kv), single_cluster(kv),
                         single_cluster(stats["x2"][0].numel()), single_cluster(stats["down_in"][0].numel()))
    k = config.clusters

    def points(*ranges):
        his = [hi for _, hi in ranges]
        los = [lo for lo, _ in ranges]
        return torch.stack(his + los, dim=1).float()

    q = heads.reduce_query_heads(*stats["q"])
    o = heads.reduce_query_heads(*stats["o_in"])
    return LayerPlan(
        r1=cluster_channels(points(stats["x1"]), k["R1"], seed=seed),
        r2=cluster_channels(points(q, stats["k"]), k["R2"], n_heads=heads.n_kv, seed=seed),
        r3=cluster_channels(points(stats["v"], o), k["R3"], n_heads=heads.n_kv, seed=seed),
        r4=cluster_channels(points(stats["x2"]), k["R4"], seed=seed),
        r5=cluster_channels(points(stats["down_in"]), k["R5"], seed=seed),
    )


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
    for norm_path, clustering, consumers in ((family.attn_norm, plan.r1, (family.q, family.k, family.v)),
                                             (family.mlp_norm, plan.r4, family.mlp_in)):
        norm = get(norm_path)
        replace(layer, norm_path, ReorderNorm.fold(norm, clustering.perm, rms, norm_eps(norm)))
        for path in consumers:
            _permute_columns(get(path), clustering.perm)

    attn = get(family.attn)
    if family.rope:
        attn.rptq = AttentionQuant(qk_perm=heads.kv_local(plan.r2.perm))
    else:
        _permute_rows(get(family.q), heads.to_query_heads(plan.r2.perm))
        _permute_rows(get(family.k), plan.r2.perm)
        attn.rptq = AttentionQuant()

    _permute_rows(get(family.v), plan.r3.perm)
    _permute_columns(get(family.o), heads.to_query_heads(plan.r3.perm))

    for path in family.mlp_in:
        _permute_rows(get(path), plan.r5.perm)
    _permute_columns(get(family.mlp_out), plan.r5.perm)
