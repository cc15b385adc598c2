"""rptq_cli.evaluate: windowed perplexity (GPTQ protocol) and KL divergence, on a tiny random OPT."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from rptq_cli.errors import RptqError
from rptq_cli.evaluate import kl_divergence, perplexity

VOCAB = 64
SEQLEN = 16


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        dropout=0.0,
    )
    return OPTForCausalLM(config).eval()


def random_tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, count), generator=torch.Generator().manual_seed(seed))


def hand_perplexity(model, tokens: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) over positions 1..seqlen-1 of each whole window, in float64."""
    nlls = []
    with torch.no_grad():
        for start in range(0, tokens.shape[1] - seqlen + 1, seqlen):
            window = tokens[:, start : start + seqlen]
            log_probs = model(window).logits.double().log_softmax(-1)[0, :-1]
            nlls.append(-log_probs.gather(1, window[0, 1:, None]).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


def test_perplexity_equals_exp_mean_nll():
    model, tokens = tiny_opt(), random_tokens(3 * SEQLEN)

    result = perplexity(model, tokens, seqlen=SEQLEN, progress=False)

    assert result["windows"] == 3 and result["seqlen"] == SEQLEN
    assert result["ppl"] == pytest.approx(hand_perplexity(model, tokens, SEQLEN), rel=1e-5)


def test_perplexity_agrees_with_transformers_loss():
    model, tokens = tiny_opt(), random_tokens(3 * SEQLEN)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in tokens.reshape(3, SEQLEN)]

    result = perplexity(model, tokens, seqlen=SEQLEN, progress=False)

    assert result["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_tail_is_dropped():
    model, tokens = tiny_opt(), random_tokens(3 * SEQLEN + SEQLEN - 1)

    with_tail = perplexity(model, tokens, seqlen=SEQLEN, progress=False)
    without_tail = perplexity(model, tokens[:, : 3 * SEQLEN], seqlen=SEQLEN, progress=False)

    assert with_tail == without_tail and with_tail["windows"] == 3


def test_batch_size_does_not_change_the_result():
    model, tokens = tiny_opt(), random_tokens(3 * SEQLEN)

    one = perplexity(model, tokens, seqlen=SEQLEN, batch_size=1, progress=False)
    batched = perplexity(model, tokens, seqlen=SEQLEN, batch_size=2, progress=False)

    assert batched["windows"] == 3 and batched["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_fewer_tokens_than_a_window_raises():
    message = f"has {SEQLEN - 1} tokens, fewer than one window of {SEQLEN}.*smaller --seqlen"
    with pytest.raises(RptqError, match=message):
        perplexity(tiny_opt(), random_tokens(SEQLEN - 1), seqlen=SEQLEN, progress=False)


def test_non_finite_loss_raises():
    model = tiny_opt()
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")

    with pytest.raises(RptqError, match="NaN/inf"):
        perplexity(model, random_tokens(2 * SEQLEN), seqlen=SEQLEN, progress=False)


def test_training_mode_is_restored():
    model = tiny_opt().train()

    perplexity(model, random_tokens(SEQLEN), seqlen=SEQLEN, progress=False)

    assert model.training


def test_kl_divergence_is_zero_to_itself_and_matches_hand_computation():
    reference, other, tokens = tiny_opt(seed=0), tiny_opt(seed=1), random_tokens(4 * SEQLEN)

    to_itself = kl_divergence(reference, reference, tokens, seqlen=SEQLEN, max_windows=1, progress=False)
    assert to_itself["kl"] == pytest.approx(0, abs=1e-6)

    result = kl_divergence(reference, other, tokens, seqlen=SEQLEN, max_windows=2, progress=False)
    with torch.no_grad():
        windows = tokens.reshape(4, SEQLEN)[:2]
        log_p_ref = reference(windows).logits.double().log_softmax(-1)
        log_p = other(windows).logits.double().log_softmax(-1)
    expected = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1).mean().item()
    assert result["windows"] == 2 and result["kl"] == pytest.approx(expected, rel=1e-4) and result["kl"] > 0
