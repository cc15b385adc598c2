"""Hostile inputs (issue 12): garbage is refused with one `error:` line and exit code 2, nothing that is not
rptq's is ever overwritten, altered checkpoints are caught, and SIGTERM or SIGKILL leave nothing behind.

Every case builds its damaged input from the tiny models of tiny.py and checks the exit code, the message
and what is left on disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rptq_cli import outputs
from rptq_cli.errors import RptqError
from cli_run import assert_user_error, run

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--nsamples", "4", "--seqlen", "32", "--seed", "0"]
QUICK = ["--wbits", "4", "--abits", "4", "--kv-only", "--weight-quantizer", "rtn",
         "--clusters", "R1=8,R2=2,R3=2,R4=8,R5=8"]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what a run must leave untouched."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """Enough text for a few evaluation windows: the tests check refusals, not perplexities."""
    from tiny import corpus_text
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(corpus_text()[:3000])
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_opt_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("strict") / "ckpt"
    result = run("quantize", tiny_opt_dir, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def rewrite_weights(directory: Path, edit) -> None:
    """Apply ``edit`` to the checkpoint's tensors and write them back as rptq would (without new hashes)."""
    file = directory / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)


# ------------------------------------------------------------------------------------------ strict loading


def test_quantize_refuses_an_rptq_checkpoint_as_source(checkpoint, corpus_file, tmp_path):
    result = run("quantize", checkpoint, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", tmp_path / "out")
    assert_user_error(result, "is an rptq checkpoint, not an FP model", "FP source")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_quantization_config_is_named(checkpoint, short_text, tmp_path):
    damaged = copy(checkpoint, tmp_path / "ckpt")
    config = json.loads((damaged / "config.json").read_text())
    del config["quantization_config"]
    (damaged / "config.json").write_text(json.dumps(config))
    result = run("eval", damaged, "--data-path", short_text, "--seqlen", 32)
    assert_user_error(result, "rptq packed weights", "no quantization_config")


def test_foreign_quant_method_is_named(checkpoint, short_text, tmp_path):
    damaged = copy(checkpoint, tmp_path / "gptq")
    config = json.loads((damaged / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (damaged / "config.json").write_text(json.dumps(config))
    assert_user_error(run("eval", damaged, "--data-path", short_text, "--seqlen", 32), "'gptq'-quantized")
    assert_user_error(run("generate", damaged, "The river"), "'gptq'-quantized")


def _edit_source(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


FC1 = "model.decoder.layers.1.fc1.weight"


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.pop(FC1), ["missing 1 tensor", FC1, "nothing was initialized at random"]),
    (lambda t: t.update({"model.decoder.extra.weight": torch.zeros(3)}), ["does not use", "extra.weight"]),
    (lambda t: t.update({FC1: t[FC1][:10].clone()}), ["shape", FC1]),
    (lambda t: t.update({FC1: (t[FC1] * 100).to(torch.int8)}), ["stores parameter", FC1, "I8"]),
], ids=["missing", "unexpected", "wrong-shape", "int8-bytes"])
def test_source_model_must_be_complete(tiny_opt_dir, corpus_file, tmp_path, edit, words):
    src = copy(tiny_opt_dir, tmp_path / "src")
    _edit_source(src, edit)
    result = run("quantize", src, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", tmp_path / "out")
    assert_user_error(result, *words)
    assert not (tmp_path / "out").exists()
    assert "LOAD REPORT" not in result.output  # transformers' table is silenced: one line only


def test_truncated_source_weights(tiny_opt_dir, short_text, tmp_path):
    src = copy(tiny_opt_dir, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run("eval", src, "--data-path", short_text, "--seqlen", 32), "truncated")


def _drop_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)


def test_source_without_tokenizer(tiny_opt_dir, corpus_file, tmp_path):
    src = copy(tiny_opt_dir, tmp_path / "src")
    _drop_tokenizer(src)
    assert_user_error(run("calibrate", src, "--calib-path", corpus_file, *CALIB, "-o", tmp_path / "s.safetensors"),
                      "no tokenizer files")
    assert not (tmp_path / "s.safetensors").exists()


def test_checkpoint_without_tokenizer(checkpoint, tmp_path):
    damaged = copy(checkpoint, tmp_path / "ckpt")
    _drop_tokenizer(damaged)
    assert_user_error(run("generate", damaged, "The river"), "is missing", "recorded when written")
    assert_user_error(run("generate", damaged, "The river", "--no-verify"), "no tokenizer files")


# ------------------------------------------------------------------------------------------ never clobber


def test_output_equal_to_the_source_is_refused_even_with_force(tiny_opt_dir, corpus_file, tmp_path):
    src = copy(tiny_opt_dir, tmp_path / "src")
    before = tree(src)
    result = run("quantize", src, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", src, "--force")
    assert_user_error(result, "would replace the source model")
    assert tree(src) == before


def test_force_replaces_only_rptq_checkpoints(tiny_opt_dir, corpus_file, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    result = run("quantize", tiny_opt_dir, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", mine, "--force")
    assert_user_error(result, "not a checkpoint directory rptq wrote")
    assert tree(mine) == {"cat.jpg": b"meow"}
    # a source model inside the output would go with it
    parent = tmp_path / "models"
    copy(tiny_opt_dir, parent / "src")
    assert_user_error(run("quantize", parent / "src", *QUICK, "-o", parent, "--force"), "would replace the source")


def test_force_accepts_an_empty_directory_and_an_rptq_checkpoint(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ours = dict(is_ours=lambda p: False, kind="checkpoint directory", directory=True)
    outputs.check_output(empty, True, **ours)  # no error
    from rptq_cli.export import check_output
    check_output(checkpoint, True)
    with pytest.raises(RptqError, match="--force"):
        check_output(checkpoint, False)


def test_calibrate_and_eval_json_refuse_existing_files(tiny_opt_dir, corpus_file, short_text, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_user_error(run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, *CALIB, "-o", notes), "--force")
    assert_user_error(run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, *CALIB, "-o", notes, "--force"),
                      "not a stats file rptq wrote")
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", short_text, "--seqlen", 32, "--json", notes),
                      "--force")
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", short_text, "--seqlen", 32, "--json", notes,
                          "--force"), "not a results file rptq wrote")
    assert notes.read_text() == "mine"
    # what rptq wrote, it may replace
    stats = tmp_path / "s.safetensors"
    for _ in range(2):
        result = run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, *CALIB, "-o", stats, "--force")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "s.safetensors"]


