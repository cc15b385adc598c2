"""Token embeddings and lm_head kept in float16, the dtype the checkpoint stores them in.

In a packed model these two are the largest tensors left in floating point (SmolLM2-135M: 49152 × 576, tied),
and at decode the lm_head GEMV reads all of it for every token. Widening them to float32 on the CPU doubled
both their memory and the bytes each token streams; kept in float16, the stored values are exact and only
the lm_head's input and output are rounded (relative logit error about 4e-4, measured in tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HalfEmbedding(nn.Embedding):
    """An embedding whose table is float16; the looked-up rows come out in ``out_dtype``."""

    out_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


class HalfLinear(nn.Linear):
    """A linear layer (lm_head) computed in float16 from an input of any float dtype, returned in that dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.half()
        return F.linear(x.half(), self.weight, bias).to(x.dtype)


def half_state_names(model: nn.Module) -> set[str]:
    """State names (``weight``, ``bias``) of ``model``'s input embeddings and lm_head: the tensors a packed model
    keeps in float16 (the loader leaves them as stored; ``rptq memory`` counts them at 2 bytes)."""
    vocab = (model.get_input_embeddings(), model.get_output_embeddings())
    return {f"{name}.{p}" for name, module in model.named_modules() if any(module is v for v in vocab)
            for p in ("weight", "bias")}


def keep_head_in_half(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Turn ``model``'s input embeddings and lm_head (tied or not) into float16 modules, in place; embeddings
    come out in ``compute_dtype``. Their weights hold the checkpoint's float16 values (:func:`half_state_names`)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embed) is nn.Embedding:
        embed.__class__ = HalfEmbedding
        embed.weight.data = embed.weight.data.half()
        embed.out_dtype = compute_dtype
    if type(head) is nn.Linear:
        head.__class__ = HalfLinear
        head.weight.data = head.weight.data.half()  # tied: the same Parameter as the embedding's, already half
        if head.bias is not None:
            head.bias.data = head.bias.data.half()
