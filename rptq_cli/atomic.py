"""Writing one file so that it is either complete or absent: never a partial file under its final name.

The temporary sibling is named by outputs.py (``.NAME.tmp-PID-XXXX``), so a later run recognises and removes
what a killed writer left behind.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from .outputs import temporary_file


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling, then rename it over ``path``: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_file(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
