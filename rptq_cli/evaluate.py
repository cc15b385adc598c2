"""Perplexity and KL divergence of causal language models over token windows.

The perplexity protocol is GPTQ's, which the official RPTQ code uses: the token stream is cut into
non-overlapping windows of ``seqlen`` (the tail is dropped, no stride), each window is one forward pass
without cache, and the perplexity is exp of the mean next-token NLL over every predicted token.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rptq_cli.errors import RptqError
from rptq_cli.loading import input_device

MAX_MEAN_NLL = math.log(torch.finfo(torch.float64).max)  # ≈ 709.8 nats


def perplexity(
    model, tokens: torch.Tensor, *, seqlen: int, batch_size: int = 1, progress: bool = True, desc: str = ""
) -> dict:
    """Perplexity of ``model`` on ``tokens`` (LongTensor [1, N]) in windows of ``seqlen``.

    Returns ``{"ppl", "windows", "seqlen"}``. Positions 1..seqlen-1 of each window are predicted; the loss
    is taken on float32 logits and summed over windows in float64.
    """
    windows = _windows(tokens, seqlen)
    total_nll = 0.0  # a Python float: float64, so thousands of windows add up without drift
    with _eval_mode(model), torch.inference_mode():
        for start, batch in _batches(windows, batch_size, progress, desc):
            logits = _logits(model, batch)
            targets = batch[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
            if not math.isfinite(nll):
                raise RptqError(
                    f"the loss is {nll} in windows {start}..{start + len(batch) - 1}: the model produces NaN/inf "
                    "logits; check the model in float32, or its quantization settings"
                )
            total_nll += nll
    mean_nll = total_nll / (windows.shape[0] * (seqlen - 1))
    if mean_nll > MAX_MEAN_NLL:  # math.exp would overflow; no working model is this far off
        raise RptqError(f"the mean loss is {mean_nll:.1f} nats per token, a perplexity beyond float range: the model's "
                        "outputs are broken (corrupted weights?); check the model in float32")
    return {"ppl": math.exp(mean_nll), "windows": windows.shape[0], "seqlen": seqlen}


def kl_divergence(
    model_ref,
    model,
    tokens: torch.Tensor,
    *,
    seqlen: int,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Mean per-token KL(p_ref || p) of ``model``'s next-token distribution from ``model_ref``'s.

    Every position of the first ``max_windows`` windows (all when None) counts. Returns
    ``{"kl", "windows", "seqlen"}``; 0 means the two models predict identically.
    """
    windows = _windows(tokens, seqlen)[:max_windows]
    total_kl = 0.0
    with _eval_mode(model_ref, model), torch.inference_mode():
        for _, batch in _batches(windows, 1, progress, desc):
            log_p_ref = F.log_softmax(_logits(model_ref, batch), dim=-1)
            log_p = F.log_softmax(_logits(model, batch), dim=-1).to(log_p_ref.device)
            total_kl += F.kl_div(log_p, log_p_ref, log_target=True, reduction="sum").item()
    return {"kl": total_kl / windows.numel(), "windows": windows.shape[0], "seqlen": seqlen}


def _windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows [count, seqlen] of a token stream [1, N]; the tail that fills no window is dropped."""
    if seqlen < 2:
        raise RptqError(f"seqlen {seqlen} leaves nothing to predict; pass --seqlen 2 or more")
    stream = tokens.reshape(-1)
    count = stream.numel() // seqlen
    if count == 0:
        raise RptqError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "use a smaller --seqlen or longer data"
        )
    return stream[: count * seqlen].reshape(count, seqlen)


def _batches(windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first window, batch of windows) pairs, with a progress bar counted in windows."""
    with tqdm(total=windows.shape[0], desc=desc or None, unit="window", disable=not progress) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            yield start, batch
            bar.update(batch.shape[0])


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [batch, seqlen, vocab]: the loss of a half-precision model is still taken in float32."""
    return model(input_ids=input_ids.to(input_device(model)), use_cache=False).logits.float()


@contextmanager
def _eval_mode(*models):
    """Evaluate without dropout, then give each model back in the mode it came in."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
