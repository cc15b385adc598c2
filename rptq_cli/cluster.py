"""Channel clustering for RPTQ's reorder points: KMeans on per-channel range features.

Channels with similar ranges are put in one cluster; the permutation makes every cluster a contiguous
run, so each can get its own quantization scale. Within a head-split tensor (R2, R3), channels are
clustered inside their head only, so the permutation is block-diagonal and attention keeps its meaning.

Unlike the official code (sklearn, arbitrary cluster order, non-stable GPU sort), the result here is
a deterministic function of (features, n_clusters, n_heads, seed): faiss KMeans with a fixed seed on
one thread, clusters ordered by their centroid, channels inside a cluster in ascending index.

``multiple`` (``--cluster-multiple``) rounds every cluster to a multiple of that many channels: the AVX2 GEMV
then meets each packed 16-code run of a weight row once, in one group, instead of once per group it touches
(docs/kernels.md). The sizes are KMeans' rounded to the nearest multiple (largest remainders first), and the
channels that must move are the ones that move the least far from their centroid.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RptqError

KMEANS_ITERATIONS = 25
KMEANS_RESTARTS = 10  # as the official code's sklearn n_init=10


@dataclass
class Clustering:
    """A reordering of C channels into contiguous clusters.

    perm: int64 [C]; new position j holds old channel ``perm[j]`` (so ``x_new = x[..., perm]``)
    cluster_sizes: int32 [G], all > 0, contiguous after the permutation, head-major when per head
    groups_per_head: clusters in each head (len n_heads, sum G)
    """

    perm: torch.Tensor
    cluster_sizes: torch.Tensor
    groups_per_head: list[int]


def _faiss():
    """faiss, imported only to cluster: loading and running a checkpoint, or quantizing without reorder,
    works on machines without it (GPU images often lack it)."""
    try:
        import faiss
    except ImportError:
        raise RptqError("clustering needs faiss, which is not installed: run `pip install faiss-cpu` "
                        "(or `make install`), or quantize with --no-reorder") from None
    return faiss


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """The permutation ``inv`` with ``inv[perm[j]] = j`` (int64 [C]): ``x_new[..., inv] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), dtype=perm.dtype, device=perm.device)
    return inv


def single_cluster(channels: int) -> Clustering:
    """No reorder: the whole tensor is one group (the per-tensor baseline, ``--no-reorder``)."""
    return Clustering(torch.arange(channels), torch.tensor([channels], dtype=torch.int32), [1])


