"""Mistral's sliding window: the packed runtime attends only to the last ``sliding_window`` keys, as transformers'
own sliding-window attention of the same (simulated) model does."""
import pytest
import torch

from rptq_cli.config import QuantConfig
from rptq_cli.export import load_quantized, save_quantized
from rptq_cli.models import family_for
from rptq_cli.nn.attention import AttentionQuant
from rptq_cli.nn.kv_cache import PackedKVCache
from quantized import SMALL, corpus_ids, simulated
from tiny import tiny_config

WINDOW, LENGTH = 8, 40  # a context five windows long
# packed codes dequantized by the kernel vs the simulation's fake-quantized K/V: float32 rounding only
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(simulated model, the same model loaded packed from its checkpoint, token ids [1, LENGTH])."""
    config = QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL)  # K/V packed at 4 bits
    model, tok = simulated("mistral", config, hidden=64, heads=4, kv_heads=2, ffn=96, sliding_window=WINDOW)
    path = save_quantized(model, tok, config, tmp_path_factory.mktemp("mistral") / "q",
                          provenance={"source_model": "tiny-mistral"})
    loaded, _ = load_quantized(path)
    return model, loaded, corpus_ids(tok)[:, :LENGTH]


def packed_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position: the first ``prompt`` tokens in one forward, then one token at a time."""
    cache = PackedKVCache.from_model(model, max_length=ids.shape[1])
    assert cache is not None
    with torch.no_grad():
        out = [model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits]
        out += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(out, dim=1)


def test_the_family_declares_the_window():
    family = family_for(tiny_config("mistral", sliding_window=WINDOW))
    assert family.sliding_window(tiny_config("mistral", sliding_window=WINDOW), 0) == WINDOW
    assert family.sliding_window(tiny_config("llama"), 0) is None
    qwen2 = tiny_config("qwen2", layers=4, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    assert [family.sliding_window(qwen2, i) for i in range(4)] == [None, None, WINDOW, WINDOW]


@pytest.mark.parametrize("prompt", [5, 24], ids=["prompt-inside-window", "prompt-longer-than-window"])
def test_packed_attention_honours_the_sliding_window(mistral, prompt):
    simulated_model, loaded, ids = mistral
    assert {m.window for m in loaded.modules() if isinstance(m, AttentionQuant)} == {WINDOW}
    with torch.no_grad():
        expected = simulated_model(ids).logits  # transformers' sliding-window mask over the whole context
    got = packed_logits(loaded, ids, prompt)
    assert (got - expected).abs().max().item() < TOLERANCE

    # the same packed model attending to the whole context is far off: the window is what the test sees
    specs = [m for m in loaded.modules() if isinstance(m, AttentionQuant)]
    try:
        for spec in specs:
            spec.window = None
        unwindowed = packed_logits(loaded, ids, prompt)
    finally:
        for spec in specs:
            spec.window = WINDOW
    assert (unwindowed - expected).abs().max().item() > 50 * TOLERANCE
    assert torch.allclose(unwindowed[:, :WINDOW], expected[:, :WINDOW], atol=TOLERANCE)  # equal until it cuts
