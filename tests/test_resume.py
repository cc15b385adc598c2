"""`rptq quantize --resume`: a run SIGKILLed after a finished layer continues there and writes the same bytes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rptq_cli.export import ShardWriter
from rptq_cli.resume import KILL_AFTER_ENV, RECORD
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--nsamples", "4", "--seqlen", "32"]
# GPTQ and per-token activations with the sampled MSE clip: every seeded step of the pipeline is exercised
CONFIG = ["--wbits", "4", "--abits", "4", "--act-clip", "mse", "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama4"), "llama", layers=4, heads=4, kv_heads=2)


def quantize(model, corpus, out, *extra, seed=0, kill_after=None):
    """`rptq quantize ... -o q` run in ``out``'s directory, in a subprocess (a SIGKILL must hit a real process);
    returns the CompletedProcess. The same relative -o makes the recorded commands of two runs equal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop(KILL_AFTER_ENV, None)
    if kill_after is not None:
        env[KILL_AFTER_ENV] = str(kill_after)
    args = [sys.executable, "-m", "rptq_cli.cli", "quantize", str(model), "--calib-path", str(corpus), *CALIB,
            "--seed", str(seed), *CONFIG, "-o", out.name, *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    """Every file's bytes; rptq.json without its timings, README.md (the model card) as it is."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    record = json.loads(files.pop("rptq.json"))
    record.pop("seconds")
    files["rptq.json"] = json.dumps(record, sort_keys=True).encode()
    return files


def resumable_dirs(work: Path, name: str) -> list[Path]:
    return [p for p in work.iterdir() if p.name.startswith(f".{name}.tmp-") and p.name.endswith("-resume")]


@pytest.fixture(scope="module")
def reference(tiny4, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "q"
    result = quantize(tiny4, corpus_file, out)
    assert result.returncode == 0, result.stderr
    return out


def test_killed_run_resumes_byte_identical(tiny4, corpus_file, reference, tmp_path):
    out = tmp_path / "q"
    killed = quantize(tiny4, corpus_file, out, kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    [left] = resumable_dirs(tmp_path, "q")
    record = json.loads((left / RECORD).read_text())
    assert (record["done"], record["layers"]) == (2, 4)
    assert record["hidden"]["file"] == "hidden-2.bin" and (left / "hidden-2.bin").is_file()

    # without --resume the finished layers are not thrown away
    refused = quantize(tiny4, corpus_file, out)
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2/4 finished layers" in errors[0] and "--resume" in errors[0], refused.stderr
    assert resumable_dirs(tmp_path, "q") == [left]

    resumed = quantize(tiny4, corpus_file, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at layer 3/4" in resumed.stderr
    assert checkpoint_files(out) == checkpoint_files(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary left


def test_resume_after_first_layer(tiny4, corpus_file, reference, tmp_path):
    out = tmp_path / "q"
    assert quantize(tiny4, corpus_file, out, kill_after=1).returncode == -signal.SIGKILL
    resumed = quantize(tiny4, corpus_file, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at layer 2/4" in resumed.stderr
    assert checkpoint_files(out) == checkpoint_files(reference)


def test_resume_with_another_seed_is_refused(tiny4, corpus_file, tmp_path):
    out = tmp_path / "q"
    assert quantize(tiny4, corpus_file, out, kill_after=1).returncode == -signal.SIGKILL
    refused = quantize(tiny4, corpus_file, out, "--resume", seed=3)
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "--seed differs from the interrupted run (0 vs 3)" in errors[0], errors[0]
    assert not out.exists()
    [left] = resumable_dirs(tmp_path, "q")  # kept for a resume with the right inputs
    assert json.loads((left / RECORD).read_text())["done"] == 1
    resumed = quantize(tiny4, corpus_file, out, "--resume")
    assert resumed.returncode == 0 and "resuming at layer 2/4" in resumed.stderr, resumed.stderr


def test_resume_without_interrupted_run_starts_fresh(tiny4, corpus_file, reference, tmp_path):
    out = tmp_path / "q"
    result = quantize(tiny4, corpus_file, out, "--resume")
    assert result.returncode == 0, result.stderr
    assert "no interrupted run" in result.stderr
    assert checkpoint_files(out) == checkpoint_files(reference)


def test_shard_writer_restore_after_crash(tmp_path):
    """State saved mid-way, more tensors added (a crash in the next layer), restored: the same shards."""
    torch.manual_seed(0)
    tensors = [(f"t{i}", torch.randn(40 + i)) for i in range(12)]

    def write(directory, crash_at=None):
        directory.mkdir()
        w = ShardWriter(directory, max_shard_bytes=600, durable=True)
        for i, (name, t) in enumerate(tensors):
            if i == crash_at:
                state = w.state()
                w.sync()
                for name2, t2 in tensors[i:i + 5]:  # part of the next layer, then the crash
                    w.add(name2, t2)
                w.spill.close()
                w = ShardWriter(directory, max_shard_bytes=600, durable=True)
                w.restore(json.loads(json.dumps(state)))
            w.add(name, t)
        w.finish()
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    reference = write(tmp_path / "a")
    assert len(reference) > 2  # several shards and an index
    assert write(tmp_path / "b", crash_at=5) == reference


def test_damaged_record_is_refused(tiny4, corpus_file, tmp_path):
    out = tmp_path / "q"
    assert quantize(tiny4, corpus_file, out, kill_after=1).returncode == -signal.SIGKILL
    [left] = resumable_dirs(tmp_path, "q")
    hidden = left / "hidden-1.bin"
    hidden.write_bytes(hidden.read_bytes()[:-4])
    refused = quantize(tiny4, corpus_file, out, "--resume")
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is damaged" in errors[0] and "delete that directory" in errors[0], refused.stderr
    assert resumable_dirs(tmp_path, "q") and not out.exists()  # left for the user to look at and delete
