"""`rptq inspect`: the paper's Fig. 1 — each channel's calibrated (min, max) at one reorder point, coloured by
its KMeans cluster, in the model's channel order and after the reorder, with every cluster's quantization range.

The clustering is exactly the one `rptq quantize` makes (:func:`rptq_cli.reorder.plan_layer`, same features,
cluster counts and seed), so the picture shows the groups a checkpoint would get. The summary says how uneven
the channels are and how much of each quantization grid a channel leaves unused: a channel whose values span
``s`` on a grid spanning ``S`` uses only ``s / S`` of the grid's levels, i.e. it loses ``log2(S / s)`` bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write
from .calibrate import LayerRunner, observe_layer
from .cluster import Clustering
from .config import DEFAULT_CLUSTERS, build_config
from .errors import RptqError
from .loading import load_config, open_model, resolve_device, resolve_dtype
from .models.base import HeadLayout, family_for, head_layout
from .points import POINTS, REORDERS, ReorderPoint, shown_point
from .quant.grid import group_min_max
from .reorder import plan_layer
from .stats_file import LayerStats, StatsFile


def _description(reorder: ReorderPoint) -> str:
    """What the figure of ``reorder`` shows, e.g. "keys (clustered jointly with the queries)"."""
    shown = shown_point(reorder)
    others = [POINTS[f].tensor for f in reorder.features if f != shown]
    return POINTS[shown].tensor + (f" (clustered jointly with the {' and '.join(others)})" if others else "")


@dataclass
class PointRanges:
    """One reorder point of one layer.

    lo, hi: float32 [C] per-channel calibrated min and max, in the model's channel order
    clustering: the reorder (``perm`` int64 [C], contiguous ``cluster_sizes`` int32 [G]) `rptq quantize` uses
    n_heads: heads the channels split into (1 for R1, R4, R5; KV heads for R2, R3)
    """
    point: str
    lo: torch.Tensor
    hi: torch.Tensor
    clustering: Clustering
    n_heads: int = 1

    @property
    def labels(self) -> torch.Tensor:
        """int64 [C]: the cluster (0..G-1, in reorder order) of each channel, in the model's order."""
        sizes = self.clustering.cluster_sizes.long()
        labels = torch.empty(self.lo.numel(), dtype=torch.int64)
        labels[self.clustering.perm] = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        return labels

    def cluster_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [G] min and max of each cluster: the range its quantization grid covers."""
        perm = self.clustering.perm
        return group_min_max(self.lo[perm], self.hi[perm], self.clustering.cluster_sizes)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise RptqError(f"--layer {layer} is out of range: the model has {n_layers} layers; pass 0..{n_layers - 1}")


def collect_layer_stats(runner: LayerRunner, layer: int, progress: bool = True) -> LayerStats:
    """Per-channel (min, max) at every point of ``layer``, running the FP layers before it (as calibrate does)."""
    check_layer(layer, len(runner.layers))
    hidden = runner.inputs
    for i in tqdm(range(layer + 1), desc="calibrate", unit="layer", disable=not progress):
        block = runner.materialize(i)
        with runner.on_device(block), observe_layer(block, runner.family) as observers:
            hidden = runner.forward(block, hidden)
        runner.release(i)
    return {p: (o.lo, o.hi) for p, o in observers.items()}


def point_ranges(stats: LayerStats, heads: HeadLayout, point: str, n_clusters: int | None = None,
                 seed: int = 2) -> PointRanges:
    """Cluster one layer's statistics as `rptq quantize` does and keep ``point``'s channels and clustering."""
    if point not in REORDERS:
        raise RptqError(f"--point {point} is unknown; use one of {', '.join(REORDERS)}")
    clusters = dict(DEFAULT_CLUSTERS)
    if n_clusters is not None:
        clusters[point] = n_clusters
    plan = plan_layer(stats, heads, build_config(clusters=clusters), seed=seed)
    lo, hi = stats[shown_point(REORDERS[point])]
    return PointRanges(point, lo.float(), hi.float(), plan[point], heads.n_kv if REORDERS[point].per_head else 1)


MAX_LOST_BITS = 16.0  # a constant (e.g. dead ReLU) channel would lose infinitely many; count it as this many


def _span(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Width of the grid covering [min(lo, 0), max(hi, 0)], as quant/grid.py's affine grid does."""
    return hi.clamp_min(0) - lo.clamp_max(0)


