"""The norm that writes its output already reordered (R1, R4): ``norm(x)[..., perm]`` in one op.

LayerNorm and RMSNorm statistics are permutation invariant, so gathering the input and using the
permuted gamma/beta gives exactly the permuted output; the residual stream is never permuted.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class ReorderNorm(nn.Module):
    def __init__(self, perm: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool):
        super().__init__()
        self.eps = float(eps)
        self.rms = bool(rms)
        self.register_buffer("perm", perm.long().contiguous())
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def fold(cls, norm: nn.Module, perm: torch.Tensor, rms: bool, eps: float) -> "ReorderNorm":
        """The reordered twin of an ``nn.LayerNorm`` / ``LlamaRMSNorm``: gamma and beta permuted."""
        bias = getattr(norm, "bias", None)
        return cls(perm, norm.weight.data[perm], None if bias is None else bias.data[perm], eps, rms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.reorder_norm(x, self.perm, self.weight, self.bias, self.eps, self.rms)

    def extra_repr(self) -> str:
        return f"{self.perm.numel()}, eps={self.eps}, rms={self.rms}"
