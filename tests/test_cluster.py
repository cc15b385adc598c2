import warnings

import pytest
import torch

from rptq_cli.cluster import Clustering, cluster_channels, invert_perm, single_cluster
from rptq_cli.errors import RptqError


def _check_valid(clustering: Clustering, channels: int, n_heads: int):
    perm, sizes = clustering.perm, clustering.cluster_sizes
    assert perm.dtype == torch.int64 and sizes.dtype == torch.int32
    assert torch.equal(perm.sort().values, torch.arange(channels))
    assert (sizes > 0).all() and int(sizes.sum()) == channels
    assert len(clustering.groups_per_head) == n_heads and sum(clustering.groups_per_head) == len(sizes)
    head_dim = channels // n_heads
    # block-diagonal: never move a channel out of its head, and the clusters tile each head exactly
    starts = torch.cumsum(torch.tensor(clustering.groups_per_head), 0) - torch.tensor(clustering.groups_per_head)
    for h in range(n_heads):
        block = perm[h * head_dim : (h + 1) * head_dim]
        assert torch.equal(block.sort().values, torch.arange(h * head_dim, (h + 1) * head_dim))
        assert int(sizes[starts[h] : starts[h] + clustering.groups_per_head[h]].sum()) == head_dim
    # channels inside a cluster keep ascending original order
    for chunk in perm.split(sizes.tolist()):
        assert torch.equal(chunk, chunk.sort().values)


