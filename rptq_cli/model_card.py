"""The model card: every checkpoint directory carries a README.md that says what it is and how it was made.

The card is generated, never edited by hand: it is a view of ``config.json`` (configuration and mode) and
``rptq.json`` (source model and its hashes, the exact command, calibration data, the evaluations recorded so
far). ``rptq eval CKPT`` appends its results to ``rptq.json["evaluations"]`` and regenerates the card; both
files are replaced atomically (temporary file + rename), under a lock on the directory so that two evals do
not lose each other's entry. Neither file is covered by the integrity hashes (integrity.py leaves out
rptq.json, which holds them, and README.md), so recording results never breaks a checkpoint's verification.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .integrity import CARD_NAME, HASHES_KEY, PROVENANCE_NAME

EVALUATIONS_KEY = "evaluations"
CONFIG_SKIP = ("quant_method", "format_version", "packing", "label")  # shown elsewhere in the card


def command_line(argv: list[str] | None = None) -> str:
    """The command as a shell would take it back: ``rptq`` + the arguments the CLI parsed (default sys.argv)."""
    return shlex.join(["rptq", *(sys.argv[1:] if argv is None else argv)])


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------ rendering


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    return {}


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _evaluation_rows(evaluations: list[dict]) -> list[tuple]:
    rows = []
    for e in evaluations:
        for task, r in sorted((e.get("results") or {}).items()):
            metric = f"ppl {r['ppl']:.3f}" if "ppl" in r else ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(r.items()))
            size = f"{r.get('windows', '?')} × {r.get('seqlen', '?')}" if "windows" in r else ""
            rows.append((e.get("date", ""), task, metric, size, (e.get("data") or {}).get(task, ""),
                         e.get("dtype", ""), e.get("backend", ""), f"`{e.get('command', '')}`"))
    return rows


def render_card(name: str, hf_config: dict, record: dict) -> str:
    """Markdown of the card for checkpoint ``name`` from its config.json and rptq.json contents."""
    qc = hf_config.get("quantization_config") or {}
    label, mode = qc.get("label", "?"), qc.get("mode", "?")
    source = record.get("source_model", "unknown")
    arch = ", ".join(hf_config.get("architectures") or [hf_config.get("model_type", "?")])
    lines = [f"# {name}: RPTQ {label} ({mode} mode)", "",
             f"`{source}` ({arch}) quantized with RPTQ (reorder-based post-training quantization) by rptq "
             f"{record.get('tool_version', '?')}. This card is generated from `config.json` and `rptq.json`; "
             "`rptq eval` on this directory adds its results below.", "",
             "## Use", "", "```",
             f"rptq eval {name}/ --task wikitext", f"rptq generate {name}/ \"Once upon a time\" --max-new-tokens 32",
             "```", "", "```python",
             "import torch, rptq_cli  # registers the rptq quantization method with transformers",
             "from transformers import AutoModelForCausalLM",
             f"model = AutoModelForCausalLM.from_pretrained(\"{name}\", dtype=torch.float32)",
             "cache = rptq_cli.PackedKVCache.from_model(model, max_length=512)  # pass as past_key_values",
             "```", "",
             "## Source model", "", f"- model: `{source}`"]
    hashes = record.get("source_files_sha256") or {}
    if hashes:
        lines += ["- weight files:", ""] + _table(("file", "SHA-256"), [(f, f"`{h}`") for f, h in sorted(hashes.items())])
    else:
        lines.append("- weight files: not hashed (the source was not a local directory)")
    lines += ["", "## Command", ""]
    lines += ["```", record["command"], "```"] if record.get("command") else ["not recorded (written through the "
                                                                              "Python API)"]
    lines += ["", "## Configuration", "", f"{label}, {mode} mode; packing {qc.get('packing', '?')}, checkpoint format "
              f"version {qc.get('format_version', '?')}.", ""]
    lines += _table(("setting", "value"), [(k, f"`{json.dumps(v)}`") for k, v in sorted(qc.items())
                                           if k not in CONFIG_SKIP])
    calibration = record.get("calibration") or {}
    lines += ["", "## Calibration data", ""]
    if calibration:
        lines += _table(("field", "value"), [(k, f"`{v}`") for k, v in sorted(calibration.items())])
    else:
        lines.append("not recorded")
    if record.get("stats_file"):
        lines += ["", f"Clusters from the stats file `{record['stats_file']}`."]
    lines += ["", "## Evaluations", ""]
    evaluations = record.get(EVALUATIONS_KEY) or []
    if evaluations:
        lines += _table(("date (UTC)", "task", "result", "windows × tokens", "data", "dtype", "backend", "command"),
                        _evaluation_rows(evaluations))
    else:
        lines.append(f"None recorded yet: `rptq eval {name}/ --task wikitext` adds a row.")
    files = record.get(HASHES_KEY) or {}
    if files:
        lines += ["", "## Files", "", f"SHA-256 recorded at write time and checked on every load "
                  f"(`{PROVENANCE_NAME}` and this card are not covered: they grow with each evaluation).", ""]
        lines += _table(("file", "SHA-256"), [(f, f"`{h}`") for f, h in sorted(files.items())])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ writing


def _atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path`` (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_card(directory: Path, name: str | None = None) -> Path:
    """(Re)generate ``directory/README.md`` from its config.json and rptq.json; ``name``: the checkpoint's
    directory name when ``directory`` is still a temporary one."""
    directory = Path(directory)
    card = render_card(name or directory.resolve().name, _read_json(directory / "config.json"),
                       _read_json(directory / PROVENANCE_NAME))
    _atomic_text(directory / CARD_NAME, card)
    return directory / CARD_NAME


@contextlib.contextmanager
def _locked(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def record_evaluation(directory: Path, entry: dict) -> None:
    """Append ``entry`` to ``rptq.json["evaluations"]`` and regenerate the card, each file replaced atomically."""
    directory = Path(directory)
    with _locked(directory):
        record = _read_json(directory / PROVENANCE_NAME)
        record.setdefault(EVALUATIONS_KEY, []).append(entry)
        _atomic_text(directory / PROVENANCE_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_card(directory)