def cluster_channels(features: torch.Tensor, n_clusters: int, n_heads: int = 1, seed: int = 0,
                     multiple: int = 1) -> Clustering:
    """Cluster channels by their feature points, separately in each head.

    features: float [C, F], one point per channel, e.g. (min, max), or (q_max, k_max, q_min, k_min)
    for R2; C must be a multiple of n_heads. Asks for ``n_clusters`` per head (fewer come out when
    KMeans leaves a cluster empty, or when ``multiple`` > 1 rounds a cluster to nothing). Every cluster
    size is a multiple of ``multiple`` (one of them also holds the rest when the head's width is not).
    Returns a :class:`Clustering` with a block-diagonal ``perm``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [channels, F], got shape {tuple(features.shape)}")
    channels = features.shape[0]
    head_dim = _head_dim(channels, n_heads)
    if n_clusters < 1:
        raise RptqError(f"the number of clusters must be at least 1, got {n_clusters}")
    if multiple < 1:
        raise RptqError(f"--cluster-multiple must be at least 1, got {multiple}")
    if not torch.isfinite(features).all():
        raise RptqError("channel statistics hold inf/NaN (overflow during calibration): recalibrate in float32")
    if n_clusters > head_dim:
        warnings.warn(f"{n_clusters} clusters asked for {head_dim} channels per head; using {head_dim}", stacklevel=2)
        n_clusters = head_dim

    points = features.detach().cpu().to(torch.float32).numpy()
    perm, sizes, groups_per_head = [], [], []
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # multi-threaded reductions would make the centroids run-dependent
    try:
        for h in range(n_heads):
            head = np.ascontiguousarray(points[h * head_dim : (h + 1) * head_dim])
            labels = _kmeans_labels(head, n_clusters, seed)
            if multiple > 1:
                labels = _round_cluster_sizes(head, labels, multiple)
            order, head_sizes = _cluster_order(head, labels)
            perm.append(order + h * head_dim)
            sizes += head_sizes
            groups_per_head.append(len(head_sizes))
    finally:
        faiss.omp_set_num_threads(threads)
    return Clustering(
        perm=torch.from_numpy(np.concatenate(perm)).to(torch.int64),
        cluster_sizes=torch.tensor(sizes, dtype=torch.int32),
        groups_per_head=groups_per_head,
    )


def _head_dim(channels: int, n_heads: int) -> int:
    if n_heads < 1 or channels % n_heads:
        raise RptqError(f"{channels} channels do not split into {n_heads} heads: check the model's head count")
    return channels // n_heads


def _kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster label (int64 [n]) of each row of ``points`` float32 [n, F]."""
    n, dim = points.shape
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    faiss = _faiss()
    kmeans = faiss.Kmeans(
        dim,
        k,
        niter=KMEANS_ITERATIONS,
        nredo=KMEANS_RESTARTS,
        seed=seed,
        # k-means++ gives the few outlier channels their own centroid instead of leaving it to chance
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        min_points_per_centroid=1,  # few channels per cluster is normal here, not a warning
        max_points_per_centroid=max(256, -(-n // k)),  # use every channel, never a subsample
        verbose=False,
    )
    kmeans.train(points)
    _, labels = kmeans.index.search(points, 1)
    return labels[:, 0].astype(np.int64)


def _round_cluster_sizes(points: np.ndarray, labels: np.ndarray, multiple: int) -> np.ndarray:
    """New labels (int64 [n]) whose cluster sizes are multiples of ``multiple`` (one also takes n mod multiple):
    each size is rounded by largest remainder, then channels move one at a time from a cluster
    above its size to one below it, always the move that adds the least squared distance to the centroids."""
    used, labels = np.unique(labels, return_inverse=True)
    counts = np.bincount(labels, minlength=len(used))
    centroids = np.stack([points[labels == c].astype(np.float64).mean(0) for c in range(len(used))])
    target = counts // multiple * multiple
    spare_units = (len(labels) - target.sum()) // multiple
    by_remainder = np.lexsort((np.arange(len(used)), -(counts % multiple)))  # largest remainder, then first
    target[by_remainder[:spare_units]] += multiple
    target[by_remainder[max(spare_units - 1, 0)]] += len(labels) - target.sum()  # n mod multiple
    cost = ((points[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)  # [n, G]
    while (counts > target).any():
        over, under = counts > target, np.flatnonzero(counts < target)
        added = cost[:, under] - cost[np.arange(len(labels)), labels][:, None]  # [n, under]
        added[~over[labels]] = np.inf
        channel, to = np.unravel_index(np.argmin(added), added.shape)
        counts[labels[channel]] -= 1
        labels[channel] = under[to]
        counts[under[to]] += 1
    return labels


def _cluster_order(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Permutation (int64 [n]) grouping the labels, and the sizes of the non-empty clusters.

    Clusters are ordered by their centroid (lexicographically over the features), then by their
    lowest channel; channels keep ascending index inside a cluster (stable sort).
    """
    used, first_channel, counts = np.unique(labels, return_index=True, return_counts=True)
    centroids = np.stack([points[labels == c].astype(np.float64).mean(0) for c in used])  # [G, F]
    # np.lexsort sorts by its last key first
    rank_of_cluster = np.empty(len(used), dtype=np.int64)
    cluster_order = np.lexsort((first_channel, *centroids.T[::-1]))
    rank_of_cluster[cluster_order] = np.arange(len(used))
    rank = rank_of_cluster[np.searchsorted(used, labels)]
    return np.argsort(rank, kind="stable"), counts[cluster_order].tolist()
