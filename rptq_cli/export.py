"""The quantized checkpoint: a directory a user can copy, inspect and load (DESIGN §5).

    out/
      config.json            the model's HF config + quantization_config (quant_method "rptq", format version)
      model.safetensors      packed weights and every quantization parameter (sharded with an index when big)
      tokenizer files
      rptq.json              provenance: tool version, source model and its file hashes, calibration, timings,
                             and files_sha256: the SHA-256 of every other file here (integrity.py)

Tensor names are the module paths of the quantized model (``…q_proj.qweight``, ``…self_attn_layer_norm.perm``,
``…self_attn.rptq.k.scale``), so the checkpoint reads like the model it loads into:

| tensor | dtype | shape | meaning |
|---|---|---|---|
| `<linear>.qweight` | uint8 | [N, packed_row_bytes(K)] | codes, `block_q{bits}` layout (quant/pack.py) |
| `<linear>.scales` | float16 | [N, G] | per (row, group) scale |
| `<linear>.zeros` | uint8 | [packed_row_bytes(N·G)] | zero-points packed at the weight's bit width |
| `<linear>.group_sizes` | int32 | [G] | input-channel groups (the input's clusters by default) |
| `<linear>.weight` | float16 | [N, K] | only when weights stay FP (--wbits 16) |
| `<linear>.act.{scale,zero,group_sizes}` | float32, uint8, int32 | [Ga] | static input quantizer |
| `<norm>.{weight,bias,perm}` | float16, float16, int32 | [C] | reordered norm |
| `<attn>.rptq.{q,k,v}.{scale,zero,group_sizes}` | as above | [G] | Q and KV-cache quantizers |
| `<attn>.rptq.qk_perm` | int32 | [kv_heads, head_dim] | post-RoPE R2 gather (RoPE families) |
| `lm_head.{qweight,scales,…}` | as a linear's | G = ⌈K / 64⌉ | `--head-bits 8` only: 8-bit codes (nn/head.py) |
| everything else (embeddings, final norm, lm_head, biases) | float16 | as in the FP model | |

Writing goes to a temporary sibling directory that is renamed into place at the end (outputs.py); reading
checks the format version, each file's SHA-256 as recorded at write time, every tensor's presence, dtype and
shape, and the value ranges of the quantization parameters (integrity.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import __version__, outputs
from .config import FP, QuantConfig
from .errors import RptqError, first_line
from .hf_hook import NEEDS_IMPORT
from .integrity import (HASHES_KEY, PROVENANCE_NAME, check_codes, check_group_sizes, check_permutation,
                        check_same_groups, check_scales, directory_hashes, file_sha256, verify_hashes)
from .loading import INDEX_NAME, WEIGHTS_NAME, WeightFiles
from .model_card import write_card
from .models import Family, family_for
from .nn.attention import AttentionQuant, use_lean_rope_attention, use_rptq_attention
from .nn.head import half_state_names, head_path, keep_head_in_half
from .nn.joint import use_lean_gated_mlp
from .nn.linear import QuantLinear
from .nn.norm import ReorderNorm
from .nn.quantizers import ActQuant
from .points import POINTS, REORDERS
from .quant.pack import pack_zeros, packed_row_bytes, unpack_zeros
from .strict import FILE_TAG, QUANT_METHOD, quant_method, require_not_foreign_checkpoint, require_tokenizer

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 2 * 1024**3  # shards of about 2 GiB: a writer or reader holds one at most


# ------------------------------------------------------------------------------------------ writing


def _act_tensors(prefix: str, act: ActQuant) -> dict[str, torch.Tensor]:
    """A per-token quantizer stores only its groups: its scales are computed at run time."""
    if act.dynamic:
        return {f"{prefix}.clip": act.clip.float(), f"{prefix}.group_sizes": act.group_sizes.to(torch.int32)}
    return {f"{prefix}.scale": act.scale.float(), f"{prefix}.zero": act.zero.to(torch.uint8),
            f"{prefix}.group_sizes": act.group_sizes.to(torch.int32)}


def iter_checkpoint_tensors(model: nn.Module, skip: tuple[str, ...] = (), fetch=None):
    """Yield ``(name, tensor)`` for every tensor of a quantized model in its on-disk dtype, module by module
    (decoder layers in order, then embeddings, final norm, lm_head), so a writer can take one at a time.

    ``skip``: name prefixes ("model.layers.0.") already written (and maybe released to the meta device).
    ``fetch(name)``: reads a tensor the model holds on the meta device (a StreamedModel's ``read``).
    """
    owned: list[str] = list(skip)
    for name, module in model.named_modules():
        if any(f"{name}.".startswith(s) for s in skip):
            continue
        tensors = _module_tensors(f"{name}.", module)
        if tensors is not None:
            owned.append(f"{name}.")
            yield from tensors.items()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for key, value in model.state_dict().items():  # embeddings, final norm, lm_head, OPT positions
        if any(key.startswith(o) for o in owned) or (tied and key == "lm_head.weight"):
            continue
        if fetch is not None and value.device.type == "meta":
            value = fetch(key)
        yield key, (value.half() if value.is_floating_point() else value)


def _module_tensors(p: str, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The tensors of one rptq module under the prefix ``p`` ("…q_proj."); None for other modules."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(module, QuantLinear):
        if module.bits < FP:
            tensors.update({p + "qweight": module.qweight, p + "scales": module.scales.half(),
                            p + "zeros": pack_zeros(module.zeros, module.bits),
                            p + "group_sizes": module.group_sizes.to(torch.int32)})
        else:
            tensors[p + "weight"] = module.weight.half()
        if module.bias is not None:
            tensors[p + "bias"] = module.bias.half()
        if module.act is not None:
            tensors.update(_act_tensors(p + "act", module.act))
    elif isinstance(module, ReorderNorm):
        tensors.update({p + "weight": module.weight.half(), p + "perm": module.perm.to(torch.int32)})
        if module.bias is not None:
            tensors[p + "bias"] = module.bias.half()
    elif isinstance(module, AttentionQuant):
        if module.qk_perm is not None:
            tensors[p + "qk_perm"] = module.qk_perm.to(torch.int32)
        for which in ("q", "k", "v"):
            if getattr(module, which) is not None:
                tensors.update(_act_tensors(p + which, getattr(module, which)))
    else:
        return None
    return tensors


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized model under its module path, in its on-disk dtype."""
    # clone: modules share small tensors (q/k/v read the same group sizes), which safetensors refuses
    return {k: v.detach().cpu().clone().contiguous() for k, v in iter_checkpoint_tensors(model)}


# safetensors (the Rust crate) orders a file's tensors by dtype, in reverse of its Dtype enum, then by name
SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
                      torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
DTYPE_RANK = {name: rank for rank, name in enumerate(SAFETENSORS_DTYPES.values())}
COPY_CHUNK = 16 * 1024**2


def _copy_range(src, dst, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst`` in the kernel (no copy through this process)."""
    src.flush()
    while nbytes:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), min(nbytes, COPY_CHUNK), offset)
        except (AttributeError, OSError):  # not Linux, or a file system without it: through a small buffer
            src.seek(offset)
            done = dst.write(src.read(min(nbytes, COPY_CHUNK)))
            dst.flush()
        if done <= 0:
            raise OSError(f"could not copy {nbytes} bytes into {dst.name}")
        offset, nbytes = offset + done, nbytes - done


class ShardWriter:
    """Safetensors shards written while tensors arrive, byte for byte what ``save_file`` writes for them.

    A shard's header must list its tensors before their data, so each tensor's bytes go to a spill file in
    ``directory`` as it arrives (memory: one tensor) and the shard is assembled from it when full (a tensor
    that would take it past ``max_shard_bytes`` starts the next one). :meth:`finish` names the shards as
    transformers does: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES, metadata: dict | None = None,
                 durable: bool = False):
        """``durable``: resumable writing (resume.py): assembled shards are fsynced and a consumed spill file is
        kept until :meth:`drop_consumed` (the last saved :meth:`state` may still name it)."""
        self.directory, self.max_shard_bytes, self.metadata = Path(directory), max_shard_bytes, metadata
        self.durable = durable
        self.done: list[tuple[Path, list[str]]] = []  # assembled shards: (file, tensor names)
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, spill offset, bytes
        self.size, self.total, self.spill = 0, 0, None
        self.consumed: list[str] = []  # spill files assembled into a shard, not deleted yet (durable only)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; written as its contiguous little-endian bytes)."""
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"safetensors cannot store {name} of dtype {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self.entries and self.size + data.nbytes > self.max_shard_bytes:
            self._assemble()
        if self.spill is None:
            self.spill = open(self.directory / f".spill-{len(self.done)}", "w+b")
        self.spill.write(data.data)
        self.entries.append((name, SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), self.size, data.nbytes))
        self.size += data.nbytes
        self.total += data.nbytes

    def _header(self, order) -> bytes:
        header, offset = {}, 0
        if self.metadata:
            header["__metadata__"] = self.metadata
        for name, dtype, shape, _, nbytes in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned

    def _assemble(self) -> None:
        """Write the current shard: header, then the spilled bytes in safetensors' order."""
        names = [e[0] for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor {sorted(n for n in names if names.count(n) > 1)[0]} was added twice")
        order = sorted(self.entries, key=lambda e: (-DTYPE_RANK[e[1]], e[0]))
        header = self._header(order)
        file = self.directory / f".shard-{len(self.done) + 1}.partial"
        spill, self.spill = self.spill, None
        with open(file, "wb") as out:
            out.write(len(header).to_bytes(8, "little") + header)
            out.flush()
            for *_, offset, nbytes in order:
                _copy_range(spill, out, offset, nbytes)
            if self.durable:
                os.fsync(out.fileno())
        if spill is not None:
            spill.close()
            if self.durable:
                self.consumed.append(spill.name)
            else:
                os.unlink(spill.name)
        self.done.append((file, names))
        self.entries, self.size = [], 0

    # ---- resumable writing (resume.py): what is on disk after the last finished layer, and back

    def sync(self) -> None:
        """Flush the spill file to the disk: every tensor added so far survives a crash (or power loss)."""
        if self.spill is not None:
            self.spill.flush()
            os.fsync(self.spill.fileno())

    def state(self) -> dict:
        """What :meth:`restore` needs to continue after the tensors added so far (JSON-serializable)."""
        return {"done": [[file.name, names] for file, names in self.done], "entries": [list(e) for e in self.entries],
                "size": self.size, "total": self.total}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: the assembled shards as they are, the current spill file cut back to the
        recorded size (a crash may have left part of the next layer in it); other leftovers are removed."""
        self.done = [(self.directory / file, list(names)) for file, names in state["done"]]
        self.entries = [(n, d, list(shape), o, b) for n, d, shape, o, b in state["entries"]]
        self.size, self.total = state["size"], state["total"]
        spill = self.directory / f".spill-{len(self.done)}"
        keep = {f.name for f, _ in self.done} | ({spill.name} if self.entries else set())
        for f in self.directory.iterdir():
            if f.name.startswith((".spill-", ".shard-")) and f.name not in keep:
                f.unlink()
        if self.entries:
            self.spill = open(spill, "r+b")
            self.spill.truncate(self.size)
            self.spill.seek(self.size)

    def drop_consumed(self) -> None:
        """Delete the spill files already assembled into shards (once no saved state names them)."""
        for name in self.consumed:
            with contextlib.suppress(OSError):
                os.unlink(name)
        self.consumed = []

    def finish(self) -> list[Path]:
        """Assemble the last shard, give every shard its final name, write the index when there are several."""
        if self.entries or not self.done:
            self._assemble()
        self.drop_consumed()
        n = len(self.done)
        finals = []
        weight_map = {}
        for i, (file, names) in enumerate(self.done, 1):
            final = self.directory / (WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
            os.replace(file, final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return finals

    def abort(self) -> None:
        """Remove the spill file (the partial shards go with the temporary directory)."""
        if self.spill is not None:
            self.spill.close()
            with contextlib.suppress(OSError):
                os.unlink(self.spill.name)
            self.spill = None


def _file_metadata() -> dict[str, str]:
    # one key only: safetensors writes its metadata map in hash order, and equal inputs must give equal bytes
    return {FILE_TAG: str(FORMAT_VERSION)}


def write_weights(tensors, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                  shards: ShardWriter | None = None) -> None:
    """Write ``tensors`` (a dict, taken in sorted name order, or ``(name, tensor)`` pairs, taken as they come)
    as safetensors shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own), after
    what ``shards`` (a writer fed while the model was quantized) already holds."""
    writer = shards if shards is not None else ShardWriter(directory, max_shard_bytes, _file_metadata())
    items = ((key, tensors[key]) for key in sorted(tensors)) if isinstance(tensors, dict) else tensors
    try:
        for key, tensor in items:
            writer.add(key, tensor)
        writer.finish()
    finally:
        writer.abort()


def weight_files(model_name: str) -> list[Path]:
    """The weight files of a model that is a local directory (else [])."""
    path = Path(model_name)
    if not path.is_dir():
        return []
    return [f for f in sorted(path.iterdir()) if f.suffix in (".safetensors", ".bin") and f.is_file()]


def source_hashes(model_name: str) -> dict[str, str]:
    """sha256 of the source model's weight files when it is a local directory (else {})."""
    return {f.name: file_sha256(f) for f in weight_files(model_name)}


