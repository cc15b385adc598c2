"""Resumable quantization: `rptq quantize ... --resume` continues a killed run at its first unfinished layer.

Every `rptq quantize` writes its checkpoint into ``.NAME.tmp-PID-resume`` beside the output (outputs.py), a name
fixed for a given output and writer. After each decoder layer it makes that layer durable, in this order:

1. the layer's packed tensors (already in the shard writer's spill file or in an assembled shard) are fsynced;
2. the calibration activations leaving the layer, i.e. entering the next one ([nsamples, seqlen, hidden] in the
   compute dtype, raw bytes), go to ``hidden-K.bin`` and are fsynced;
3. ``resume.json`` is replaced atomically (write, fsync, rename, fsync the directory): the fingerprint of the
   run's inputs, the number K of finished layers, the shard writer's state, the activation file and the timings.

Only then are the previous activation file and the spill files already assembled into shards deleted. A run
killed at any point (SIGKILL, power loss) thus leaves a record that names only bytes on the disk.

``--resume`` finds the directory of a dead writer that holds a ``resume.json``, takes it over (renamed to this
process's PID, so the stale-temporary cleanup of other runs leaves it alone), compares fingerprints and refuses in
one line naming the first input that differs, restores the shard writer (the spill file cut back to its recorded
length) and starts the layer loop at layer K with the saved activations. The quantize loop propagates the
*quantized* layer's outputs, so these saved bytes are exactly what the uninterrupted run fed layer K; every
layer's own randomness is seeded per layer (KMeans, sampled clip rows), so the result is byte-identical.

Without ``--resume``, a killed run's resumable directory with finished layers is *refused* (not removed): it
may hold hours of work, so the error says to pass ``--resume`` or to delete it. A directory whose run died
before finishing its first layer holds no record and is removed like any stale temporary (issue 12).

Disk cost: the checkpoint's shards written so far plus one copy of the calibration activations.

Test hook: with ``RPTQ_TEST_KILL_AFTER_LAYER=K`` in the environment the process SIGKILLs itself right after the
record of layer K is saved (tests/test_resume.py), which stands for a crash at the worst moment it can be
recovered from.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__, outputs
from .errors import RptqError

RECORD = "resume.json"
RECORD_FORMAT = 1
KILL_AFTER_ENV = "RPTQ_TEST_KILL_AFTER_LAYER"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_record(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def find_interrupted(output: Path) -> tuple[Path, dict] | None:
    """The resumable directory of a killed run on ``output`` with at least one finished layer (the most recent)."""
    found = []
    for entry in outputs.dead_writer_temporaries(output):
        if entry.name.endswith("-resume") and entry.is_dir() and not entry.is_symlink():
            record = _read_record(entry)
            if record is not None:
                found.append((entry.stat().st_mtime, entry, record))
    if not found:
        return None
    _, entry, record = max(found, key=lambda f: f[0])
    return entry, record


def claim_interrupted(output: str | os.PathLike, resume: bool, echo: Callable[[str], None]) -> Path | None:
    """Before any other output check: the killed run's directory, taken over by this process, when ``resume``;
    None when there is nothing to resume. Without ``resume``, a killed run with finished layers is refused."""
    output = Path(output).expanduser()
    found = find_interrupted(output)
    if found is None:
        if resume:
            echo(f"note: no interrupted run of {output} to resume; starting at layer 1")
        return None
    directory, record = found
    if not resume:
        raise RptqError(f"an interrupted run left {record['done']}/{record['layers']} finished layers of {output} in "
                        f"{directory}; pass --resume to continue it, or delete that directory to start over")
    mine = outputs.resumable_dir(output)
    try:
        os.rename(directory, mine)  # atomic: of two runs resuming at once, one gets it
    except OSError as exc:
        raise RptqError(f"cannot take over {directory} ({exc.strerror}); is another rptq resuming {output}?") from None
    return mine


def new_directory(output: str | os.PathLike) -> Path:
    """The resumable directory of a fresh run by this process (the writer creates it); a leftover of an
    earlier process that had this PID is removed."""
    directory = outputs.resumable_dir(Path(output).expanduser())
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory)
    return directory


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def fingerprint(*, model: str, model_files: dict[str, str], model_config, quant_config, calibration: dict,
                tokens: torch.Tensor, stats_path: str | None, dtype: torch.dtype, device, batch_size: int) -> dict:
    """Everything that decides the checkpoint's bytes (JSON-serializable; compared key by key on --resume)."""
    config = model_config.to_dict()
    return {"tool_version": __version__, "model": model, "model_files": dict(model_files),
            "model_config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "quantization": quant_config.to_dict(), "seed": calibration.get("seed"),
            "nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
            "calibration_source": calibration.get("source"), "calibration_tokens": tensor_sha256(tokens),
            "stats": file_sha256(stats_path) if stats_path else None, "dtype": str(dtype).removeprefix("torch."),
            "device": torch.device(device).type, "batch_size": batch_size}


