"""The RPTQ pipeline, one decoder layer at a time (DESIGN §2):

    stats → cluster → fold the reorder → calibrate activation ranges and GPTQ Hessians → quantize
    weights and install the activation quantizers → run the quantized layer to feed the next one.

The result is the model itself, rewritten in place with :class:`QuantLinear`, :class:`ReorderNorm` and the
attention quantizers: the same modules a packed checkpoint loads into.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import ChannelObserver, LayerRunner, observe_layer
from .config import FP, QuantConfig
from .models.base import Family, head_layout, replace
from .nn.attention import AttentionQuant
from .nn.head import quantize_head
from .nn.linear import QuantLinear
from .nn.quantizers import ActQuant
from .quant.clip import search_clip, search_token_clip
from .quant.gptq import GPTQ
from .quant.grid import group_min_max
from .quant.weights import rtn_quantize, weight_group_sizes
from .points import STAT_POINTS
from .reorder import fold_layer, plan_layer
from .stats_file import LayerStats, StatsFile

CLIP_SAMPLE_ROWS = 2048  # token rows kept per activation point for the clipping search


@dataclass
class QuantReport:
    """What happened, for provenance and logs."""
    seconds: dict = field(default_factory=lambda: {"stats": 0.0, "cluster": 0.0, "calibrate": 0.0,
                                                   "weights": 0.0, "propagate": 0.0, "pack": 0.0})
    gptq_loss: dict = field(default_factory=dict)


class _Phases:
    """``with phase("cluster"):`` adds the block's seconds to ``seconds[name]`` and shows ``layer i/n: name`` on
    the layer progress bar (whose rate gives the ETA)."""

    def __init__(self, seconds: dict, bar, tag: str):
        self.seconds, self.bar, self.tag = seconds, bar, tag

    @contextlib.contextmanager
    def __call__(self, name: str, shown: str | None = None):
        if self.tag:
            self.bar.set_postfix_str(f"{self.tag}: {shown or name}", refresh=True)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def act_quantizer(observer: ChannelObserver, groups: torch.Tensor, bits: int, clip: str,
                  per_token: bool = False) -> ActQuant | None:
    """Static per-group parameters from calibration (the group's min/max, or the MSE-best clipped range), or
    a per-token quantizer over the same groups."""
    if bits >= FP:
        return None
    if per_token:
        clip_ratio = search_token_clip(observer.samples(), groups, bits) if clip == "mse" and observer.kept else None
        return ActQuant.per_token(groups, bits, clip_ratio)
    if clip == "mse" and observer.kept:
        lo, hi = search_clip(observer.samples(), groups, bits, observer.lo, observer.hi)
    else:
        lo, hi = group_min_max(observer.lo, observer.hi, groups)
    return ActQuant.from_range(lo, hi, groups, bits)


@contextlib.contextmanager
def collect_hessians(layer: nn.Module, paths_by_input: list[tuple[str, ...]]):
    """One GPTQ Hessian per distinct input (q/k/v share theirs, as do gate/up); yields {path: GPTQ}."""
    solvers, hooks = {}, []
    for paths in paths_by_input:
        first = GPTQ(layer.get_submodule(paths[0]).weight.data)
        solvers[paths[0]] = first
        hooks.append(layer.get_submodule(paths[0]).register_forward_pre_hook(
            lambda module, args, solver=first: solver.add_batch(args[0])))
    try:
        yield solvers
    finally:
        for h in hooks:
            h.remove()
    for paths in paths_by_input:
        shared = solvers[paths[0]]
        for path in paths[1:]:
            solvers[path] = GPTQ(layer.get_submodule(path).weight.data)
            # GPTQ damps its Hessian in place, so each solver gets its own copy
            solvers[path].H, solvers[path].nsamples = shared.H.clone(), shared.nsamples


def quantize_layer_weights(layer: nn.Module, family: Family, config: QuantConfig, groups: dict[str, torch.Tensor],
                           acts: dict[str, ActQuant | None], solvers: dict[str, GPTQ], report: QuantReport,
                           layer_index: int) -> None:
    """Replace every linear of the layer by a QuantLinear with quantized weight and input quantizer."""
    for path, point in family.linear_inputs():
        linear = layer.get_submodule(path)
        quantized = None
        if config.quantizes_weights:
            gs = weight_group_sizes(linear.in_features, config.weight_groups, groups[point])
            if config.weight_quantizer == "gptq":
                quantized = solvers[path].quantize(gs, config.wbits, config.blocksize, config.percdamp)
                report.gptq_loss[f"{layer_index}.{path}"] = solvers[path].loss
            else:
                quantized = rtn_quantize(linear.weight.data.float(), gs, config.wbits)
        replace(layer, path, QuantLinear.from_linear(linear, quantized, acts[point]))


def quantize_model(model, family: Family, tokens: torch.Tensor, config: QuantConfig, *,
                   stats: StatsFile | None = None, device: str | torch.device = "cpu", batch_size: int = 1,
                   seed: int = 0, progress: bool = True, writer=None, resume=None) -> QuantReport:
    """Quantize ``model`` in place with RPTQ, calibrating on ``tokens`` [nsamples, seqlen].

    ``model``: an in-memory model, or a :class:`~rptq_cli.loading.StreamedModel` whose layers are read from
    their files one at a time and released once quantized (memory: one layer + the calibration activations).
    ``writer``: an :class:`~rptq_cli.export.CheckpointWriter` that packs each layer as soon as it is done.
    ``resume``: a :class:`~rptq_cli.resume.ResumableRun` that records each finished layer durably and, for a
    resumed run, gives the first unfinished layer and the activations entering it (the loop starts there).
    """
    if writer is None and getattr(model, "files", None) is not None:
        raise ValueError("a streamed model releases each layer once quantized: pass a writer to keep them")
    report = QuantReport()
    runner = LayerRunner(model, family, tokens, device, batch_size)
    heads = head_layout(family, runner.model.config)
    gptq = config.quantizes_weights and config.weight_quantizer == "gptq"
    hidden = runner.inputs
    n = len(runner.layers)
    keep_rows = CLIP_SAMPLE_ROWS if config.act_clip == "mse" else 0
    start = 0
    if resume is not None:
        start, saved, seconds = resume.restore()
        if start:
            hidden = saved  # the quantized layer start-1's outputs, as the uninterrupted run propagated them
            report.seconds.update(seconds)
    weights_phase = "gptq" if gptq else "rtn" if config.quantizes_weights else "quantizers"
    bar = tqdm(range(start, n), desc=f"quantize {config.label}", unit="layer", disable=not progress,
               initial=start, total=n)
    for i in bar:
        tag = f"layer {i + 1}/{n}" if progress else ""
        phase = _Phases(report.seconds, bar, tag)
        layer = runner.materialize(i)
        with runner.on_device(layer):
            with phase("stats"):
                if stats is not None:
                    layer_stats: LayerStats = stats.layers[i]
                else:
                    with observe_layer(layer, family) as observers:
                        runner.forward(layer, hidden, desc=f"{tag} stats" if tag else "")
                    layer_stats = {p: (o.lo, o.hi) for p, o in observers.items()}

            with phase("cluster"):
                plan = plan_layer(layer_stats, heads, config, seed=seed)
                fold_layer(layer, family, heads, plan)
                groups = plan.group_sizes(heads)

            with phase("calibrate"):
                with observe_layer(layer, family, keep_rows=keep_rows, seed=seed) as observers, \
                        (collect_hessians(layer, family.input_groups()) if gptq
                         else contextlib.nullcontext({})) as solvers:
                    runner.forward(layer, hidden, desc=f"{tag} calibrate" if tag else "")
                acts = {p: act_quantizer(observers[p], groups[p], config.act_bits(p), config.act_clip,
                                         config.per_token(p))
                        for p in STAT_POINTS}
                del observers  # their clip samples are not needed by GPTQ

            with phase("weights", shown=weights_phase):
                quantize_layer_weights(layer, family, config, groups, acts, solvers, report, i)
                attn = layer.get_submodule(family.attn)
                attn.rptq = AttentionQuant(qk_perm=attn.rptq.qk_perm, q=acts["q"], k=acts["k"], v=acts["v"],
                                           p_bits=config.act_bits("p"),
                                           window=family.sliding_window(runner.model.config, i))

            with phase("propagate"):
                hidden = runner.forward(layer, hidden, desc=f"{tag} propagate" if tag else "")
        with phase("pack"):  # into the checkpoint's shards, then the resume record (durable)
            if writer is not None:
                writer.add_module(layer, runner.prefix(i))
            runner.release(i)
            if resume is not None:
                resume.layer_done(i + 1, n, hidden, dict(report.seconds))
    if config.head_bits < FP:
        quantize_head(runner.model, config.head_bits, read=getattr(model, "read", None))
    return report
