"""Layers that read one input, run as one kernel call: q, k and v (after the attention norm), gate and up (after
the MLP norm).

At decode each of these layers is a GEMV of one token, and a small model's layers are small: on SmolLM2-135M
(576 wide) a call's fixed cost (the op's dispatch, quantizing the input, the kernel's set-up, waking the
threads) is a good part of its time, and k_proj's 192 rows barely keep two threads busy. Their weights share
the input's groups (the same clusters), so their rows can be one packed weight: one call, one quantization of
the input, all rows split among the threads.

:class:`JointLinear` concatenates the layers' rows once and points each layer's buffers at its slice of the
result (views: the model holds no byte twice, and each layer still works on its own and keeps its
``state_dict``). It is built on first use and kept while every layer still holds those very tensors; one that
was replaced (the model moved to another device, a tensor assigned anew; writes in place reach the shared
storage and change nothing) drops it, and the layers run one by one
until it is rebuilt. Layers with hooks, or whose ``forward`` was wrapped, and the layers of a model spread by
accelerate (:func:`keep_apart`) always run one by one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ..config import FP
from .linear import QuantLinear
from .quantizers import ActQuant

_ACT_BUFFERS = ("scale", "zero", "clip", "group_sizes")


class JointLinear:
    """One :class:`QuantLinear` computing the rows of ``layers`` (same input, bits and groups) at once."""

    def __init__(self, layers: tuple[QuantLinear, ...]):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        first = layers[0]
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            some = next(b for b in biases if b is not None)
            bias = torch.cat([b.detach() if b is not None else some.new_zeros(n) for b, n in zip(biases, self.sizes)])
        self.linear = QuantLinear(
            first.in_features, sum(self.sizes), bits=first.bits, bias=bias, act=first.act,
            qweight=torch.cat([layer.qweight for layer in layers]),
            scales=torch.cat([layer.scales for layer in layers]),
            zeros=torch.cat([layer.zeros for layer in layers]), group_sizes=first.group_sizes)
        joint = self.linear
        for layer, qweight, scales, zeros in zip(layers, joint.qweight.split(self.sizes),
                                                 joint.scales.split(self.sizes), joint.zeros.split(self.sizes)):
            layer.qweight, layer.scales, layer.zeros = qweight, scales, zeros
            layer.drop_kernel_scales()
        if bias is not None:
            for layer, rows in zip(layers, joint.bias.split(self.sizes)):
                if layer.bias is not None:
                    layer.bias = nn.Parameter(rows, requires_grad=False)
        self._held = _held_tensors(layers)

    @staticmethod
    def joinable(layers: tuple[nn.Module, ...]) -> bool:
        """Whether ``layers`` compute what one QuantLinear over their rows computes, with nothing watching them."""
        if not all(isinstance(layer, QuantLinear) and layer.bits < FP for layer in layers) or _watched(layers):
            return False
        first = layers[0]
        return all(layer.bits == first.bits and layer.in_features == first.in_features
                   and layer.qweight.device == first.qweight.device and layer.qweight.device.type != "meta"
                   and torch.equal(layer.group_sizes, first.group_sizes) and _same_act(layer.act, first.act)
                   for layer in layers[1:])

    def holds(self, layers: tuple[nn.Module, ...]) -> bool:
        """Whether ``layers`` still hold the tensors this joint layer was built on (so that it computes theirs)."""
        return layers == self.layers and all(a is b for a, b in zip(_held_tensors(layers), self._held))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, -1)


def run_joint(owner: nn.Module, key: str, layers: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``layers`` applied to ``x``: through their :class:`JointLinear` (kept in ``owner.__dict__[key]``, out
    of the module tree and its ``state_dict``) where they allow one, else one by one."""
    joint = owner.__dict__.get(key)
    if joint is not None and joint is not False and not (joint.holds(layers) and not _watched(layers)):
        joint = None  # stale (a tensor was replaced) or watched: built anew below if the layers allow it
    if joint is None:
        # ordinary tensors even under inference mode (`rptq eval`): inference tensors keep no version counter, so
        # the layers' buffers could be neither written in place nor their float32 scales cached
        with torch.inference_mode(False):
            joint = JointLinear(layers) if JointLinear.joinable(layers) else False
        owner.__dict__[key] = joint
    if joint is False:
        return tuple(layer(x) for layer in layers)
    return joint(x)


#: the joint layers of the lean forwards: key in the owner's ``__dict__`` → the owner's layers it joins
JOINTS = {"_rptq_qkv": ("q_proj", "k_proj", "v_proj"), "_rptq_gate_up": ("gate_proj", "up_proj")}


def keep_apart(model: nn.Module) -> None:
    """Never join the layers of ``model``: for a model spread by accelerate, whose hooks load each decoder layer's
    tensors before it runs and release them after (a joint layer would be rebuilt on every forward and keep the
    released tensors alive)."""
    for module in model.modules():
        for key, names in JOINTS.items():
            if all(hasattr(module, name) for name in names):
                module.__dict__[key] = False


def _held_tensors(layers) -> list:
    """Every tensor (and quantizer) of ``layers`` a joint layer copies or reads, by identity."""
    held = []
    for layer in layers:
        b = layer._buffers
        held += [b["qweight"], b["scales"], b["zeros"], b["group_sizes"], layer._parameters.get("bias"), layer.act]
        if layer.act is not None:
            held += [layer.act._buffers.get(name) for name in _ACT_BUFFERS]
    return held


def _watched(layers) -> bool:
    """Whether a hook or a wrapped forward (accelerate) must see each layer's own call."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(layer._forward_hooks or layer._forward_pre_hooks or "forward" in layer.__dict__ for layer in layers)


def _same_act(a: ActQuant | None, b: ActQuant | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    if a.bits != b.bits:
        return False
    for name in _ACT_BUFFERS:
        x, y = a._buffers.get(name), b._buffers.get(name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


class _LeanGatedMLP:
    """The forward of the gated MLPs of Llama, Mistral and Qwen2 (``down(act(gate(x)) · up(x))``), with gate and up
    as one call (:func:`run_joint`); mixed in before the family's class by :func:`use_lean_gated_mlp`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = run_joint(self, "_rptq_gate_up", (self.gate_proj, self.up_proj), x)  # JOINTS' names
        return self.down_proj(self.act_fn(gate) * up)


def use_lean_gated_mlp(mlps: list[nn.Module]) -> None:
    """Give each gated MLP module the forward of :class:`_LeanGatedMLP`, in place; each stays an instance of its
    transformers class."""
    classes: dict[type, type] = {}
    for mlp in mlps:
        cls = type(mlp)
        if not issubclass(cls, _LeanGatedMLP):
            mlp.__class__ = classes.setdefault(cls, type(f"Lean{cls.__name__}", (_LeanGatedMLP, cls), {}))
