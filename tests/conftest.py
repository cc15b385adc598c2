import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import build_tokenizer, corpus_text, save_tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def sample_text() -> str:
    return corpus_text()


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-opt"), "opt")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text() * 4)
    return path


@pytest.fixture(scope="session")
def stats_file(tiny_opt_dir, corpus_file, tmp_path_factory):
    """`rptq calibrate` of the tiny OPT on the corpus (4 windows of 32 tokens, seed 0)."""
    from cli_run import run
    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    result = run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, "--nsamples", "4", "--seqlen", "32",
                 "--seed", "0", "-o", out)
    assert result.exit_code == 0, result.output
    return out