def _ranges(channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(channels, generator=gen) * 4 + 0.1
    spread[torch.randperm(channels, generator=gen)[:5]] *= 30  # outlier channels
    return torch.stack([-spread * (0.5 + torch.rand(channels, generator=gen)), spread], 1)  # (min, max)


def test_similar_ranges_land_together_in_centroid_order():
    # three well-separated kinds of channel, interleaved by index
    kinds = torch.tensor([2, 0, 1, 1, 0, 2, 0, 1, 2, 2, 0, 1])
    centers = torch.tensor([[-1.0, 1.0], [-8.0, 8.0], [-50.0, 40.0]])
    features = centers[kinds] + 0.01 * torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    clustering = cluster_channels(features, 3)
    _check_valid(clustering, 12, 1)
    assert clustering.cluster_sizes.tolist() == [4, 4, 4]
    # sorted by centroid (min first): the widest negative range, then middle, then narrow
    groups = [chunk.tolist() for chunk in clustering.perm.split([4, 4, 4])]
    assert groups == [torch.where(kinds == k)[0].tolist() for k in (2, 1, 0)]


def test_deterministic_across_runs():
    features = _ranges(3000)
    first = cluster_channels(features, 32, seed=0)
    second = cluster_channels(features.clone(), 32, seed=0)
    _check_valid(first, 3000, 1)
    assert torch.equal(first.perm, second.perm)
    assert torch.equal(first.cluster_sizes, second.cluster_sizes)


def test_per_head_clustering_is_block_diagonal():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(8 * 64, 4, generator=gen) * torch.rand(8 * 64, 1, generator=gen) * 5  # R2-like
    clustering = cluster_channels(features, 4, n_heads=8)
    _check_valid(clustering, 512, 8)
    assert clustering.groups_per_head == [4] * 8


def test_more_clusters_than_channels_is_clamped_with_a_warning():
    features = _ranges(24)
    with pytest.warns(UserWarning, match="using 6"):
        clustering = cluster_channels(features, 32, n_heads=4)
    _check_valid(clustering, 24, 4)
    assert all(g <= 6 for g in clustering.groups_per_head)


def test_empty_clusters_are_dropped():
    # 3 distinct points among 20 channels cannot fill 8 clusters
    features = torch.tensor([[-1.0, 1.0], [-5.0, 5.0], [0.0, 9.0]])[torch.arange(20) % 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8 <= 20 channels: no clamping warning either
        clustering = cluster_channels(features, 8)
    _check_valid(clustering, 20, 1)
    assert len(clustering.cluster_sizes) <= 3
    for chunk in clustering.perm.split(clustering.cluster_sizes.tolist()):
        assert (features[chunk] == features[chunk[0]]).all()


@pytest.mark.parametrize("channels,n_clusters,n_heads", [(1, 1, 1), (2, 2, 1), (5, 1, 1), (6, 1, 3), (4, 2, 2)])
def test_tiny_inputs(channels, n_clusters, n_heads):
    clustering = cluster_channels(_ranges(channels), n_clusters, n_heads=n_heads)
    _check_valid(clustering, channels, n_heads)
    if n_clusters == 1:
        assert torch.equal(clustering.perm, torch.arange(channels))
        assert clustering.groups_per_head == [1] * n_heads


@pytest.mark.parametrize("channels,n_clusters,n_heads", [(576, 32, 1), (512, 4, 8), (1536, 32, 1), (100, 8, 1)])
def test_cluster_multiple_rounds_sizes_and_moves_few_channels(channels, n_clusters, n_heads):
    features = _ranges(channels, seed=channels)
    free = cluster_channels(features, n_clusters, n_heads=n_heads)
    aligned = cluster_channels(features, n_clusters, n_heads=n_heads, multiple=16)
    _check_valid(aligned, channels, n_heads)
    sizes = aligned.cluster_sizes
    assert len(sizes) <= len(free.cluster_sizes)
    if channels // n_heads % 16 == 0:
        assert (sizes % 16 == 0).all(), sizes
    else:  # 100 channels: one cluster holds the 4 left over
        assert int((sizes % 16 != 0).sum()) == 1 and int(sizes.sum()) == channels
    # the channels that move are few: most keep the company of their KMeans cluster
    label = lambda c: torch.repeat_interleave(torch.arange(len(c.cluster_sizes)), c.cluster_sizes.long())[
        invert_perm(c.perm)]
    same = (label(free)[:, None] == label(free)[None]) == (label(aligned)[:, None] == label(aligned)[None])
    assert same.float().mean() > 0.8
    assert torch.equal(aligned.perm, cluster_channels(features, n_clusters, n_heads=n_heads, multiple=16).perm)


def test_cluster_multiple_moves_the_channels_nearest_their_new_cluster():
    # kinds A, B, C of 20, 20 and 24 channels: rounded by largest remainder to 16, 16 and 32, so 4 channels of A
    # and 4 of B join C, and they are the ones of each kind nearest C (the widest ranges)
    t = torch.linspace(0, 1, 20)
    kind = lambda lo, hi, spread: torch.stack([-lo - spread, hi + spread], 1)
    features = torch.cat([kind(1, 1, t), kind(5, 5, t), kind(20, 20, torch.linspace(0, 1, 24))])
    c = cluster_channels(features, 3, multiple=16)
    assert c.cluster_sizes.tolist() == [32, 16, 16]  # centroid order: C, B, A
    joined_c = set(c.perm[:32].tolist()) - set(range(40, 64))
    assert joined_c == {16, 17, 18, 19, 36, 37, 38, 39}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(RptqError, match="heads"):
        cluster_channels(_ranges(10), 2, n_heads=3)
    nan = _ranges(10)
    nan[3, 0] = float("nan")
    with pytest.raises(RptqError, match="recalibrate"):
        cluster_channels(nan, 2)
    with pytest.raises(RptqError):
        cluster_channels(_ranges(10), 0)
    with pytest.raises(RptqError, match="cluster-multiple"):
        cluster_channels(_ranges(10), 2, multiple=0)


def test_single_cluster_and_invert_perm():
    single = single_cluster(12)
    _check_valid(single, 12, 1)
    assert single.cluster_sizes.tolist() == [12] and torch.equal(single.perm, torch.arange(12))
    perm = cluster_channels(_ranges(100), 8).perm
    inv = invert_perm(perm)
    x = torch.randn(3, 100)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(perm[inv], torch.arange(100))


def test_only_clustering_needs_faiss(monkeypatch, tiny_opt_dir, corpus_file, tmp_path):
    from click.testing import CliRunner

    from rptq_cli.cli import main
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(RptqError, match="faiss-cpu"):
        cluster_channels(_ranges(16), 4)
    calib = ["--calib-path", str(corpus_file), "--nsamples", "2", "--seqlen", "32"]
    plain = CliRunner().invoke(main, ["quantize", str(tiny_opt_dir), "--wbits", "4", "--abits", "8", "--no-reorder",
                                      *calib, "-o", str(tmp_path / "q")])
    assert plain.exit_code == 0 and (tmp_path / "q" / "model.safetensors").exists(), plain.output
    reordered = CliRunner().invoke(main, ["quantize", str(tiny_opt_dir), "--wbits", "4", "--abits", "8", *calib,
                                          "-o", str(tmp_path / "r")])
    assert reordered.exit_code == 2 and "faiss" in reordered.output and not (tmp_path / "r").exists()
