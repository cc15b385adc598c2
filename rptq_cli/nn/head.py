"""Token embeddings and lm_head kept in float16, the dtype the checkpoint stores them in.

In a packed model these two are the largest tensors left in floating point (SmolLM2-135M: 49152 × 576, tied),
and at decode the lm_head GEMV reads all of it for every token. Widening them to float32 on the CPU doubled
both their memory and the bytes each token streams; kept in float16, the stored values are exact and only
the lm_head's input and output are rounded (relative logit error about 4e-4, measured in tests).

``--head-bits 8`` halves what the lm_head streams once more: :func:`quantize_head` turns it into a packed 8-bit
QuantLinear (round to nearest, min/max per row and group of HEAD_GROUP columns), run by the integer GEMV. A
tied head gets codes of its own; the embedding table stays float16 and exact (a lookup reads only its rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.weights import rtn_quantize, weight_group_sizes
from .linear import QuantLinear

HEAD_GROUP = 64  # input columns per group of an 8-bit lm_head: a whole chunk of the integer GEMV
HEAD_ROWS = 2048  # rows of the head quantized at a time (quantize_head)


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


def head_path(model: nn.Module) -> str:
    """The module path of ``model``'s lm_head ("lm_head")."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def quantize_head(model: nn.Module, bits: int, read=None) -> None:
    """Replace ``model``'s lm_head with a packed ``bits``-bit QuantLinear, in place (untied from the embeddings,
    which keep their float weight). ``read(name)``: the stored tensor of a head left on the meta device (a
    StreamedModel's ``read``). Quantized HEAD_ROWS rows at a time, so that the float temporaries stay small next
    to the head itself (Llama-70B's is 32000 × 8192)."""
    path = head_path(model)
    head: nn.Linear = model.get_submodule(path)
    weight = read(f"{path}.weight") if head.weight.device.type == "meta" else head.weight.detach()
    bias = None if head.bias is None else (read(f"{path}.bias") if head.bias.device.type == "meta" else head.bias)
    sizes = weight_group_sizes(head.in_features, HEAD_GROUP)
    parts = [rtn_quantize(rows.float(), sizes, bits) for rows in weight.split(HEAD_ROWS)]
    packed = QuantLinear(head.in_features, head.out_features, bits=bits, bias=bias,
                         qweight=torch.cat([kernels.pack_weight(q.codes, bits) for q in parts]),
                         scales=torch.cat([q.scales for q in parts]), zeros=torch.cat([q.zeros for q in parts]),
                         group_sizes=sizes)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, packed)