def check_output(output: str | os.PathLike, force: bool, source: str | os.PathLike | None = None) -> None:
    """--force replaces only an rptq checkpoint (or an empty directory), never ``source``; see outputs.py."""
    outputs.check_output(output, force, is_ours=is_quantized_checkpoint, kind="checkpoint directory",
                         directory=True, sources=(source,))


class CheckpointWriter:
    """A checkpoint's weights written while the model is quantized: each decoder layer packed into the shards
    as soon as it is done (:meth:`add_module`), in the temporary directory that :func:`save_quantized` then
    completes (embeddings, head, config, tokenizer, provenance) and renames into place. Used as a context
    manager, it removes that directory when the block fails."""

    def __init__(self, output: str | os.PathLike, *, force: bool = False, source: str | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES, fetch=None, directory: Path | None = None):
        """``fetch(name)``: where the tensors left on the meta device (embeddings, head) are read from, one at a
        time when written (a StreamedModel's ``read``). ``directory``: a resumable temporary directory
        (resume.py) to write into, instead of a fresh private one; its shards are then written durably."""
        self.fetch = fetch
        output = Path(output)
        check_output(output, force, source)
        output.parent.mkdir(parents=True, exist_ok=True)
        if directory is not None:
            Path(directory).mkdir(mode=0o700, exist_ok=True)  # private until published, as mkdtemp's
        self.directory = Path(directory) if directory is not None else outputs.temporary_dir(output)
        self.shards = ShardWriter(self.directory, max_shard_bytes, _file_metadata(), durable=directory is not None)
        self.written: tuple[str, ...] = ()  # module prefixes whose tensors are in the shards
        self.keep_on_abort = False  # an interrupted run's directory taken over by --resume, not yet accepted

    def add_module(self, module: nn.Module, prefix: str) -> None:
        """Pack every tensor of ``module`` (a quantized decoder layer) under ``prefix`` ("model.layers.3")."""
        for name, tensor in iter_checkpoint_tensors(module):
            self.shards.add(f"{prefix}.{name}", tensor)
        self.written += (f"{prefix}.",)

    def abort(self) -> None:
        if self.keep_on_abort:  # a refused --resume leaves the interrupted run's layers for the next try
            return
        self.shards.abort()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def save_quantized(model: nn.Module, tokenizer, config: QuantConfig, output: str | os.PathLike, *,
                   provenance: dict, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                   writer: CheckpointWriter | None = None) -> Path:
    """Write the checkpoint atomically: a temporary sibling directory, renamed into place when complete.

    ``writer``: the :class:`CheckpointWriter` the layers were packed into as they were quantized (they may be
    released from ``model`` since); without one, every tensor of ``model`` is written here.
    """
    output = Path(output)
    if writer is None:
        writer = CheckpointWriter(output, force=force, source=provenance.get("source_model"),
                                  max_shard_bytes=max_shard_bytes)
    tmp = writer.directory
    try:
        write_weights(iter_checkpoint_tensors(model, writer.written, writer.fetch), tmp, shards=writer.shards)
        hf_config = model.config.to_dict()
        hf_config.pop("_attn_implementation_autoset", None)
        hf_config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                            "packing": "block_q{bits} (rptq_cli/quant/pack.py)",
                                            "label": config.label, **config.to_dict()}
        hf_config["torch_dtype"] = hf_config["dtype"] = "float16"
        hf_config["transformers_weights"] = NEEDS_IMPORT  # plain transformers stops instead of loading it as FP
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        record = {"tool": "rptq", "tool_version": __version__, **provenance, HASHES_KEY: directory_hashes(tmp)}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_card(tmp, name=output.name)
        _publish_permissions(tmp)
        _replace_dir(tmp, output)
    except BaseException:
        writer.abort()
        raise
    return output


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the checkpoint the modes of ordinary new files."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing target is moved aside first and deleted after."""
    old = None
    with outputs.signals_deferred():  # a signal between the two renames would leave neither checkpoint in place
        if target.exists():
            old = target.with_name(f"{outputs.temporary_prefix(target)}{os.getpid()}-old")  # a stale one is found
            os.replace(target, old)
        os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ reading


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return quant_method(Path(path)) == QUANT_METHOD


