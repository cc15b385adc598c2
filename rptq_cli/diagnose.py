"""Where the quantization error comes from: per activation quantizer, measured while the model runs.

Every :class:`ActQuant` of a quantized model is watched on real text: the relative squared error it adds
(``‖x̂ − x‖² / ‖x‖²``), the share of tokens with at least one value outside its grid (clipped), and where
the largest magnitude sits (channel, in the quantizer's reordered channel order, and token position). With
the FP model at hand, the KL divergence of the final next-token distributions is added. ``rptq eval
--report FILE`` and ``rptq quantize --report FILE`` write the result as JSON.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .evaluate import _windows, kl_divergence
from .nn.linear import QuantLinear
from .nn.quantizers import ActQuant
from .quant import grid

REPORT_WINDOWS = 8  # windows of the evaluation text the report runs on

@dataclass
class PointError:
    """Running totals of one quantizer's error."""
    sq_error: float = 0.0
    sq_signal: float = 0.0
    tokens: int = 0
    clipped_tokens: int = 0
    max_abs: float = 0.0
    max_channel: int = -1
    max_position: int = -1

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, clipped: torch.Tensor) -> None:
        """x, x_hat: float [T, C] (rows are tokens); clipped: bool [T] (a value of the token left the grid)."""
        self.sq_error += (x_hat - x).double().square().sum().item()
        self.sq_signal += x.double().square().sum().item()
        self.tokens += x.shape[0]
        self.clipped_tokens += int(clipped.sum())
        flat = x.abs().argmax().item()
        value = x.abs().flatten()[flat].item()
        if value > self.max_abs:
            self.max_abs, self.max_position, self.max_channel = value, *divmod(flat, x.shape[1])

    def to_dict(self) -> dict:
        return {"rel_mse": self.sq_error / max(self.sq_signal, 1e-30),
                "clipped_token_share": self.clipped_tokens / max(self.tokens, 1),
                "max_abs": self.max_abs, "max_channel": self.max_channel, "max_position": self.max_position}




def _clipped(x: torch.Tensor, quant: ActQuant) -> torch.Tensor:
    """bool [T]: tokens with a value beyond the grid's ends (static quantizers; a per-token grid never clips)."""
    if quant.dynamic:
        return torch.zeros(x.shape[0], dtype=torch.bool)
    scale = grid.expand_groups(quant.scale.float(), quant.group_sizes).to(x.device)
    zero = grid.expand_groups(quant.zero.float(), quant.group_sizes).to(x.device)
    lo, hi = -zero * scale, (grid.qmax(quant.bits) - zero) * scale
    half = scale / 2  # values within half a step of an end still round onto the grid
    return ((x < lo - half) | (x > hi + half)).any(-1).cpu()


@contextlib.contextmanager
def watch_quantizers(model: nn.Module):
    """Yields {module path: PointError}, filled while the model runs inside the block."""
    errors: dict[str, PointError] = {}
    hooks = []

    def watch(name: str, module: nn.Module, quant: ActQuant):
        def forward(_, args):
            # every input is [..., channels] here: forward_heads flattens (H, D) before calling the quantizer
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            x_hat = ActQuant.forward(quant, x)  # not quant(x): that would run a hook on it again
            errors.setdefault(name, PointError()).add(x, x_hat.float(), _clipped(x, quant))
        return module.register_forward_pre_hook(forward)

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.act is not None:
            # watched on the linear: its fused kernel quantizes the input without calling the quantizer
            hooks.append(watch(f"{name}.act", module, module.act))
        elif isinstance(module, ActQuant) and not name.endswith(".act"):
            hooks.append(watch(name, module, module))
    try:
        yield errors
    finally:
        for h in hooks:
            h.remove()


def activation_report(model: nn.Module, tokens: torch.Tensor, *, seqlen: int, max_windows: int = 8,
                      fp_model: nn.Module | None = None, progress: bool = False) -> dict:
    """Per-quantizer error of ``model`` on the first ``max_windows`` windows of ``tokens`` [1, N], and the
    KL divergence of its next-token distribution from ``fp_model``'s when given."""
    windows = _windows(tokens, seqlen)[:max_windows]
    with watch_quantizers(model) as errors, torch.inference_mode():
        for window in windows:
            model(window[None].to(next(model.parameters()).device))
    report = {"windows": int(windows.shape[0]), "seqlen": seqlen,
              "points": {name: e.to_dict() for name, e in errors.items()}}
    if fp_model is not None:
        report["kl_vs_fp"] = kl_divergence(fp_model, model, windows.reshape(1, -1), seqlen=seqlen,
                                           progress=progress)["kl"]
    return report
