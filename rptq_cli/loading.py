"""Models in: a hub id or a local directory → (model, tokenizer, family), with errors a user can act on."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .errors import RptqError, first_line
from .gguf_source import resolve_gguf
from .models import Family, family_for
from .strict import require_complete, require_float_weights, require_fp_source, require_tokenizer

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(spec: str = "auto") -> torch.device:
    """auto → the first GPU if there is one, else the CPU; cuda[:N] must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RptqError(f"--device {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RptqError(f"--device {spec} asked for a GPU but torch sees none; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RptqError(f"--device {spec!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto → float32 on the CPU (fp16 matmuls are slow there), float16 on a GPU."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise RptqError(f"--dtype {spec!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_config(name: str):
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise RptqError(f"model directory {name} does not exist; pass a local model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()) if _looks_local(name) else name)
    except (OSError, ValueError) as exc:
        raise RptqError(f"cannot load model {name!r}: {first_line(exc)}; pass a local directory with config.json "
                        "or a hub id reachable from this machine") from None


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class WeightFiles:
    """Which safetensors shard of ``directory`` holds each tensor; reads one tensor at a time.

    The directory holds ``model.safetensors`` or ``model.safetensors.index.json`` and the shards it names. Only
    the headers are read when this is built (names, dtypes, shapes); :meth:`read` then takes one tensor from its
    shard with ``safe_open`` (a memory map), so a model larger than memory is never read whole. ``fix`` ends
    every error message (what the user should do).
    """

    def __init__(self, directory: Path, fix: str = "the model files are incomplete or corrupted: fetch them again"):
        self.directory, self.fix = Path(directory), fix
        self.shard_of: dict[str, str] = {}  # tensor name → shard file name
        self.dtype_of: dict[str, str] = {}  # tensor name → safetensors dtype ("F16", "U8", ...)
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, dict] = {}  # shard file name → its __metadata__
        self._keys: dict[str, set[str]] = {}  # shard file name → the tensors it holds
        index = self.directory / INDEX_NAME
        if index.is_file():
            self._read_index(index)
        elif (self.directory / WEIGHTS_NAME).is_file():
            self._read_header(WEIGHTS_NAME)
            self.shard_of = dict.fromkeys(self.dtype_of, WEIGHTS_NAME)
        elif any(self.directory.glob("*.bin")):
            raise RptqError(f"{self.directory} holds PyTorch .bin weights only; rptq reads safetensors: convert them "
                            "(model.save_pretrained(DIR, safe_serialization=True)) and pass DIR")
        else:
            raise RptqError(f"{self.directory} has no {WEIGHTS_NAME} nor {INDEX_NAME}; {self.fix}")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RptqError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); "
                            f"{self.fix}") from None
        for file in files:
            if not (self.directory / file).is_file():
                raise RptqError(f"shard {file} named in {index} is missing; {self.fix}")
            self._read_header(file)
        for key, file in weight_map.items():
            if key not in self._keys.get(file, ()):
                raise RptqError(f"{index} maps tensor {key} to {file}, which does not hold it; {self.fix}")
        self.shard_of = dict(weight_map)

    def _read_header(self, file: str) -> None:
        """Names, dtypes and shapes of one shard; safetensors checks that the data covers the whole file."""
        path = self.directory / file
        try:
            with safe_open(str(path), "pt") as f:
                self.metadata[file] = f.metadata() or {}
                keys = list(f.keys())
                for key in keys:
                    piece = f.get_slice(key)
                    self.dtype_of[key], self.shape_of[key] = piece.get_dtype(), tuple(piece.get_shape())
        except Exception as exc:  # SafetensorError, OSError: the header or the file length is wrong
            raise RptqError(f"cannot read {path} ({first_line(exc)}): the file is truncated or corrupted; "
                            f"{self.fix}") from None
        self._keys[file] = set(keys)

    def names(self) -> set[str]:
        return set(self.shard_of)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype (a copy: the shard's memory map is closed on return, so
        the pages read do not stay counted in this process's resident memory)."""
        path = self.directory / self.shard_of[key]
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key)
        except Exception as exc:
            raise RptqError(f"cannot read {path} ({first_line(exc)}): the file is truncated or corrupted; "
                            f"{self.fix}") from None

    def read_many(self, keys):
        """Yield ``(key, tensor)`` for ``keys``; one tensor in memory per step."""
        for key in keys:
            yield key, self.read(key)


META = torch.device("meta")


def _is_under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


class StreamedModel:
    """An HF model whose weights stay in their safetensors files until asked for, module by module.

    ``model`` is built on the meta device (no memory for weights); :meth:`materialize` loads the tensors under
    a module prefix (``model.layers.3``) into real ``dtype`` tensors, :meth:`release` puts them back on the
    meta device. Tied tensors (lm_head ↔ embeddings) are one entry: materializing either fills both. Buffers
    that are computed, not stored (RoPE ``inv_freq``), are built for real with the skeleton.
    ``files`` is None for a model already in memory (a hub id, loaded whole by transformers, or a model built
    in the process): then materializing and releasing do nothing.
    """

    def __init__(self, model: nn.Module, tokenizer, family: Family, files: WeightFiles | None,
                 sources: dict[str, list[str]] | None = None):
        self.model, self.tokenizer, self.family, self.files = model, tokenizer, family, files
        self.sources = sources or {}  # file tensor name → every model state name that shares it (tied)
        self.source_of = {name: key for key, names in self.sources.items() for name in names}

    def materialize(self, prefix: str = "") -> nn.Module:
        """Load every stored tensor of the module at ``prefix`` still on the meta device; returns the module.

        Meant for modules as the FP model has them: a layer already quantized and released stays released.
        """
        self._load(lambda names: any(_is_under(n, prefix) for n in names))
        return self.model.get_submodule(prefix) if prefix else self.model

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` (a state name, "lm_head.weight") in the model's dtype, read now and not
        kept by the model: what a writer takes one tensor at a time."""
        key = self.source_of[name]
        return self._in_model_dtype(key, self.files.read(key))[0]

    def _in_model_dtype(self, key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``tensor`` read for file key ``key`` in the dtype the model holds it in, that model tensor)."""
        old = next(t for t in (_state(self.model, n) for n in self.sources[key]) if t is not None)
        return (tensor.to(old.dtype) if old.is_floating_point() else tensor), old

    def _load(self, wanted_names) -> None:
        wanted = [key for key, names in self.sources.items() if wanted_names(names)
                  and any(getattr(_state(self.model, n), "device", None) == META for n in names)]
        for key, tensor in (self.files.read_many(wanted) if wanted else ()):
            names = self.sources[key]
            value, old = self._in_model_dtype(key, tensor)
            if isinstance(old, nn.Parameter):  # one Parameter object for all tied names, as transformers ties
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            for name in names:
                _assign(self.model, name, value)
            del tensor, value

    def release(self, prefix: str) -> None:
        """Free every stored tensor under ``prefix`` (FP or already quantized) back to the meta device.

        Does nothing to a model without files (a hub id, or a model built in memory): it could not be reloaded.
        """
        if self.files is None:
            return
        module = self.model.get_submodule(prefix)
        for name, old in module.state_dict(keep_vars=True).items():
            if old.device != META:
                _assign(module, name, torch.empty_like(old, device=META))

    def materialize_all(self) -> tuple[nn.Module, object, Family]:
        """The whole model in memory: ``(model, tokenizer, family)``, as :func:`load_model` returns."""
        self.materialize("")
        return self.model, self.tokenizer, self.family


def _state(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer ``name`` of ``model`` (None once its module was replaced, e.g. quantized)."""
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return module._parameters.get(leaf, module._buffers.get(leaf))


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=module._parameters[leaf].requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value


def _state_groups(model: nn.Module) -> list[list[str]]:
    """The stored (persistent) state names of ``model``, those sharing one tensor (tied weights) grouped."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _match_files(model: nn.Module, files: WeightFiles, name: str) -> dict[str, list[str]]:
    """File tensor → model state names, refusing (strict.require_complete) missing, unexpected or mis-shaped ones.

    A file name is the state name, or the state name without the base model prefix (checkpoints saved from
    the bare model, like facebook/opt-*). Of tied names, the first one the files hold is read.
    """
    present = files.names()
    strip = f"{getattr(model, 'base_model_prefix', '')}."

    def file_key(state: str) -> str | None:
        if state in present:
            return state
        short = state[len(strip):] if strip != "." and state.startswith(strip) else None
        return short if short in present else None

    sources, missing, mismatched = {}, [], []
    for group in _state_groups(model):
        key = next((k for k in map(file_key, group) if k is not None), None)
        if key is None:
            missing.append(group[0])
            continue
        if files.shape_of[key] != tuple(_state(model, group[0]).shape):
            mismatched.append(group[0])
        sources[key] = group
    used = {file_key(n) for group in sources.values() for n in group}
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in present - used if not any(p.search(k) for p in ignored)]
    require_complete({"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}, name)
    return sources


def open_model(name: str, dtype: torch.dtype = torch.float32) -> StreamedModel:
    """The FP model as a :class:`StreamedModel`: config, tokenizer and every check now, weights on demand.

    A local directory (or a ``.gguf`` file, through its dequantized fp16 copy in the cache) is read from its
    safetensors shards; a hub id is loaded whole by transformers.
    """
    name = resolve_gguf(name)
    local = Path(name).expanduser() if _looks_local(name) else None
    require_fp_source(name, local)
    config = load_config(name)
    family = family_for(config)
    if local is None:
        model, tokenizer, _ = _load_whole(name, dtype, family)
        return StreamedModel(model, tokenizer, family, None)
    files = WeightFiles(local)
    try:
        with quiet_transformers(), init_empty_weights():  # parameters on meta, computed buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # from_config does not tie on the meta device; tied names must share one tensor
        tokenizer = AutoTokenizer.from_pretrained(str(local))
        if (local / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(local))
    except (OSError, ValueError) as exc:
        raise RptqError(f"cannot load model {name!r}: {first_line(exc)}; the files are truncated, corrupted or "
                        "missing") from None
    sources = _match_files(model, files, name)
    require_float_weights(local, {key for key, _ in model.named_parameters()}, name)
    require_tokenizer(tokenizer, name)
    model.eval()
    model.config.use_cache = True
    return StreamedModel(model, tokenizer, family, files, sources)


def _load_whole(name: str, dtype: torch.dtype, family: Family) -> tuple[nn.Module, object, Family]:
    """A hub id through transformers' own loading (whole, in memory), under the same strict checks."""
    try:
        with quiet_transformers():  # its load report would add lines; require_complete says what matters
            model, info = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, SafetensorError) as exc:
        raise RptqError(f"cannot load model {name!r}: {first_line(exc)}; the files are truncated, corrupted or "
                        "missing") from None
    require_complete(info, name)
    require_tokenizer(tokenizer, name)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, family


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, Family]:
    """The FP model on the CPU in ``dtype``, its tokenizer and its family adapter (a ``.gguf`` file is read
    through its dequantized fp16 copy in the cache)."""
    return open_model(name, dtype).materialize_all()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging for the duration (our own checks report what went wrong)."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def default_seqlen(config) -> int:
    """GPTQ's 2048, or the model's maximum positions when shorter."""
    return min(2048, getattr(config, "max_position_embeddings", 2048) or 2048)


# --- Placement over several devices (accelerate device maps) -------------------------------------------------------

DEVICE_MAP_KINDS = ("auto", "balanced")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
GPU_HEADROOM = 0.9  # of a GPU's free memory when --max-memory does not say: the rest is for activations and cache


def format_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _parse_size(text: str) -> int | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", text.strip(), re.IGNORECASE)
    if match is None:
        return None
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])


def _parse_device(text, what: str) -> int | str:
    """A device of a device map or --max-memory: a GPU index (``0``, ``"0"``, ``"cuda:0"``), ``"cpu"`` or
    ``"disk"``; a GPU that torch does not see is refused here, not when the first layer reaches it."""
    if isinstance(text, int) and not isinstance(text, bool):
        index = text
    elif isinstance(text, str) and text in ("cpu", "disk"):
        return text
    elif isinstance(text, str) and re.fullmatch(r"(cuda:)?\d+", text):
        index = int(text.removeprefix("cuda:"))
    else:
        raise RptqError(f"{what}: {text!r} is not a device; use a GPU index (0, 1, ...), cpu or disk")
    if index >= torch.cuda.device_count():
        seen = torch.cuda.device_count()
        raise RptqError(f"{what}: GPU {index} does not exist (torch sees {seen} GPU{'s' * (seen != 1)}); "
                        "use the GPUs that exist, cpu or disk")
    return index


def parse_max_memory(spec: str) -> dict[int | str, int]:
    """``0=70GiB,cpu=100GiB`` → ``{0: 75161927680, "cpu": 107374182400}`` (GPU indexes, cpu, disk; sizes in
    B, KB/MB/GB/TB or KiB/MiB/GiB/TiB, a bare number is bytes). Every item is checked; the first bad one is named."""
    budgets: dict[int | str, int] = {}
    for item in spec.split(","):
        device, eq, size = item.partition("=")
        if not eq or not device.strip():
            raise RptqError(f"--max-memory item {item!r} is not DEVICE=SIZE; write e.g. 0=70GiB,cpu=100GiB")
        key = _parse_device(device.strip(), f"--max-memory item {item!r}")
        if key in budgets:
            raise RptqError(f"--max-memory names {key} twice; give each device once")
        budgets[key] = _parse_size(size)
        if budgets[key] is None:
            raise RptqError(f"--max-memory item {item!r}: {size!r} is not a size; write e.g. 70GiB, 500MB or 1024")
    return budgets


def read_device_map(spec: str) -> str | dict[str, int | str]:
    """``auto``, ``balanced``, or the module → device map a JSON file holds (its devices checked here; its module
    names are checked against the model by :func:`place_model`)."""
    if spec in DEVICE_MAP_KINDS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RptqError(f"--device-map {spec!r} is neither {' nor '.join(DEVICE_MAP_KINDS)} nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RptqError(f"--device-map {spec}: cannot read it as JSON ({first_line(exc)})") from None
    if not isinstance(raw, dict) or not raw:
        raise RptqError(f"--device-map {spec} must hold a JSON object of module name → device, "
                        'e.g. {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", ...}')
    return {name: _parse_device(device, f"--device-map {spec}, module {name!r}") for name, device in raw.items()}


def _decoder_layers(model: nn.Module, family: Family) -> list[str]:
    return [f"{family.layers}.{i}" for i in range(len(family.decoder_layers(model)))]


def _check_device_map(model: nn.Module, family: Family, device_map: dict, source: str) -> None:
    """Every stored tensor placed exactly once, by names the model has, and no decoder layer split."""
    modules = dict(model.named_modules())
    layers = _decoder_layers(model, family)
    for name in device_map:
        if name not in modules:
            raise RptqError(f"--device-map {source} names module {name!r}, which the model does not have (its "
                            f"decoder layers are {layers[0]} … {layers[-1]}); use names from model.named_modules()")
        inside = next((layer for layer in layers if name.startswith(layer + ".")), None)
        if inside is not None:
            raise RptqError(f"--device-map {source} places {name!r}, a part of decoder layer {inside}; a layer runs on "
                            f"one device: place {inside} as a whole")
        outer = next((other for other in device_map if other != name and _is_under(name, other)), None)
        if outer is not None:
            raise RptqError(f"--device-map {source} places both {outer!r} and {name!r}, which is inside it; place "
                            "each module once")
    if device_map.get("") == "disk":
        raise RptqError(f"--device-map {source} puts the whole model ('') on disk as one module; map its modules "
                        "(embeddings, each layer, the head) to disk one by one")
    unplaced = [key for key in model.state_dict() if not any(_is_under(key, name) for name in device_map)]
    if unplaced:
        raise RptqError(f"--device-map {source} places no device for {len(unplaced)} tensors, e.g. {unplaced[0]}; "
                        f"add its module ({unplaced[0].rpartition('.')[0] or unplaced[0]}) to the map")


def _default_budgets(model: nn.Module) -> dict[int | str, int]:
    """Every GPU's free memory less headroom, and the CPU's available memory plus what the model already takes
    there (it was loaded on the CPU: leaving it there costs nothing more)."""
    import psutil
    budgets: dict[int | str, int] = {i: int(torch.cuda.mem_get_info(i)[0] * GPU_HEADROOM)
                                     for i in range(torch.cuda.device_count())}
    on_cpu = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type == "cpu")
    budgets["cpu"] = psutil.virtual_memory().available + on_cpu
    return budgets


def _infer_device_map(model: nn.Module, family: Family, kind: str, budgets: dict | None, spec: str | None):
    """accelerate's map for ``kind`` (auto: fill GPU 0, then 1, …, then the CPU; balanced: the same layers on every
    GPU) within ``budgets``; refuses budgets that hold no layer, and disk unless the budgets name it."""
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    given = budgets is not None
    budgets = dict(budgets) if given else _default_budgets(model)
    where = f"--max-memory {spec}" if given else "the free memory of this machine"
    sizes = compute_module_sizes(model)
    smallest = min(_decoder_layers(model, family), key=lambda name: sizes[name])
    rooms = {device: size for device, size in budgets.items() if device != "disk"}
    roomiest = max(rooms, key=rooms.get, default="cpu")
    if rooms.get(roomiest, 0) < sizes[smallest]:
        need = -(-sizes[smallest] // 2**20)
        raise RptqError(f"{where} gives no device room for one decoder layer: the smallest ({smallest}) takes "
                        f"{format_size(sizes[smallest])}; give a device at least that, e.g. --max-memory "
                        f"{roomiest}={need}MiB")
    no_split = [type(family.decoder_layers(model)[0]).__name__]
    if kind == "balanced":  # it balances GPUs only, and cannot read a "disk" key (accelerate 1.15)
        disk = {"disk": budgets.pop("disk")} if "disk" in budgets else {}
        budgets = {**get_balanced_memory(model, budgets, no_split_module_classes=no_split), **disk}
    with quiet_logger("accelerate"):
        device_map = infer_auto_device_map(model, budgets, no_split_module_classes=no_split, offload_buffers=True)
    if device_map.get("") == "disk":
        largest = max((sizes[name] for name in _decoder_layers(model, family)))
        raise RptqError(f"{where} leaves the whole model ({format_size(sizes[''])}) on disk: accelerate keeps room for "
                        f"the largest layer ({format_size(largest)}) on the device that runs offloaded ones, and no "
                        "module fits beside it; give the CPU or a GPU more room")
    spilled = [name for name, device in device_map.items() if device == "disk"]
    if spilled and "disk" not in (budgets if given else ()):
        spilled_bytes = sum(sizes[name] for name in spilled)
        raise RptqError(f"the model ({format_size(sizes[''])}) does not fit {where}: {format_size(spilled_bytes)} "
                        f"({spilled[0]}{', …' if len(spilled) > 1 else ''}) has no device; give more room "
                        "(--max-memory 0=…,cpu=…) or allow offloading it to a temporary folder (add disk=100GiB)")
    return device_map


def place_model(model: nn.Module, family: Family, device_map: str | dict, max_memory: dict | None = None, *,
                offload_dir: str | None = None, spec: str = "", max_memory_spec: str | None = None) -> torch.device:
    """Spread ``model`` (in memory, on the CPU) over devices with accelerate: ``device_map`` is ``auto``,
    ``balanced`` (:func:`_infer_device_map` within ``max_memory``) or a module → device dict. Returns the main
    device: where inputs go and where modules placed on ``cpu``/``disk`` run when a GPU is in the map.

    Modules on ``disk`` are written to ``offload_dir`` and read back for each forward; with a GPU in the map,
    those on ``cpu`` stay in CPU memory and are copied to the main device for each forward (accelerate's
    semantics). A decoder layer is loaded whole before it runs (``preload_module_classes``): a packed layer's
    quantizers are read by their parent modules, not called, so per-module loading would miss them. Buffers are
    offloaded too (``offload_buffers``): a packed linear keeps its codes and scales in buffers.
    """
    from accelerate import dispatch_model

    from .nn.joint import keep_apart
    if isinstance(device_map, str):
        device_map = _infer_device_map(model, family, device_map, max_memory, max_memory_spec)
    else:
        _check_device_map(model, family, device_map, spec)
    main = main_device(device_map.values())
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("modules placed on disk need an offload_dir")
    with quiet_logger("accelerate"):
        dispatch_model(model, device_map, main_device=main.index if main.type == "cuda" else "cpu",
                       offload_dir=offload_dir, offload_buffers=True,
                       preload_module_classes=[type(family.decoder_layers(model)[0]).__name__])
    keep_apart(model)
    return main


def describe_device_map(model: nn.Module, family: Family, device_map: dict) -> str:
    """What each device holds: ``0: model.embed_tokens, layers 0-15 (6.30 GiB); cpu: layers 16-31, …``."""
    from accelerate.utils import compute_module_sizes
    sizes = compute_module_sizes(model)
    layers = _decoder_layers(model, family)
    held: dict = {}
    for name, device in device_map.items():
        held.setdefault(device, []).append(name)
    parts = []
    for device in sorted(held, key=lambda d: (not isinstance(d, int), str(d))):
        names = held[device]
        indexes = [i for i, layer in enumerate(layers) if layer in names or family.layers in names]
        ranges = _ranges(indexes)
        others = [n or "the whole model" for n in names if n not in layers and n != family.layers]
        what = ", ".join(others + ([f"layers {ranges}"] if ranges else []))
        parts.append(f"{device}: {what} ({format_size(sum(sizes[n] for n in names))})")
    return "; ".join(parts)


def _ranges(indexes: list[int]) -> str:
    """[0, 1, 2, 5] → ``0-2, 5``."""
    spans: list[list[int]] = []
    for i in indexes:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def main_device(devices) -> torch.device:
    """The device that runs a map over ``devices`` (GPU indexes, cpu, disk): its first GPU, else the CPU."""
    gpus = sorted(d for d in devices if isinstance(d, int))
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the main device of a model placed by :func:`place_model` (its first modules may
    live on disk, their parameters on the meta device), else the device of its parameters."""
    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(model.parameters()).device


@contextlib.contextmanager
def quiet_logger(name: str):
    """Silence library ``name`` below ERROR for the block: accelerate warns for every offloaded model and every
    budget it rounds, lm-eval logs every step; our own messages say what matters."""
    import logging
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
