"""Output paths: never destroy what is not ours, fail before the work rather than after it.

Rules every writer (quantize, calibrate, export, eval --json) follows:

- an existing path is refused unless ``--force`` is given, and ``--force`` replaces only what rptq wrote
  (an rptq checkpoint directory, a stats file, a results file) or an empty directory/file, never a source
  model nor a directory that contains it;
- the output's directory is probed for writability before any work starts (a read-only filesystem
  otherwise shows only after an hour of quantization);
- data is written to a temporary sibling ``.NAME.tmp-PID-XXXX`` and renamed into place when complete. The
  PID in the name lets the next run on the same output recognise the temporaries of a killed run (SIGKILL,
  power loss: no handler ran) and remove them, while leaving those of a live concurrent writer alone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .errors import RptqError

FORCE_HINT = "pass --force to replace it or choose another -o"


def check_output(output: str | os.PathLike, force: bool, *, is_ours: Callable[[Path], bool], kind: str,
                 directory: bool, sources: tuple[str | os.PathLike | None, ...] = ()) -> None:
    """Refuse an output that would destroy something rptq did not write; check that it can be written.

    ``is_ours(path)``: whether the existing ``path`` is a ``kind`` rptq wrote (and may replace with --force);
    ``directory``: whether the output is a directory (a checkpoint) or a file; ``sources``: paths the run reads
    (the source model) that the output must never replace.
    """
    path = Path(output).expanduser()
    for source in sources:
        if source is not None and _would_replace(path, Path(source).expanduser()):
            raise RptqError(f"-o {output} would replace the source model {source}; choose another -o")
    if path.exists() or path.is_symlink():
        if not force:
            raise RptqError(f"{output} already exists; {FORCE_HINT}")
        if path.is_dir() != directory or path.is_symlink():
            raise RptqError(f"{output} exists and is not a {kind} (it is a {_what(path)}); --force replaces only "
                            f"a {kind} rptq wrote: choose another -o")
        if not (_is_empty(path) or is_ours(path)):
            raise RptqError(f"{output} exists and is not a {kind} rptq wrote; --force replaces only those (or "
                            "empty ones): choose another -o, or remove it yourself")
    check_writable(path.parent)


def _would_replace(output: Path, source: Path) -> bool:
    """Replacing ``output`` deletes ``source`` when they are the same path or ``source`` lies inside it."""
    if not source.exists():
        return False
    out, src = output.resolve(), source.resolve()
    return out == src or out in src.parents


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


def _what(path: Path) -> str:
    return "symbolic link" if path.is_symlink() else "directory" if path.is_dir() else "file"


def check_writable(directory: Path) -> None:
    """Create and remove a probe file where the output will go (or in its nearest existing ancestor)."""
    existing = directory.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RptqError(f"cannot write under {directory}: {existing} is a file, not a directory; choose another -o")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rptq-write-probe-", dir=existing)
    except OSError as exc:
        raise RptqError(f"cannot write to {existing} ({exc.strerror}); choose another -o on a writable "
                        "filesystem") from None
    os.close(fd)
    os.unlink(probe)


# ------------------------------------------------------------------------------------------ temporaries


def temporary_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


def temporary_dir(output: Path) -> Path:
    """A private sibling directory of ``output``, named with this process's PID."""
    return Path(tempfile.mkdtemp(prefix=f"{temporary_prefix(output)}{os.getpid()}-", dir=output.parent))


def resumable_dir(output: Path, pid: int | None = None) -> Path:
    """The temporary directory of a resumable `rptq quantize` (resume.py): ``.NAME.tmp-PID-resume``, a name
    fixed for a given output and writer, so that a later ``--resume`` finds it once its writer is gone."""
    return output.parent / f"{temporary_prefix(output)}{pid or os.getpid()}-resume"


def dead_writer_temporaries(output: Path) -> list[Path]:
    """The temporaries of ``output`` whose writer PID is no longer alive (a killed run's)."""
    if not output.parent.is_dir():
        return []
    prefix = temporary_prefix(output)
    found = []
    for entry in sorted(output.parent.iterdir()):
        pid = _writer_pid(entry.name, prefix) if entry.name.startswith(prefix) else None
        if pid is not None and pid != os.getpid() and not _alive(pid):
            found.append(entry)
    return found


def temporary_file(output: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f"{temporary_prefix(output)}{os.getpid()}-", dir=output.parent)
    os.close(fd)
    return Path(tmp)


def _writer_pid(name: str, prefix: str) -> int | None:
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(output: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Remove the temporaries of killed runs on ``output`` (their writer is gone).

    Returns (removed, unknown): ``unknown`` are temporaries without a PID (an older rptq wrote them), which
    are only reported; those of a live process are a concurrent writer's and left alone.
    """
    output = Path(output).expanduser()
    removed: list[Path] = []
    unknown: list[Path] = []
    if not output.parent.is_dir():
        return removed, unknown
    prefix = temporary_prefix(output)
    for entry in sorted(output.parent.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        pid = _writer_pid(entry.name, prefix)
        if pid is None:
            unknown.append(entry)
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed, unknown


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back during renames that must happen together; they arrive right after.

    The handlers are swapped, not the signal mask: a mask is per thread, and with torch's worker threads
    running the kernel may hand the signal to one of them, whose Python handler then still runs here."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
