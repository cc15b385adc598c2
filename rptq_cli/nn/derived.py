"""Tensors derived from a module's buffers once, instead of on every forward.

At decode a forward handles one token, so rebuilding an index or a table from the buffers costs as much as the
work it serves. :func:`derived` keeps the result beside the module until a source buffer is replaced (``.to``,
assignment) or written in place (``load_state_dict``: its version counter moves). Inference tensors keep no
version counter, so what is derived from them is rebuilt on every call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def derived(module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], object]):
    """``build()``, cached on ``module`` under ``name`` for as long as ``sources`` are unchanged. The check runs
    on every forward of a decode step, so it is written as plain loops (generators cost microseconds a call)."""
    cached = module.__dict__.get(name)
    if cached is not None and _unchanged(cached[0], sources):
        return cached[1]
    value = build()
    for t in sources:
        if t.is_inference():
            return value
    module.__dict__[name] = (tuple([(t, t._version) for t in sources]), value)
    return value


def _unchanged(stamp: tuple, sources: tuple[torch.Tensor, ...]) -> bool:
    if len(stamp) != len(sources):
        return False
    for (kept, version), t in zip(stamp, sources):
        if kept is not t or version != t._version:
            return False
    return True
