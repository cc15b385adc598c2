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
    """``build()``, cached on ``module`` under ``name`` for as long as ``sources`` are unchanged."""
    if any(t.is_inference() for t in sources):
        return build()
    stamp = tuple((t, t._version) for t in sources)
    cached = module.__dict__.get(name)
    if cached is None or any(a is not b or va != vb for (a, va), (b, vb) in zip(cached[0], stamp)):
        cached = module.__dict__[name] = (stamp, build())
    return cached[1]
