"""Checkpoint integrity: file hashes recorded at write time, value ranges checked at load time.

Two independent defences against a checkpoint altered after it was written:

- every file the writer produced is hashed (SHA-256) into ``rptq.json``; a load recomputes and compares
  them, so swapped tensors, swapped header offsets and flipped bits are all refused. On very large models
  hashing costs one extra read of the weights, which ``--no-verify`` skips;
- every quantization parameter is checked against what the format allows (zero-points within their bit
  width, scales finite and positive, group sizes positive and covering their channels, permutations being
  permutations). These run always: they also catch damage done before the hashes were recorded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import RptqError

HASHES_KEY = "files_sha256"  # in rptq.json: {file name: sha256} of every other file of the checkpoint
PROVENANCE_NAME = "rptq.json"
SKIP_HINT = "pass --no-verify to load it anyway"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of ``directory`` except rptq.json (which holds them), by name, sorted."""
    return {f.name: file_sha256(f) for f in sorted(directory.iterdir())
            if f.is_file() and f.name != PROVENANCE_NAME}


def verify_hashes(directory: Path, recorded: dict | None) -> None:
    """Refuse a checkpoint whose files differ from the hashes recorded when it was written."""
    if not recorded:
        raise RptqError(f"checkpoint {directory} records no file hashes in {PROVENANCE_NAME} (written by an older "
                        f"rptq, or the record was removed); re-run `rptq quantize`, or {SKIP_HINT}")
    for name, expected in sorted(recorded.items()):
        file = directory / name
        if not file.is_file():
            raise RptqError(f"checkpoint {directory} is missing {name}, which it recorded when written; copy it back "
                            "or re-run `rptq quantize`")
        if file_sha256(file) != expected:
            raise RptqError(f"checkpoint file {file} does not match the SHA-256 recorded in {PROVENANCE_NAME} when it "
                            f"was written: it is truncated or corrupted, or was edited since; re-run `rptq quantize`, "
                            f"or {SKIP_HINT}")
    unrecorded = sorted(f.name for f in directory.glob("*.safetensors") if f.name not in recorded)
    if unrecorded:
        raise RptqError(f"checkpoint {directory} holds weight file {unrecorded[0]}, which it did not record when "
                        f"written; remove it or re-run `rptq quantize`")


# ------------------------------------------------------------------------------------------ value ranges


def _corrupted(name: str, what: str) -> RptqError:
    return RptqError(f"checkpoint tensor {name} {what}; the checkpoint is corrupted, re-run `rptq quantize`")


def check_scales(name: str, scales: torch.Tensor) -> None:
    """Scales of a quantization grid are finite and positive (the writer never produces anything else)."""
    if not bool(torch.isfinite(scales).all()):
        raise _corrupted(name, "holds NaN or infinite scales")
    if not bool((scales > 0).all()):
        raise _corrupted(name, "holds zero or negative scales")


def check_codes(name: str, codes: torch.Tensor, bits: int) -> None:
    """Codes and zero-points fit their bit width: a 4-bit zero-point of 200 is damage, not a value."""
    top = (1 << bits) - 1
    if codes.numel() and int(codes.max()) > top:
        raise _corrupted(name, f"holds {int(codes.max())}, above the {bits}-bit maximum {top}")


def check_group_sizes(name: str, sizes: torch.Tensor, channels: int, max_groups: int | None = None) -> None:
    """Positive group sizes that cover exactly ``channels``, no more groups than were asked for."""
    if bool((sizes <= 0).any()) or int(sizes.sum()) != channels:
        raise _corrupted(name, f"does not split {channels} channels into positive groups")
    if max_groups is not None and sizes.numel() > max_groups:
        raise _corrupted(name, f"has {sizes.numel()} groups, more than the {max_groups} clusters the checkpoint "
                               "records")


def check_same_groups(name: str, sizes: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """Tensors that quantize the same channels must group them the same way (a reshuffle shows here)."""
    if not torch.equal(sizes.to(torch.int64), reference.to(torch.int64)):
        raise _corrupted(name, f"groups its channels differently from {reference_name}, which reads the same input")


def check_permutation(name: str, perm: torch.Tensor) -> None:
    """Every row of ``perm`` is a permutation of 0..len-1."""
    rows = perm.reshape(-1, perm.shape[-1]).long()
    if not torch.equal(rows.sort(dim=1).values, torch.arange(rows.shape[1]).expand_as(rows)):
        raise _corrupted(name, "is not a permutation")
