"""A linear layer with packed low-bit weights and a static per-cluster input quantizer.

With weight groups equal to the input's activation clusters (the RPTQ default), the whole layer is one
``rptq::linear_aq`` call: quantize the input per cluster, integer dot products, scales in the epilogue.
Otherwise the input is fake-quantized and the weight-only kernel ``rptq::linear_a16`` runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import FP
from ..quant.weights import QuantizedWeight
from .derived import derived
from .quantizers import ActQuant


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int, bias: torch.Tensor | None,
                 act: ActQuant | None = None, weight: torch.Tensor | None = None,
                 qweight: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, group_sizes: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, int(bits)
        self.act = act
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if self.bits < FP:
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)
            self.register_buffer("group_sizes", group_sizes.to(torch.int32))
            self.weight = None
        else:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.fused = (act is not None and self.bits < FP and act.bits < FP and not act.dynamic
                      and torch.equal(act.group_sizes.cpu(), self.group_sizes.cpu()))
        self._cpu_scales = None  # kernel_scales' float32 copy (nn.derived)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized: QuantizedWeight | None, act: ActQuant | None) -> "QuantLinear":
        bias = linear.bias.data if linear.bias is not None else None
        if quantized is None:
            return cls(linear.in_features, linear.out_features, bits=FP, bias=bias, act=act, weight=linear.weight.data)
        return cls(linear.in_features, linear.out_features, bits=quantized.bits, bias=bias, act=act,
                   qweight=kernels.pack_weight(quantized.codes, quantized.bits), scales=quantized.scales,
                   zeros=quantized.zeros, group_sizes=quantized.group_sizes)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (for tests and export checks)."""
        if self.weight is not None:
            return self.weight.float()
        codes = kernels.unpack_weight(self.qweight, self.bits, self.out_features, self.in_features)
        return QuantizedWeight(codes, self.scales, self.zeros, self.group_sizes, self.bits).dequantize()

    def kernel_scales(self) -> torch.Tensor:
        """The scales as this device's kernels read them. The CUDA kernels read the stored fp16; the CPU kernels
        read float32, and converting on every call cost 0.1 ms of a 0.6 ms 4096² GEMV, so the CPU keeps a
        float32 copy (1/16 of the packed 4-bit g128 weight), rebuilt if the buffer is replaced or written
        (``load_state_dict`` writes in place). Inference tensors keep no version counter: converted per call."""
        scales = self.scales
        if scales.device.type != "cpu" or scales.dtype == torch.float32:
            self.drop_kernel_scales()
            return scales
        return derived(self, "_cpu_scales", (scales,), scales.float)

    def drop_kernel_scales(self) -> None:
        """Forget the float32 copy of the scales (a streamed layer being released must not keep it alive)."""
        self._cpu_scales = None
        self.__dict__.pop("_kernel_args", None)

    def kernel_args(self) -> tuple:
        """The kernel's weight arguments ``(qweight, scales, zeros, group_sizes)`` (scales: :meth:`kernel_scales`)
        and, fused, the input grid's ``(act_scale, act_zero)``: one tuple, kept until a buffer is replaced or
        written. Every layer runs once per decoded token, and reading six buffers through ``nn.Module``'s attribute
        lookup cost about as much as a small GEMV (10 µs)."""
        b = self._buffers
        sources = (b["qweight"], b["scales"], b["zeros"], b["group_sizes"])
        if self.fused:
            sources += (self.act._buffers["scale"], self.act._buffers["zero"])
        return derived(self, "_kernel_args", sources,
                       lambda: (sources[0], self.kernel_scales(), *sources[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters.get("bias")
        if self.fused:
            qweight, scales, zeros, group_sizes, act_scale, act_zero = self.kernel_args()
            return kernels.linear_aq(x, qweight, scales, zeros, group_sizes, self.bits, act_scale, act_zero,
                                     self.act.bits, bias)
        if self.act is not None:
            x = self.act(x)
        if self.weight is not None:
            return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return kernels.linear_a16(x, *self.kernel_args(), self.bits, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, wbits={self.bits}, fused={self.fused}"