def test_unwritable_output_fails_before_any_work(tiny_opt_dir, corpus_file, tmp_path, monkeypatch):
    """A read-only filesystem (simulated: the tests may run as root, who writes anywhere) is found first."""
    import errno
    import tempfile

    from rptq_cli import loading

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(loading, "load_model", no_work)
    monkeypatch.setattr(loading, "open_model", no_work)  # quantize and calibrate stream the model
    result = run("quantize", tiny_opt_dir, *QUICK, "--calib-path", corpus_file, *CALIB, "-o", tmp_path / "out")
    assert_user_error(result, "Read-only file system", "choose another -o")
    assert not (tmp_path / "out").exists()
    result = run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, *CALIB, "-o", tmp_path / "s.safetensors")
    assert_user_error(result, "Read-only file system")


# ------------------------------------------------------------------------------------------ integrity


def test_checkpoint_records_the_hash_of_every_file(checkpoint):
    from rptq_cli.integrity import file_sha256
    recorded = json.loads((checkpoint / "rptq.json").read_text())["files_sha256"]
    files = sorted(f.name for f in checkpoint.iterdir() if f.name not in ("rptq.json", "README.md"))  # README: the card
    assert sorted(recorded) == files and "model.safetensors" in files and "config.json" in files
    assert all(recorded[name] == file_sha256(checkpoint / name) for name in files)


def _swap_layers(tensors):
    for suffix in ("qweight", "scales", "zeros"):
        a, b = f"model.decoder.layers.0.fc1.{suffix}", f"model.decoder.layers.1.fc1.{suffix}"
        tensors[a], tensors[b] = tensors[b], tensors[a]


def test_swapped_layers_are_refused(checkpoint, short_text, tmp_path):
    damaged = copy(checkpoint, tmp_path / "ckpt")
    rewrite_weights(damaged, _swap_layers)
    assert_user_error(run("eval", damaged, "--data-path", short_text, "--seqlen", 32), "model.safetensors",
                      "SHA-256", "--no-verify")


def test_flipped_bit_in_a_packed_weight_is_refused(checkpoint, tmp_path):
    damaged = copy(checkpoint, tmp_path / "ckpt")
    data = bytearray((damaged / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:header])["model.decoder.layers.0.fc1.qweight"]["data_offsets"]
    data[header + begin + 5] ^= 0x10
    (damaged / "model.safetensors").write_bytes(bytes(data))
    before = tree(damaged)
    assert_user_error(run("generate", damaged, "The river", "--max-new-tokens", 2), "SHA-256")
    assert tree(damaged) == before