def _unused(own: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """Mean unused fraction and mean lost bits of channels spanning ``own`` [n] on grids spanning ``grid``."""
    lost = torch.log2(grid / own.clamp_min(1e-30)).clamp(0, MAX_LOST_BITS)
    return float((1 - own / grid.clamp_min(1e-30)).clamp(0, 1).mean()), float(lost.mean())


def summary(r: PointRanges) -> dict:
    """Range ratio, cluster sizes and ranges, and the unused part of each cluster's grid vs a per-tensor grid.

    ``waste``: mean over a cluster's channels of 1 - (channel span / grid span); ``lost_bits``: mean of
    log2(grid span / channel span). "per_tensor" numbers are for the same channels on one grid for the tensor.
    """
    width = (r.hi - r.lo).clamp_min(0)
    median = float(width.median())
    own = _span(r.lo, r.hi)  # [C] the span each channel would need on a grid of its own
    tensor = _span(r.lo.min(), r.hi.max())
    glo, ghi = r.cluster_ranges()
    labels = r.labels
    clusters = []
    for g in range(len(glo)):
        mask = labels == g
        waste, lost = _unused(own[mask], _span(glo[g], ghi[g]))
        tensor_waste, tensor_lost = _unused(own[mask], tensor)
        clusters.append({"size": int(mask.sum()), "min": float(glo[g]), "max": float(ghi[g]), "waste": waste,
                         "per_tensor_waste": tensor_waste, "lost_bits": lost, "per_tensor_lost_bits": tensor_lost})
    waste, lost = _unused(own, _span(glo, ghi)[labels])  # each channel on its cluster's grid
    tensor_waste, tensor_lost = _unused(own, tensor)
    return {
        "point": r.point, "tensor": shown_point(REORDERS[r.point]), "description": _description(REORDERS[r.point]),
        "channels": r.lo.numel(), "heads": r.n_heads, "n_clusters": len(clusters),
        "range_ratio_max_median": float(width.max()) / median if median > 0 else math.inf,
        "per_tensor_range": [float(r.lo.min()), float(r.hi.max())],
        "waste": {"clustered": waste, "per_tensor": tensor_waste},
        "lost_bits": {"clustered": lost, "per_tensor": tensor_lost},
        "clusters": clusters,
    }


def summary_text(s: dict) -> str:
    """A few lines for the terminal."""
    sizes = [c["size"] for c in s["clusters"]]
    worst = max(s["clusters"], key=lambda c: c["lost_bits"])
    lines = [
        f"{s['point']} ({s['description']}): {s['channels']} channels, {s['n_clusters']} clusters"
        + (f" over {s['heads']} heads" if s["heads"] > 1 else ""),
        f"channel range ratio max/median: {s['range_ratio_max_median']:.1f}; per-tensor range "
        f"[{s['per_tensor_range'][0]:.3g}, {s['per_tensor_range'][1]:.3g}]",
        f"cluster sizes: {', '.join(map(str, sizes))}",
        f"unused grid per channel: {100 * s['waste']['clustered']:.0f}% with clusters "
        f"({s['lost_bits']['clustered']:.2f} bits lost) vs {100 * s['waste']['per_tensor']:.0f}% per tensor "
        f"({s['lost_bits']['per_tensor']:.2f} bits)",
        f"worst cluster: {worst['size']} channels in [{worst['min']:.3g}, {worst['max']:.3g}], "
        f"{100 * worst['waste']:.0f}% unused ({worst['lost_bits']:.2f} bits)",
    ]
    return "\n".join(lines)


def _pyplot():
    """matplotlib, an optional extra, with a headless backend."""
    try:
        import matplotlib
    except ImportError:
        raise RptqError("rptq inspect draws with matplotlib, which is not installed: run "
                        "`pip install matplotlib` (or `make install`), or pass only --json") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(n: int):
    """n colours, neighbouring clusters always far apart (tab10 then Dark2, cycled)."""
    from matplotlib import colormaps
    palette = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
    return [palette[i % len(palette)] for i in range(n)]


def _bars(ax, lo, hi, colors, order) -> None:
    """One vertical line per channel from its min to its max (x = position in ``order``)."""
    x = torch.arange(len(order)).numpy()
    width = max(0.2, min(1.2, 900 / len(order)))  # about one line per pixel column, however many channels
    ax.vlines(x, lo[order].numpy(), hi[order].numpy(), colors=[colors[i] for i in order], linewidth=width)
    ax.axhline(0, color="0.6", linewidth=0.5, zorder=0)
    ax.set_xlim(-1, len(order))
    ax.margins(y=0.04)


def render(r: PointRanges, s: dict, path: str, title: str) -> None:
    """Write the two-panel figure to ``path`` (PNG)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    labels = r.labels
    colors = _colors(s["n_clusters"])
    channel_colors = [colors[int(g)] for g in labels]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.6), dpi=100, sharey=True)
    model_order = torch.arange(r.lo.numel())
    _bars(top, r.lo, r.hi, channel_colors, model_order)
    for ax in (top, bottom):
        for y in s["per_tensor_range"]:
            ax.axhline(y, color="k", linestyle="--", linewidth=0.8)
    top.set_title("model's channel order (colour = cluster; dashed: the per-tensor range)", fontsize=10)
    top.set_ylabel("activation value")
    perm = r.clustering.perm
    _bars(bottom, r.lo, r.hi, channel_colors, perm)
    glo, ghi = r.cluster_ranges()
    start = 0
    for g, size in enumerate(r.clustering.cluster_sizes.tolist()):
        # each cluster's grid covers [min(lo, 0), max(hi, 0)] over its contiguous run of channels
        lo_g, hi_g = min(float(glo[g]), 0.0), max(float(ghi[g]), 0.0)
        bottom.add_patch(Rectangle((start - 0.5, lo_g), size, hi_g - lo_g, facecolor=colors[g], alpha=0.18,
                                   edgecolor=colors[g], linewidth=0.8))
        start += size
    if r.n_heads > 1:
        head = r.lo.numel() // r.n_heads
        for ax in (top, bottom):
            for h in range(1, r.n_heads):
                ax.axvline(h * head - 0.5, color="0.3", linewidth=0.6, linestyle=":")
    bottom.set_title("after the reorder (shaded: each cluster's quantization range; dashed: per tensor)", fontsize=10)
    bottom.set_xlabel("channel position")
    bottom.set_ylabel("activation value")
    text = (f"range ratio max/median {s['range_ratio_max_median']:.1f}   ·   {s['n_clusters']} clusters, sizes "
            f"{min(c['size'] for c in s['clusters'])}–{max(c['size'] for c in s['clusters'])}   ·   unused grid "
            f"per channel {100 * s['waste']['clustered']:.0f}% clustered vs {100 * s['waste']['per_tensor']:.0f}% "
            f"per tensor ({s['lost_bits']['clustered']:.2f} vs {s['lost_bits']['per_tensor']:.2f} bits lost)")
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.01, text, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": "rptq inspect"}))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- the command


def _heads_of_stats(stats: StatsFile, point: str) -> HeadLayout:
    """The head layout of the model a stats file was recorded on (its config), needed to cluster R2/R3."""
    name = stats.meta.get("model")
    try:
        config = load_config(name) if name else None
    except RptqError:
        config = None
    if config is not None:
        return head_layout(family_for(config), config)
    q, k = stats.layers[0]["q"][0].numel(), stats.layers[0]["k"][0].numel()
    if REORDERS[point].per_head or q != k:
        raise RptqError(f"the head layout of {name or 'the model'} the stats were recorded on is unknown here; "
                        "pass the model directory instead of the stats file")
    return HeadLayout(1, 1, q)  # R1/R4/R5 do not depend on heads; the R2/R3 clusters are then discarded


def inspect_layer(source: str, stats_file: StatsFile | None, layer: int, point: str, *, n_clusters=None,
                  seed=None, calibration=None, device="auto", dtype="auto", batch_size=1,
                  png: str | None = None) -> tuple[dict, str]:
    """Everything `rptq inspect` does but parsing and printing: (JSON summary, text summary); the figure to ``png``.

    ``stats_file``: the loaded stats, or None to calibrate ``source`` (a model) on the windows that
    ``calibration(tokenizer, model_config) -> (tokens [n, T], provenance)`` gives.
    """
    if png is not None:
        _pyplot()  # fail before calibrating when matplotlib is missing
    if stats_file is not None:
        check_layer(layer, len(stats_file.layers))
        stats, heads = stats_file.layers[layer], _heads_of_stats(stats_file, point)
        model, provenance = stats_file.meta.get("model", source), stats_file.meta.get("data") or {}
    else:
        check_layer(layer, load_config(source).num_hidden_layers)  # before loading anything
        dev = resolve_device(device)
        streamed = open_model(source, resolve_dtype(dtype, dev))
        config = streamed.model.config
        tokens, provenance = calibration(streamed.tokenizer, config)
        runner = LayerRunner(streamed, streamed.family, tokens, dev, batch_size)
        stats, heads, model = collect_layer_stats(runner, layer), head_layout(streamed.family, config), source
    seed = seed if seed is not None else provenance.get("seed", 2)
    r = point_ranges(stats, heads, point, n_clusters, seed)
    s = {"source": source, "model": model, "layer": layer, "calibration": provenance, "seed": seed,
         **summary(r), "min": r.lo.tolist(), "max": r.hi.tolist(), "perm": r.clustering.perm.tolist()}
    if png is not None:
        render(r, s, png, f"{Path(str(model)).name}  layer {layer}  {point}: {_description(REORDERS[point])}")
    return s, summary_text(s)