def _difference(old: dict, new: dict) -> str | None:
    """The first input that differs, in words; None when the fingerprints agree."""
    for key in new:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if key in ("seed", "nsamples", "seqlen", "dtype", "device", "batch_size"):
            return f"--{key.replace('_', '-')} differs from the interrupted run ({a} vs {b})"
        if key == "tool_version":
            return f"the rptq version differs from the interrupted run's ({a} vs {b})"
        if key == "model":
            return f"MODEL differs from the interrupted run ({a} vs {b})"
        if key == "model_files":
            changed = sorted(set(a or {}) ^ set(b) | {f for f in b if (a or {}).get(f, b[f]) != b[f]})
            return f"the model's weight files differ from the interrupted run's ({', '.join(changed)})"
        if key == "model_config":
            return "the model's config differs from the interrupted run's"
        if key == "quantization":
            first = next(k for k in sorted(set(a or {}) | set(b)) if (a or {}).get(k) != b.get(k))
            return (f"the quantization config differs from the interrupted run's ({first}: "
                    f"{(a or {}).get(first)} vs {b.get(first)})")
        if key == "calibration_source":
            return f"the calibration data source differs from the interrupted run's ({a} vs {b})"
        if key == "calibration_tokens":
            return "the calibration data differs from the interrupted run's (its text changed)"
        if key == "stats":
            return "--stats differs from the interrupted run's (another file, or the file changed)"
        return f"{key} differs from the interrupted run ({a} vs {b})"
    return None


class ResumableRun:
    """The progress record of one quantization in ``writer``'s resumable directory (see the module docstring)."""

    def __init__(self, writer, echo: Callable[[str], None] = print):
        self.writer, self.directory, self.echo = writer, Path(writer.directory), echo
        self.record = _read_record(self.directory)
        self.fingerprint: dict | None = None
        # the interrupted run's layers must outlive a refusal: nothing is deleted until the fingerprint matches
        writer.keep_on_abort = self.record is not None

    def begin(self, fingerprint: dict) -> None:
        """Refuse (one line) when the inputs differ from the interrupted run's; otherwise take them."""
        if self.record is not None:
            what = _difference(self.record["fingerprint"], fingerprint)
            if what is not None:
                raise RptqError(f"cannot resume: {what}; resume with the same inputs, or delete {self.directory} "
                                "to start over")
        self.fingerprint = fingerprint

    def restore(self) -> tuple[int, torch.Tensor | None, dict]:
        """``(finished layers K, activations entering layer K or None, seconds so far)``; restores the writer."""
        if self.record is None:
            return 0, None, {}
        record = self.record
        assert self.fingerprint is not None, "begin() first: the fingerprint decides whether to resume"
        try:
            self._check_files(record)
            self.writer.shards.restore(record["shards"])
            self.writer.written = tuple(record["written"])
            hidden = None
            if record.get("hidden"):
                h = record["hidden"]
                raw = torch.from_numpy(np.fromfile(self.directory / h["file"], dtype=np.uint8))
                hidden = raw.view(getattr(torch, h["dtype"])).reshape(h["shape"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as exc:
            raise RptqError(f"the record of the interrupted run in {self.directory} is damaged ({type(exc).__name__}: "
                            f"{exc}); delete that directory to start over") from None
        self.writer.keep_on_abort = False  # accepted and restored: from here on a failure cleans up as usual
        for f in self.directory.glob("hidden-*.bin"):
            if not record.get("hidden") or f.name != record["hidden"]["file"]:
                f.unlink()
        self.echo(f"resuming at layer {record['done'] + 1}/{record['layers']} ({record['done']} finished layers "
                  f"kept in {self.directory})")
        return record["done"], hidden, dict(record.get("seconds") or {})

    def _check_files(self, record: dict) -> None:
        """Every file the record names is there, at least as long as recorded (else it is not what we wrote)."""
        shards = record["shards"]
        for file, _ in shards["done"]:
            if not (self.directory / file).is_file():
                raise OSError(f"shard {file} is missing")
        if shards["entries"]:
            spill = self.directory / f".spill-{len(shards['done'])}"
            if not spill.is_file() or spill.stat().st_size < shards["size"]:
                raise OSError(f"{spill.name} is shorter than recorded")
        if record.get("hidden"):
            h = record["hidden"]
            nbytes = int(np.prod(h["shape"])) * torch.empty((), dtype=getattr(torch, h["dtype"])).element_size()
            if (self.directory / h["file"]).stat().st_size != nbytes:
                raise OSError(f"{h['file']} is not {nbytes} bytes long")

    def layer_done(self, done: int, layers: int, hidden: torch.Tensor | None, seconds: dict) -> None:
        """Make the first ``done`` layers durable; ``hidden``: the activations entering layer ``done``."""
        self.writer.shards.sync()
        entry = None
        if done < layers and hidden is not None:
            entry = {"file": f"hidden-{done}.bin", "dtype": str(hidden.dtype).removeprefix("torch."),
                     "shape": list(hidden.shape)}
            with open(self.directory / entry["file"], "wb") as f:
                f.write(hidden.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                f.flush()
                os.fsync(f.fileno())
        record = {"format": RECORD_FORMAT, "fingerprint": self.fingerprint, "layers": layers, "done": done,
                  "written": list(self.writer.written), "shards": self.writer.shards.state(), "hidden": entry,
                  "seconds": seconds}
        tmp = self.directory / f"{RECORD}.partial"
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / RECORD)
        _fsync_dir(self.directory)
        for f in self.directory.glob("hidden-*.bin"):
            if entry is None or f.name != entry["file"]:
                f.unlink()
        self.writer.shards.drop_consumed()
        if os.environ.get(KILL_AFTER_ENV) == str(done):
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> None:
        """All layers are done: remove the record and the activations before the checkpoint is published."""
        for f in [self.directory / RECORD, *self.directory.glob("hidden-*.bin")]:
            f.unlink(missing_ok=True)