K = "model.decoder.layers.0.self_attn.rptq.k"
Q_SIZES = "model.decoder.layers.0.self_attn.q_proj.group_sizes"


@pytest.mark.parametrize("edit,words", [
    (lambda t: t[f"{K}.zero"].fill_(200), [f"{K}.zero", "above the 4-bit maximum 15"]),
    (lambda t: t["model.decoder.layers.1.fc2.scales"].view(-1)[3:4].fill_(float("nan")), ["fc2.scales", "NaN"]),
    (lambda t: t.update({Q_SIZES: t[Q_SIZES].roll(1).contiguous()}), ["q_proj.group_sizes", "differently"]),
], ids=["kv-zero-point", "nan-scale", "reshuffled-groups"])
def test_value_ranges_are_checked_even_without_hashes(checkpoint, short_text, tmp_path, edit, words):
    damaged = copy(checkpoint, tmp_path / "ckpt")
    rewrite_weights(damaged, edit)
    assert_user_error(run("eval", damaged, "--data-path", short_text, "--seqlen", 32, "--no-verify"), *words)


def test_unrecorded_weight_file_is_refused(checkpoint, tmp_path):
    from rptq_cli.export import load_quantized
    copied = copy(checkpoint, tmp_path / "ckpt")
    shutil.copy(copied / "model.safetensors", copied / "model-extra.safetensors")
    with pytest.raises(RptqError, match="model-extra.safetensors, which it did not record"):
        load_quantized(copied)


def test_no_verify_loads_an_unrecorded_but_sound_checkpoint(checkpoint, short_text, tmp_path):
    copied = copy(checkpoint, tmp_path / "ckpt")
    record = json.loads((copied / "rptq.json").read_text())
    del record["files_sha256"]
    (copied / "rptq.json").write_text(json.dumps(record))
    assert_user_error(run("eval", copied, "--data-path", short_text, "--seqlen", 32), "records no file hashes")
    assert run("eval", copied, "--data-path", short_text, "--seqlen", 32, "--no-verify").exit_code == 0


# ------------------------------------------------------------------------------------------ signals, leftovers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


SLOW_SAVE = """
import sys, time
from pathlib import Path
from rptq_cli import export
write_weights = export.write_weights
def write_then_wait(tensors, directory, *args, **kwargs):
    write_weights(tensors, directory, *args, **kwargs)  # the temporary checkpoint now holds its weights
    Path(sys.argv[1]).write_text(str(directory))
    time.sleep(120)  # a long save: the parent's SIGTERM arrives here
export.write_weights = write_then_wait
from rptq_cli.cli import main
main(sys.argv[2:])
"""


def test_sigterm_during_save_cleans_up_and_exits_143(tiny_opt_dir, corpus_file, tmp_path):
    """`kill` (SIGTERM) from another process mid-save: exit 143, one line, no checkpoint, no temporary."""
    import time
    work, ready = tmp_path / "work", tmp_path / "ready"
    work.mkdir()
    args = ["quantize", str(tiny_opt_dir), *QUICK, "--calib-path", str(corpus_file), *CALIB, "-o", str(work / "q")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(ready), *args], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True, env=env, cwd=work)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), child.stderr.read() if child.poll() is not None else "the save never started"
        temporary = Path(ready.read_text())
        assert temporary.parent == work and temporary.name.startswith(f".q.tmp-{child.pid}-")
        assert (temporary / "model.safetensors").exists()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: terminated (SIGTERM); no partial output was left"], stderr
    assert "Traceback" not in stderr
    assert list(work.iterdir()) == []  # neither the checkpoint nor the hidden temporary


def test_leftovers_of_killed_runs_are_removed(tiny_opt_dir, corpus_file, tmp_path):
    out = tmp_path / "s.safetensors"
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".s.safetensors.tmp-{dead}-abc").write_bytes(b"half a file")
    (tmp_path / f".s.safetensors.tmp-{dead}-old").mkdir()
    (tmp_path / f".s.safetensors.tmp-{alive}-xyz").write_bytes(b"a concurrent writer")
    (tmp_path / ".s.safetensors.tmp-k2j_x9ab").write_bytes(b"an older rptq's, without a PID")
    result = run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, *CALIB, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("left by an earlier run that was killed") == 2
    assert "tmp-k2j_x9ab looks like the temporary of an earlier rptq run" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".s.safetensors.tmp-{alive}-xyz",
                                                          ".s.safetensors.tmp-k2j_x9ab", "s.safetensors"]


