"""What a model family looks like to RPTQ: the module path of each role of ``points.py``'s reorder points.

An adapter is data, not code: the pipeline reads the points' description (``points.py``) and these paths and
does the rest. Everything that differs between families (RoPE, the FFN width's config name, a sliding window,
modules rebuilt on load) is declared here and in the family's file, nowhere else. Adding a family is one small
file that builds a :class:`Family` and calls :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RptqError
from ..points import ACT_POINTS, POINTS, REORDERS, STAT_POINTS


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]   # config.model_type values served
    architectures: tuple[str, ...]  # class names, for messages
    layers: str                    # path of the decoder-layer ModuleList from the CausalLM
    embeddings: tuple[str, ...]    # modules that run before layer 0 (moved to the device for the capture)
    attn_norm: str                 # R1: norm whose output feeds q/k/v (path inside a layer)
    mlp_norm: str                  # R4: norm whose output feeds the MLP input projections
    attn: str                      # the attention module
    q: str
    k: str
    v: str
    o: str                         # out_proj: input is R3
    mlp_in: tuple[str, ...]        # fc1, or (gate_proj, up_proj): rows permuted together by R5
    mlp_out: str                   # fc2 / down_proj: input is R5
    norm_kind: str                 # "layer" | "rms"
    rope: bool                     # keys are rotated: R2 is a gather after RoPE inside attention, not folded
    ffn_size: str                  # config attribute holding the MLP width (ffn_dim, intermediate_size)
    computed_modules: tuple[str, ...] = ()  # buffers computed from the config, not stored (RoPE): rebuilt on load

    def heads(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return n_heads, n_kv, head_dim

    def paths(self, *roles: str) -> tuple[str, ...]:
        """Module paths (inside a layer) of the roles named in ``points.py`` ("q", "mlp_in", ...), in order."""
        out = []
        for role in roles:
            path = getattr(self, role)
            out += path if isinstance(path, tuple) else [path]
        return tuple(out)

    def linear_inputs(self) -> list[tuple[str, str]]:
        """Every linear layer of a decoder layer with the activation point that feeds it."""
        return [(path, p.name) for p in ACT_POINTS for path in self.paths(*p.consumers)]

    def input_groups(self) -> list[tuple[str, ...]]:
        """The linears of a layer grouped by the input they share (q/k/v; out_proj; fc1 or gate/up; fc2)."""
        return [self.paths(*p.consumers) for p in ACT_POINTS if p.consumers]

    def norm_points(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(point, norm path, consumer paths) of each norm output RPTQ reorders (R1, R4)."""
        return [(p.name, getattr(self, p.norm), self.paths(*p.consumers)) for p in ACT_POINTS if p.norm]

    def widths(self, config) -> dict[str, int]:
        """Channels of each point width ("hidden", "query", "kv", "ffn") of ``points.py``."""
        n_heads, n_kv, head_dim = self.heads(config)
        return {"hidden": config.hidden_size, "query": n_heads * head_dim, "kv": n_kv * head_dim,
                "ffn": getattr(config, self.ffn_size)}

    def point_channels(self, config) -> dict[str, int]:
        """Channels of every calibrated activation point (a stats file's tensors)."""
        widths = self.widths(config)
        return {p.name: widths[p.width] for p in ACT_POINTS if p.name in STAT_POINTS}

    def cluster_channels(self, config) -> dict[str, int]:
        """Channels each reorder point clusters: per head for R2/R3, the whole tensor for the others."""
        widths = self.widths(config)
        return {r.name: self.heads(config)[2] if r.per_head else widths[POINTS[r.features[0]].width]
                for r in REORDERS.values()}

    def sliding_window(self, config, layer_index: int) -> int | None:
        """Keys a query of layer ``layer_index`` attends to (the most recent ones); None: the whole context."""
        return None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def check(self, config) -> None:
        """Refuse layouts the reorder does not handle, with the reason."""


@dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv

    def to_query_heads(self, perm_kv: torch.Tensor) -> torch.Tensor:
        """A within-head permutation of the KV channels, applied to every query head of each group."""
        local = perm_kv.view(self.n_kv, self.head_dim) % self.head_dim
        local = local.repeat_interleave(self.rep, 0)
        return (local + torch.arange(self.n_heads)[:, None] * self.head_dim).reshape(-1)

    def kv_local(self, perm_kv: torch.Tensor) -> torch.Tensor:
        """[kv_heads, head_dim] positions within each head."""
        return perm_kv.view(self.n_kv, self.head_dim) % self.head_dim

    def query_group_sizes(self, clustering) -> torch.Tensor:
        """Cluster sizes over the query channels: each query head takes its KV head's clusters."""
        if len(clustering.groups_per_head) != self.n_kv:  # one cluster for the whole tensor
            return torch.tensor([self.n_heads * self.head_dim], dtype=torch.int32)
        per_head = torch.split(clustering.cluster_sizes, clustering.groups_per_head)
        return torch.cat([per_head[h // self.rep] for h in range(self.n_heads)])

    def reduce_query_heads(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ranges over query heads [Hq·D] → over the KV heads they read [Hkv·D]."""
        shape = (self.n_kv, self.rep, self.head_dim)
        return lo.view(shape).amin(1).reshape(-1), hi.view(shape).amax(1).reshape(-1)


def head_layout(family: "Family", config) -> HeadLayout:
    return HeadLayout(*family.heads(config))


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def supported_architectures() -> list[str]:
    return sorted({a for f in _FAMILIES.values() for a in f.architectures})


def family_for(config) -> Family:
    family = _FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        archs = ", ".join(getattr(config, "architectures", None) or [str(getattr(config, "model_type", "?"))])
        raise RptqError(f"unsupported architecture {archs}; rptq supports {', '.join(supported_architectures())}")
    family.check(config)
    return family


def get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path)


def replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))


def norm_bias(norm: nn.Module) -> torch.Tensor | None:
    return getattr(norm, "bias", None)
