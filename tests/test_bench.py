"""The end-to-end decode row of ``rptq bench``, on a tiny model: both sides measured, in their own processes."""
import pytest
from transformers import LlamaConfig

from rptq_cli.bench_e2e import decode_rows


@pytest.mark.slow
def test_decode_row_measures_ours_against_hf_generate():
    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    (row,) = decode_rows(quick=True, threads=1, model_cfg=tiny)
    assert row["op"] == "w4a4kv_e2e_decode" and row["shape"] == "llama 2L h64 decode 24 tok"
    assert row["baseline"] == "hf_generate_bf16" and row["backend"] != "torch_bf16"
    assert row["ms"] > 0 and row["baseline_ms"] > 0
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=1e-2)
    assert row["tokens_per_s"] == pytest.approx(1000 / row["ms"], rel=1e-2)
    assert row["peak_rss_mb"] > 50 and row["baseline_peak_rss_mb"] > 50  # each side's own process: torch alone
