"""GPTQ (Frantar et al., arXiv 2210.17323) with static, uneven groups, as RPTQ runs it.

Columns are quantized one at a time in their (reordered) order; the error of each is spread over the
columns not yet quantized through the upper Cholesky factor of H⁻¹, H = 2/n Σ x xᵀ. The (scale, zero)
of every (row, group) is fixed from the weight before the loop ("static groups", as the official
RPTQ code does), so groups may be uneven and cross block boundaries. No act-order: RPTQ's reorder
already chose the column order.
"""
from __future__ import annotations

import math
import warnings

import torch

from .grid import dequantize, expand_groups, group_min_max, quantize
from .weights import QuantizedWeight, fp16_affine_params

CHOLESKY_RETRIES = 3  # each retry multiplies the damping by 10


class GPTQ:
    """Collects the Hessian of one linear layer's input, then quantizes its weight.

    weight: float [N, K] (nn.Linear layout). After :meth:`quantize`, ``loss`` holds the error GPTQ
    left, ½ tr(ΔW H ΔWᵀ) with ΔW = W − Ŵ and the damped H: the mean over calibration tokens of the
    squared layer-output error ‖ΔW x‖², plus ½ λ ‖ΔW‖² from the damping λ.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.columns = weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0
        self.loss: float | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate the inputs x [..., K] (any float dtype); every row of K values is one sample."""
        x = x.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # running mean, so H keeps the scale of one sample however many batches arrive
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.T @ x

    def quantize(self, group_sizes: torch.Tensor, bits: int, blocksize: int = 128, percdamp: float = 0.01) -> QuantizedWeight:
        """Quantize the weight with one (scale, zero) per (row, group); group_sizes int [G], sum K.

        Consumes the Hessian (it is the largest tensor of the layer), so call it once.
        """
        if self.H is None:
            raise RuntimeError("GPTQ.quantize was already called: the Hessian is consumed")
        H, self.H = self.H, None
        check_finite_hessian(H)
        W = self.weight.detach().to(H.device, torch.float32, copy=True)
        self.weight = None  # the layer's FP weight can be freed as soon as its linear is replaced
        # a column whose input was always 0 cannot affect the output: make it harmless for the solve
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1
        W[:, dead] = 0

        lo, hi = group_min_max(W, W, group_sizes)
        scale, zero = fp16_affine_params(lo, hi, bits)  # static groups: fixed before any GPTQ update
        # the group of every column; (scale, zero) are expanded one block at a time, not to [N, K]
        column_group = expand_groups(torch.arange(len(group_sizes), device=W.device), group_sizes)

        Hinv = damped_inverse_cholesky(H, percdamp)
        del H
        codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
        losses = torch.zeros_like(W[:, 0])
        # the column loop works on a block's transpose, so that a column of W is a contiguous row
        scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1t, Hinv1 = W[:, i1:i2].T.contiguous(), Hinv[i1:i2, i1:i2]
            codes1t, Err1t = torch.empty_like(W1t, dtype=torch.uint8), torch.empty_like(W1t)
            for i in range(i2 - i1):
                w, d, g = W1t[i], Hinv1[i, i], column_group[i1 + i]
                s, z = scale_t[g], zero_t[g]
                codes1t[i] = quantize(w, s, z, bits)
                q = dequantize(codes1t[i], s, z)
                losses += (w - q).square() / d**2 / 2
                err = (w - q) / d
                W1t[i:] -= Hinv1[i, i:, None] * err[None, :]
                Err1t[i] = err
            codes[:, i1:i2] = codes1t.T
            # lazy batch update: the columns after this block get the whole block's error at once
            W[:, i2:] -= Err1t.T @ Hinv[i1:i2, i2:]
        self.loss = losses.sum().item()
        return QuantizedWeight(codes, scale.half(), zero.to(torch.uint8), group_sizes.to(torch.int32).cpu(), bits)


def check_finite_hessian(H: torch.Tensor) -> None:
    """ValueError when the Hessian H float32 [K, K] holds inf/NaN (calibration activations that overflowed)."""
    if not torch.isfinite(H).all():
        raise ValueError("the GPTQ Hessian holds inf/NaN: the calibration activations overflowed their dtype")


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean(diag H); H float32 [K, K] (damped in place).

    A Hessian from few or collinear samples can be singular in float32: retry with 10× the damping, then raise
    ValueError.
    """
    mean_diag = H.diagonal().mean()
    damped = 0.0
    for attempt in range(CHOLESKY_RETRIES + 1):
        damp = percdamp * 10**attempt
        H.diagonal().add_((damp - damped) * mean_diag)
        damped = damp
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            # free L before the second factorization: three [K, K] buffers at most (H, H⁻¹, U), not four
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(U).all():
                return U
        if attempt < CHOLESKY_RETRIES:
            warnings.warn(f"GPTQ: Cholesky failed with damping {damp:g}; retrying with {damp * 10:g}", RuntimeWarning, stacklevel=3)
    raise ValueError(f"the GPTQ Hessian ({H.shape[0]} input columns) is not positive definite even with damping "
                     f"{damped:g} x its mean diagonal: the calibration tokens are too few or too alike")
