"""``rptq bench``: ours and each baseline timed the same way, every measured row reported, and the end-to-end
decode row on a tiny model (both sides measured, in their own processes)."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from rptq_cli import bench
from rptq_cli.bench import cpu, e2e, timing
from rptq_cli.bench.e2e import decode_rows
from rptq_cli.bench.table import row


@pytest.fixture
def small_rotation(monkeypatch):
    """Rotate through copies worth 4 KiB instead of hundreds of MiB (the policy, not the size, is under test)."""
    monkeypatch.setattr(timing, "rotation_bytes", lambda device: 4096)


def test_ours_and_the_baseline_are_timed_alike(small_rotation, monkeypatch):
    """On a clock that only the candidates move (a loaded machine makes real sleeps overshoot by tens of ms)."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    calls = []

    def takes(name, seconds):
        def run(tensor):
            calls.append((name, tensor.data_ptr()))
            now[0] += seconds
        return run

    inputs = (torch.zeros(256),)  # 1 KiB: 4 copies make the 4 KiB pass
    ms, baseline_ms = timing.time_pair((takes("ours", 0.004), inputs), (takes("base", 0.016), inputs), 5)
    assert [name for name, _ in calls] == ["ours", "base"] * (timing.WARMUP + 5)  # alternating, same count
    for name in ("ours", "base"):  # both rotate through the same number of distinct copies
        assert len({ptr for who, ptr in calls if who == name}) == 4
    assert ms == pytest.approx(4) and baseline_ms == pytest.approx(16)
    # the speedup is the baseline's time over ours: a 4x slower baseline gives 4
    assert row("op", "shape", "cpu", ms, "base", baseline_ms)["speedup"] == 4.0


def test_without_rotation_both_sides_get_the_originals():
    seen = []
    inputs = (torch.zeros(4),)
    timing.time_pair((lambda t: seen.append(t.data_ptr()), inputs), (lambda t: seen.append(t.data_ptr()), inputs), 3,
                     rotate=False)
    assert set(seen) == {inputs[0].data_ptr()}


def test_every_measured_row_is_printed_and_written(small_rotation, monkeypatch, tmp_path):
    norm_calls = []
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: norm_calls.append(1) or rms_norm(*a, **k))

    def small_cpu_rows(quick, add):  # the real benches at small shapes: attention has two baselines
        add(cpu.bench_attention(4, 32, 64, 3, 2, bw=1.0))
        add(cpu.bench_norm(4, 64, True, 2))
        add(cpu.bench_kv_append(4, 32, 4, 2))

    monkeypatch.setattr(cpu, "cpu_rows", small_cpu_rows)
    monkeypatch.setattr(e2e, "decode_rows", lambda *args, **kwargs: [])
    printed = []
    rows = bench.run_bench(quick=True, threads=1, json_path=str(tmp_path / "rows.json"), echo=printed.append)
    pairs = [(r["op"], r["baseline"]) for r in rows]
    assert pairs == [("kv3_decode_attention", "sdpa_fp32"), ("kv3_decode_attention", "sdpa_bf16"),
                     ("reorder_rmsnorm", "torch_fp32_rms_norm"), ("kv4_append", "torch_fp32_copy")]
    assert norm_calls  # the RMSNorm baseline is torch's own F.rms_norm
    table = printed[printed.index("") + 1:]
    for r in rows:
        assert sum(r["op"] in line and r["baseline"] in line for line in table) == 1, table
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def tiny_llama():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def check_decode_rows(rows, shape):
    assert [r["op"] for r in rows] == ["w4a16_e2e_decode", "w4a4kv_e2e_decode", "w4a16_head8_e2e_decode",
                                       "w4a4kv_head8_e2e_decode"]
    for row_ in rows:
        assert row_["shape"] == shape
        assert row_["baseline"] == "hf_generate_bf16" and row_["backend"] != "torch_bf16"
        assert row_["ms"] > 0 and row_["baseline_ms"] > 0 and row_["tokens_per_s"] > 0
        assert row_["peak_rss_mb"] > 50 and row_["baseline_peak_rss_mb"] > 50  # each side's own process: torch alone
    assert len({r["baseline_ms"] for r in rows}) == 1  # one HF measurement serves every row


@pytest.mark.slow
def test_decode_rows_measure_ours_against_hf_generate():
    check_decode_rows(decode_rows(quick=True, threads=1, model_cfg=tiny_llama(), rounds=1),
                      "llama 2L h64 decode 24 tok")


@pytest.mark.slow
def test_decode_rows_of_a_model_directory(tmp_path):
    """``rptq bench --e2e-model DIR``: the model is quantized here with each preset and decoded as the rows above."""
    e2e.prepare(tmp_path, tiny_llama())
    check_decode_rows(e2e.model_decode_rows(tmp_path / "fp16", quick=True, threads=1, rounds=1),
                      "llama 2L h64 decode 24 tok")


def test_decode_rows_take_each_sides_fastest_pass(monkeypatch, tmp_path):
    """The sides are measured in turn, ``rounds`` times; a side reports its fastest pass and its highest peak."""
    order, speeds = [], {"fp": [60.0, 50.0], "a": [30.0, 40.0], "b": [25.0, 20.0]}

    def side(path, which, new_tokens, threads, device):
        name = "fp" if which == "fp" else path.name
        order.append(name)
        ms = speeds[name][sum(n == name for n in order) - 1]
        backend = "torch_bf16" if which == "fp" else "cpu-avx2"
        return {"ms_per_token": ms, "tokens_per_s": 1000 / ms, "peak_mb": 100 + ms, "backend": backend}

    monkeypatch.setattr(e2e, "_in_subprocess", side)
    rows = e2e._measure(tmp_path / "fp", {"a": tmp_path / "a", "b": tmp_path / "b"}, "s", True, 1, "cpu", rounds=2)
    assert order == ["fp", "a", "b", "fp", "a", "b"]
    assert [(r["op"], r["ms"], r["baseline_ms"]) for r in rows] == [("a_e2e_decode", 30.0, 50.0),
                                                                    ("b_e2e_decode", 20.0, 50.0)]
    assert [r["peak_rss_mb"] for r in rows] == [140.0, 125.0] and rows[0]["baseline_peak_rss_mb"] == 160.0


def test_e2e_model_adds_its_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "cpu_rows", lambda quick, add: None)
    monkeypatch.setattr(e2e, "decode_rows", lambda *args, **kwargs: [])
    asked = []
    monkeypatch.setattr(e2e, "model_decode_rows", lambda model, *args: asked.append(model) or [
        row("w4a16_e2e_decode", "llama", "cpu", 1.0, "hf_generate_bf16", 2.0)])
    rows = bench.run_bench(quick=True, threads=1, echo=lambda line: None, e2e_model=str(tmp_path))
    assert asked == [str(tmp_path)] and [r["op"] for r in rows] == ["w4a16_e2e_decode"]


def test_the_cli_passes_e2e_model_on(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from rptq_cli.cli import main
    asked = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: asked.update(kwargs))
    result = CliRunner().invoke(main, ["bench", "--quick", "--e2e-model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert asked["e2e_model"] == str(tmp_path) and asked["quick"]