CHECKPOINT_FIX = "re-run `rptq quantize`"


def _weight_files(directory: Path) -> WeightFiles:
    """The checkpoint's shards (headers only), each checked to carry rptq's file tag."""
    if not (directory / INDEX_NAME).is_file() and not (directory / WEIGHTS_NAME).is_file():
        raise RptqError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete, {CHECKPOINT_FIX}")
    files = WeightFiles(directory, fix=f"the checkpoint is incomplete or corrupted, {CHECKPOINT_FIX}")
    for name, metadata in files.metadata.items():
        if FILE_TAG not in metadata:
            raise RptqError(f"{directory / name} is not an rptq checkpoint file; {CHECKPOINT_FIX}")
    return files


class _Tensors:
    """Checkpoint tensors taken one by one, each read from its shard only when taken (memory: the model being
    built, not a second copy of the file) and checked for presence, dtype and (optionally) shape."""

    def __init__(self, files: WeightFiles, where: Path):
        self.files, self.where = files, where
        self.remaining = files.names()  # not taken yet: what is left at the end belongs to no module

    def take(self, name: str, dtype: torch.dtype, shape: tuple | None = None) -> torch.Tensor:
        if name not in self.remaining:
            raise RptqError(f"checkpoint {self.where} is missing tensor {name}; it is incomplete or of another "
                            "format, re-run `rptq quantize`")
        self.remaining.discard(name)
        t = self.files.read(name)
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            raise RptqError(f"checkpoint tensor {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                            f"{tuple(shape) if shape is not None else '(any shape)'}; the checkpoint is corrupted")
        return t

    def has(self, name: str) -> bool:
        return name in self.remaining

    def act(self, prefix: str, channels: int, config: QuantConfig, point: str) -> ActQuant | None:
        bits = config.act_bits(point)
        if bits >= FP:
            return None
        sizes = self.take(f"{prefix}.group_sizes", torch.int32)
        check_group_sizes(f"{prefix}.group_sizes", sizes, channels)
        g = sizes.numel()
        if config.per_token(point):
            clip = self.take(f"{prefix}.clip", torch.float32, (g,))
            if not bool(((clip > 0) & (clip <= 1)).all()):
                raise RptqError(f"checkpoint tensor {prefix}.clip holds ratios outside (0, 1]; the checkpoint is "
                                "corrupted")
            return ActQuant.per_token(sizes, bits, clip)
        scale, zero = self.take(f"{prefix}.scale", torch.float32, (g,)), self.take(f"{prefix}.zero", torch.uint8, (g,))
        check_scales(f"{prefix}.scale", scale)
        check_codes(f"{prefix}.zero", zero, bits)
        return ActQuant(scale, zero.to(torch.int32), sizes, bits)


def _load_linear(t: _Tensors, path: str, linear: nn.Module, config: QuantConfig, point: str, dtype) -> QuantLinear:
    n, k, wbits = linear.out_features, linear.in_features, config.wbits
    act = t.act(f"{path}.act", k, config, point)
    if wbits >= FP:
        bias = t.take(f"{path}.bias", torch.float16, (n,)).to(dtype) if t.has(f"{path}.bias") else None
        weight = t.take(f"{path}.weight", torch.float16, (n, k)).to(dtype)
        return QuantLinear(k, n, bits=FP, bias=bias, act=act, weight=weight)
    return _load_packed(t, path, linear, wbits, act, dtype)


def _load_packed(t: _Tensors, path: str, linear: nn.Module, wbits: int, act: ActQuant | None, dtype) -> QuantLinear:
    """The packed ``wbits``-bit QuantLinear stored under ``path`` in place of ``linear``."""
    n, k = linear.out_features, linear.in_features
    bias = t.take(f"{path}.bias", torch.float16, (n,)).to(dtype) if t.has(f"{path}.bias") else None
    sizes = t.take(f"{path}.group_sizes", torch.int32)
    check_group_sizes(f"{path}.group_sizes", sizes, k)
    g = sizes.numel()
    qweight = t.take(f"{path}.qweight", torch.uint8, (n, packed_row_bytes(k, wbits)))
    scales = t.take(f"{path}.scales", torch.float16, (n, g))
    check_scales(f"{path}.scales", scales)
    return QuantLinear(k, n, bits=wbits, bias=bias, act=act, qweight=qweight, scales=scales,
                       zeros=unpack_zeros(t.take(f"{path}.zeros", torch.uint8, (packed_row_bytes(n * g, wbits),)),
                                          wbits, n, g),
                       group_sizes=sizes)


def _load_norm(t: _Tensors, path: str, norm: nn.Module, rms: bool, eps: float, dtype) -> ReorderNorm:
    c = norm.weight.shape[0]
    perm = t.take(f"{path}.perm", torch.int32, (c,)).long()
    check_permutation(f"{path}.perm", perm)
    bias = t.take(f"{path}.bias", torch.float16, (c,)).to(dtype) if t.has(f"{path}.bias") else None
    return ReorderNorm(perm, t.take(f"{path}.weight", torch.float16, (c,)).to(dtype), bias, eps, rms)


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load an rptq checkpoint → (model, tokenizer). Weights stay packed; nothing is built in fp16 first.

    ``verify``: compare every file with the SHA-256 recorded at write time (one extra read of the weights);
    the value-range checks of the quantization parameters run either way.
    """
    from .models.base import head_layout, norm_eps, replace
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise RptqError(f"{directory} is not a model directory (no config.json)")
    require_not_foreign_checkpoint(str(directory), directory)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as exc:
        raise RptqError(f"{directory / 'config.json'} is not valid JSON ({exc}); the checkpoint is corrupted") from None
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise RptqError(f"{directory} is not an rptq checkpoint (no quantization_config with quant_method "
                        f"\"rptq\"); quantize it first with `rptq quantize {directory} -o OUT`")
    if qc.get("format_version") != FORMAT_VERSION:
        raise RptqError(f"{directory} is an rptq checkpoint of format version {qc.get('format_version')}; this "
                        f"rptq {__version__} reads version {FORMAT_VERSION}: re-quantize or use a matching rptq")
    if verify:
        verify_hashes(directory, _provenance(directory).get(HASHES_KEY))
    config = QuantConfig.from_dict({k: v for k, v in qc.items()
                                    if k not in ("quant_method", "format_version", "packing", "label")})
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise RptqError(f"cannot read the config of checkpoint {directory} ({first_line(exc)}); it is "
                        "corrupted") from None
    family: Family = family_for(hf_config)
    tensors = _Tensors(_weight_files(directory), directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    heads = head_layout(family, hf_config)
    rms = family.norm_kind == "rms"
    for i, layer in enumerate(family.decoder_layers(model)):
        prefix = f"{family.layers}.{i}."
        for path, point in family.linear_inputs():
            replace(layer, path, _load_linear(tensors, prefix + path, layer.get_submodule(path), config, point,
                                              dtype))
        _check_layer_groups(layer, prefix, family, config)
        for _, path, _ in family.norm_points():
            norm = layer.get_submodule(path)
            replace(layer, path, _load_norm(tensors, prefix + path, norm, rms, norm_eps(norm), dtype))
        a = prefix + family.attn + ".rptq"
        qk_perm = (tensors.take(f"{a}.qk_perm", torch.int32, (heads.n_kv, heads.head_dim)).long()
                   if family.rope else None)
        if qk_perm is not None:
            check_permutation(f"{a}.qk_perm", qk_perm)
        widths = family.point_channels(hf_config)
        layer.get_submodule(family.attn).rptq = AttentionQuant(
            qk_perm=qk_perm, q=tensors.act(f"{a}.q", widths["q"], config, "q"),
            k=tensors.act(f"{a}.k", widths["k"], config, "k"), v=tensors.act(f"{a}.v", widths["v"], config, "v"),
            p_bits=config.act_bits("p"), window=family.sliding_window(hf_config, i))
    if family.rope:
        use_lean_rope_attention([layer.get_submodule(family.attn) for layer in family.decoder_layers(model)])
    if len(family.mlp_in) == 2:  # gate and up: one call (nn/joint.py)
        mlp = family.mlp_in[0].rpartition(".")[0]
        use_lean_gated_mlp([layer.get_submodule(mlp) for layer in family.decoder_layers(model)])
    if config.head_bits < FP:  # before the rest: its float weight is then not expected, nor tied
        head = head_path(model)
        replace(model, head, _load_packed(tensors, head, model.get_submodule(head), config.head_bits, None, dtype))
    _load_remaining(model, family, tensors, dtype, directory)
    use_rptq_attention(model)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise RptqError(f"cannot load the tokenizer of {directory} ({exc}); copy the tokenizer files into it") from None
    require_tokenizer(tokenizer, str(directory))
    model.rptq_config = config
    return model, tokenizer


def _provenance(directory: Path) -> dict:
    file = directory / PROVENANCE_NAME
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except ValueError as exc:
        raise RptqError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupted") from None
    return record if isinstance(record, dict) else {}


def _check_layer_groups(layer: nn.Module, prefix: str, family: Family, config: QuantConfig) -> None:
    """Weight groups agree with what the config records and with every other tensor reading the same input."""
    from .quant.weights import weight_group_sizes
    first_of_point: dict[str, tuple[str, torch.Tensor]] = {}
    for path, point in family.linear_inputs():
        linear, name = layer.get_submodule(path), f"{prefix}{path}.group_sizes"
        if linear.bits >= FP:
            continue
        sizes = linear.group_sizes
        if config.weight_groups != "cluster":
            check_same_groups(name, sizes, f"--weight-groups {config.weight_groups}",
                              weight_group_sizes(linear.in_features, config.weight_groups))
            continue
        reorder = REORDERS[POINTS[point].reorder]
        if not reorder.per_head:  # a global point's linears have that point's clusters as groups, at most that many
            max_groups = config.clusters[reorder.name] if config.reorder else 1
            check_group_sizes(name, sizes, linear.in_features, max_groups)
        if linear.act is not None:
            check_same_groups(name, sizes, f"{prefix}{path}.act.group_sizes", linear.act.group_sizes)
        reference = first_of_point.setdefault(point, (name, sizes))
        check_same_groups(name, sizes, *reference)


def _load_remaining(model: nn.Module, family: Family, tensors: _Tensors, dtype, directory: Path) -> None:
    """Embeddings, final norm, lm_head and the like; then rebuild the family's computed modules (RoPE)."""
    from .models.base import replace
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"}
    tied = getattr(model.config, "tie_word_embeddings", False)
    half = half_state_names(model)  # stay float16: nn/head.py
    state = {}
    for key, meta in expected.items():
        if tied and key == "lm_head.weight":
            continue
        want = torch.float16 if meta.is_floating_point() else meta.dtype
        state[key] = tensors.take(key, want, tuple(meta.shape))
        if state[key].is_floating_point() and key not in half:
            state[key] = state[key].to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied and not isinstance(model.get_output_embeddings(), QuantLinear):  # an 8-bit head has its own codes
        model.tie_weights()
    keep_head_in_half(model, dtype)
    if tensors.remaining:
        extra = ", ".join(sorted(tensors.remaining)[:3])
        raise RptqError(f"checkpoint {directory} holds tensors this model does not use ({extra}, ...); it belongs "
                        "to another model or format")
    for path in family.computed_modules:  # RoPE: inv_freq is computed from the config, not stored
        replace(model, path, type(model.get_submodule(path))(config=model.config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RptqError(f"checkpoint {directory} is missing {leftover[0]}; it is incomplete, re-run `rptq quantize`")
