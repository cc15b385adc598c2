"""Layer-by-layer calibration: capture layer 0's inputs once, then run one decoder layer at a time.

Only the layer being processed sits on the device; the hidden states of all calibration windows wait on
the CPU between layers (memory: one layer + nsamples × seqlen × hidden). Each layer sees the outputs of
the already-processed previous layer, so quantization errors propagate as they will at inference.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import RptqError
from .models.base import Family
from .nn.attention import AttentionQuant, use_rptq_attention
from .nn.linear import QuantLinear
from .points import ACT_POINTS, STAT_POINTS
from .stats_file import LayerStats


class ChannelObserver:
    """Running per-channel min and max of [tokens, C] inputs, plus a seeded sample of token rows."""

    def __init__(self, keep_rows: int = 0, seed: int = 0):
        self.lo = self.hi = None
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise RptqError("NaN or inf in the activations during calibration; the model overflows in this "
                            "dtype or the weights are broken: try --dtype float32 or check the model")
        lo, hi = x.amin(0).cpu(), x.amax(0).cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.kept < self.keep_rows:
            take = min(self.keep_rows - self.kept, max(1, self.keep_rows // 16), x.shape[0])
            idx = torch.randperm(x.shape[0], generator=self.generator)[:take]
            self.rows.append(x[idx.to(x.device)].cpu())
            self.kept += take

    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0, self.lo.numel())


@contextlib.contextmanager
def observe_layer(layer: nn.Module, family: Family, keep_rows: int = 0, seed: int = 0):
    """Observers at every activation point of ``layer`` while the block runs; yields {point: observer}."""
    observers = {p: ChannelObserver(keep_rows, seed + i) for i, p in enumerate(STAT_POINTS)}
    attn = layer.get_submodule(family.attn)
    if getattr(attn, "rptq", None) is None:
        attn.rptq = AttentionQuant()

    def input_hook(point):
        return lambda module, args: observers[point].update(args[0])

    # a point read by linears is observed at the first one's input; q, k, v inside the attention function
    hooks = [layer.get_submodule(family.paths(*p.consumers)[0]).register_forward_pre_hook(input_hook(p.name))
             for p in ACT_POINTS if p.observed and not p.in_attention]
    attn.rptq.observer = lambda name, x: observers[name].update(x)
    try:
        yield observers
    finally:
        attn.rptq.observer = None
        for h in hooks:
            h.remove()


class _Captured(Exception):
    pass


def _trim_heap() -> None:
    """Give the heap glibc keeps after a layer back to the system (the RSS between layers crept up by ~0.07 GiB
    a layer on a 7B model); nothing where there is no glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 * 2**20


def _fix_mmap_threshold() -> None:
    """Serve every allocation of 4 MiB or more with its own mmap, returned to the system when freed. glibc's
    default threshold rises to 32 MiB as large blocks are freed, after which buffers of a few MiB (GPTQ's
    per-block copies on a 7B layer) are carved from the heap, which then only grows: the peak of down_proj's GPTQ
    step crept from 2.93 to 3.35 GiB over 17 layers of the 7B-shaped model while the RSS between layers stayed at
    0.69 GiB (README, "Large models"). Nothing where there is no glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


class LayerRunner:
    """Feeds calibration windows through the decoder one layer at a time.

    ``model`` is an in-memory model or a :class:`~rptq_cli.loading.StreamedModel` whose weights stay in their
    files: :meth:`materialize` reads layer ``i`` when its turn comes and :meth:`release` frees it after (both do
    nothing for a model held in memory), so the same loop serves every model size.
    """

    def __init__(self, model, family: Family, tokens: torch.Tensor, device: torch.device, batch_size: int = 1):
        from .loading import StreamedModel
        _fix_mmap_threshold()
        self.streamed = model if isinstance(model, StreamedModel) else StreamedModel(model, None, family, None)
        self.model, self.family = self.streamed.model, family
        self.device, self.batch_size = torch.device(device), batch_size
        self.layers = family.decoder_layers(self.model)
        use_rptq_attention(self.model)
        self.inputs, self.layer_kwargs = self._capture(tokens)

    def prefix(self, i: int) -> str:
        return f"{self.family.layers}.{i}"

    def materialize(self, i: int) -> nn.Module:
        """Layer ``i`` with its weights in memory (read from the files of a streamed model)."""
        return self.streamed.materialize(self.prefix(i))

    def release(self, i: int) -> None:
        """Free layer ``i``'s tensors (streamed model only; a model in memory keeps its layers), and the float32
        scales its QuantLinears cached for the CPU kernels (not a buffer: they would stay, ~10 MB a 7B layer)."""
        if self.streamed.files is None:
            return
        self.streamed.release(self.prefix(i))
        for module in self.layers[i].modules():
            if isinstance(module, QuantLinear):
                module.drop_kernel_scales()
        _trim_heap()

    def _embedding_paths(self) -> list[str]:
        paths = []
        for path in self.family.embeddings:
            try:
                if self.model.get_submodule(path) is not None:
                    paths.append(path)
            except AttributeError:
                pass  # optional module (e.g. OPT's project_in when sizes match)
        return paths

    def _capture(self, tokens: torch.Tensor):
        """Layer 0's input hidden states [n, T, hidden] (CPU) and its keyword arguments (mask, RoPE, ...)."""
        captured, kwargs_seen = [], {}

        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append(hidden.detach().cpu())
            if not kwargs_seen:
                kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Captured

        paths = self._embedding_paths()
        embeddings = [self.streamed.materialize(path) for path in paths]
        for m in embeddings:
            m.to(self.device)
        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for row in tokens:  # one window at a time: the captured mask then broadcasts over any batch
                    try:
                        self.model(row[None].to(self.device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()
            for m, path in zip(embeddings, paths):
                m.to("cpu")
                self.streamed.release(path)
        kwargs_seen.update(past_key_values=None, use_cache=False)
        return torch.cat(captured), kwargs_seen

    @contextlib.contextmanager
    def on_device(self, layer: nn.Module):
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to("cpu")

    def forward(self, layer: nn.Module, inputs: torch.Tensor, desc: str = "") -> torch.Tensor:
        """Run ``layer`` (already on the device) over all windows; returns its outputs on the CPU."""
        outputs = torch.empty_like(inputs)
        bs = self.batch_size
        with torch.no_grad():
            for start in tqdm(range(0, inputs.shape[0], bs), desc=desc, leave=False, unit="batch",
                              disable=not desc):
                out = layer(inputs[start:start + bs].to(self.device), **self.layer_kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outputs[start:start + bs] = out.to("cpu", inputs.dtype)
        return outputs


def collect_stats(runner: LayerRunner, progress: bool = True) -> list[LayerStats]:
    """Per-channel (min, max) at every point of every layer, propagating FP outputs layer to layer."""
    stats, hidden = [], runner.inputs
    n = len(runner.layers)
    for i in tqdm(range(n), desc="calibrate", unit="layer", disable=not progress):
        layer = runner.materialize(i)
        with runner.on_device(layer), observe_layer(layer, runner.family) as observers:
            hidden = runner.forward(layer, hidden, desc=f"layer {i + 1}/{n}" if progress else "")
        runner.release(i)
        stats.append({p: (o.lo, o.hi) for p, o in observers.items()})
    return stats