# ------------------------------------------------------------------------------------------ one line each


def test_parquet_with_integer_text_and_corrupt_parquet(tiny_opt_dir, tmp_path):
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    assert_user_error(run("eval", tiny_opt_dir, "--data-path", numbers), "numbers.parquet", "not strings")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    assert_user_error(run("calibrate", tiny_opt_dir, "--calib-path", corrupt, *CALIB, "-o", tmp_path / "s"),
                      "corrupt.parquet", "cannot read parquet")
    assert not (tmp_path / "s").exists()


def test_generate_prompt_longer_than_the_positions(tiny_opt_dir):
    prompt = "the river " * 300  # the tiny models have 256 positions
    assert_user_error(run("generate", tiny_opt_dir, prompt), "256 positions", "shorten it")
    assert_user_error(run("generate", tiny_opt_dir, "the river " * 100, "--max-new-tokens", 250),
                      "new tokens fit", "--max-new-tokens")


def test_sampling_on_nan_logits(tiny_opt_dir, tmp_path):
    src = copy(tiny_opt_dir, tmp_path / "src")
    _edit_source(src, lambda t: t["model.decoder.final_layer_norm.weight"].fill_(float("nan")))
    assert_user_error(run("generate", src, "The river", "--temperature", 1, "--max-new-tokens", 2), "NaN")


def test_perplexity_overflow_of_a_broken_model(tiny_opt_dir, short_text, tmp_path):
    src = copy(tiny_opt_dir, tmp_path / "src")
    _edit_source(src, lambda t: t["model.decoder.embed_tokens.weight"].mul_(1e5))  # tied to lm_head: huge logits
    assert_user_error(run("eval", src, "--data-path", short_text, "--seqlen", 32), "nats per token", "broken")


def test_clusters_above_the_channels_are_clamped_and_recorded(tiny_opt_dir, corpus_file, short_text, tmp_path):
    out = tmp_path / "r.json"
    result = run("eval", tiny_opt_dir, "--data-path", short_text, "--seqlen", 32, "--wbits", 4,
                 "--weight-quantizer", "rtn", "--clusters", "R1=100000,R2=2,R3=2,R4=8,R5=8", "--calib-path",
                 corpus_file, *CALIB, "--json", out)
    assert result.exit_code == 0, result.output
    assert "note: --clusters R1=100000 exceeds the 64 channels of R1; using 64" in result.output
    assert "Warning" not in result.output
    assert json.loads(out.read_text())["quantization"]["clusters"]["R1"] == 64


def test_calibration_seqlen_of_one_token(tiny_opt_dir, corpus_file, tmp_path):
    out = tmp_path / "s.safetensors"
    result = run("calibrate", tiny_opt_dir, "--calib-path", corpus_file, "--nsamples", 4, "--seqlen", 1, "-o", out)
    assert_user_error(result, "--seqlen 1", "single token")
    assert not out.exists()


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(tiny_opt_dir, short_text, monkeypatch, tmp_path):
    from rptq_cli import evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(evaluate, "perplexity", broken)
    result = run("eval", tiny_opt_dir, "--data-path", short_text, "--seqlen", 32)
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ZeroDivisionError: a bug" in result.output
    assert "error: this is a bug in rptq" in result.output


def test_signals_wait_until_the_checkpoint_swap_is_complete(checkpoint, tmp_path, monkeypatch):
    """SIGTERM between moving the old checkpoint aside and renaming the new one in would leave neither."""
    from rptq_cli import export
    from rptq_cli.cli import Terminated, _sigterm_as_interrupt
    target = copy(checkpoint, tmp_path / "ckpt")
    new = copy(checkpoint, tmp_path / "new")
    (new / "marker").write_text("new")
    replace = os.replace

    def replace_then_terminate(src, dst):
        replace(src, dst)
        if Path(dst).name.endswith("-old"):  # the old checkpoint is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_terminate)
    with _sigterm_as_interrupt(), pytest.raises(Terminated):
        export._replace_dir(new, target)
    assert (target / "marker").read_text() == "new"  # the swap completed before the signal was delivered
