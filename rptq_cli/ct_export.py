"""``rptq export CKPT --format compressed-tensors -o DIR``: a weight-only checkpoint for other runtimes.

compressed-tensors' ``pack-quantized`` format (what vLLM and transformers read) stores per linear
``weight_packed`` (int32, codes packed densely along the input dim), ``weight_scale`` [N, G],
``weight_zero_point`` (int32, packed along the output dim), ``weight_shape`` and, for group activation
ordering, ``weight_g_idx`` [K] (the group of every input column). Codes are signed there
(q - 2^(b-1)); the dequantized weight (q - z) * s is the same number as rptq's.

What the export does to an rptq checkpoint:

- the reorder is undone: R1/R4 live in the norms (a gather of their output); the norm goes back to the
  stock module (gamma and beta in the model's order) and the columns of the linears that read it go back to
  the model's order. R2/R3/R5 permute the rows of one linear and the columns of the next (and RoPE keys
  after rotation, which QKᵀ does not see): the stock model computes the same function with them, so they stay;
- weight groups: compressed-tensors' groups all have one size. ``--weight-groups N`` (N dividing the
  inputs) gives groups of N contiguous columns in the reordered order; in the model's order they are
  scattered, which is exactly group activation ordering: ``actorder: group`` with ``weight_g_idx``
  (compressed-tensors up to 0.18; 0.19 removed it). Where every group is contiguous in the model's order
  (no reorder) the groups stay plain contiguous groups. ``--weight-groups channel`` is the ``channel``
  strategy. RPTQ's default groups are the clusters, of uneven sizes: no compressed-tensors scheme holds
  them, and the export says so and how to re-quantize.
- an 8-bit lm_head (``--head-bits 8``) is written dequantized, in float16 and untied from the embeddings: the
  export computes what the checkpoint computes, and compressed-tensors keeps the head in floating point anyway;
- activation and KV-cache quantization (W4A8, W4A4, *KV) have no equivalent in any other runtime's format
  (their scales are static per cluster): refused, naming the formats that exist.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import outputs
from .errors import RptqError
from .models import family_for
from .nn.head import head_path
from .nn.linear import QuantLinear
from .nn.norm import ReorderNorm

FORMATS = ("compressed-tensors",)
CT_PIN = "compressed-tensors==0.18.0"  # the last release with group activation ordering (weight_g_idx)
CT_FILE = "model.safetensors"
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
          "tokenizer.model", "generation_config.json", "chat_template.jinja")


def _require_ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise RptqError(f"--format compressed-tensors needs the compressed-tensors package: pip install "
                        f"'{CT_PIN}'") from None
    return compressed_tensors.__version__, pack_to_int32


def refuse_unexportable(config, checkpoint: str) -> None:
    """Activation/KV quantization has no other format; 16-bit weights have nothing to export."""
    if config.quantizes_acts:
        raise RptqError(f"{checkpoint} is {config.label}: its activations or KV cache use per-cluster scales "
                        "(RPTQ's reorder), which no other runtime's format (compressed-tensors, GPTQ, AWQ, GGUF) "
                        "expresses; `rptq export` writes weight-only checkpoints (W4A16, W3A16, W8A16) as --format "
                        f"{'|'.join(FORMATS)}; run this one with rptq (eval, generate, or from_pretrained after "
                        "`import rptq_cli`)")
    if not config.quantizes_weights:
        raise RptqError(f"{checkpoint} keeps its weights in floating point: there is nothing to export; use its "
                        "source model")


def _column_groups(linear: QuantLinear, inverse: torch.Tensor | None, path: str, checkpoint: str):
    """(group of every input column in the model's order [K] int32, group size or None for one group)."""
    sizes = linear.group_sizes.long()
    if sizes.numel() == 1:
        return None, None
    size = int(sizes[0])
    if not bool((sizes == size).all()):
        raise RptqError(f"{checkpoint}: {path} has weight groups of uneven sizes ({sizes.min()}..{sizes.max()} "
                        "columns: RPTQ's clusters, or a last group shorter than the others) and compressed-tensors "
                        "groups all have one size; re-quantize with --weight-groups 128 (or another size that "
                        "divides the inputs) or --weight-groups channel, then export")
    groups = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    return (groups if inverse is None else groups[inverse]).to(torch.int32), size


def _linear_tensors(linear: QuantLinear, inverse: torch.Tensor | None, groups, pack) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one linear, its columns in the model's order."""
    from .kernels import unpack_weight
    n, k, bits = linear.out_features, linear.in_features, linear.bits
    codes = unpack_weight(linear.qweight, bits, n, k)
    if inverse is not None:
        codes = codes[:, inverse]
    offset = 1 << (bits - 1)
    out = {"weight_packed": pack((codes.to(torch.int16) - offset).to(torch.int8), bits),
           "weight_scale": linear.scales.to(torch.float16).contiguous(),
           "weight_zero_point": _packed_zero_points(linear.zeros, bits, pack),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if groups is not None:
        out["weight_g_idx"] = groups
    if linear.bias is not None:
        out["bias"] = linear.bias.detach().to(torch.float16)
    return out


def _packed_zero_points(zeros: torch.Tensor, bits: int, pack) -> torch.Tensor:
    """Zero-points [N, G] packed along N into int32 words, the rows below the packed ones zero: int32 [N, G].

    compressed-tensors packs them into ceil(N·bits/32) rows, but transformers (5.23, with compressed-tensors
    0.18 to 0.20) builds the module with an unpacked [N, G] zero-point and refuses the packed shape; its
    unpacking reads the first rows' words and drops what lies past N, so zero rows pad the packed block to
    the shape transformers expects and the values come out the same.
    """
    n, g = zeros.shape
    packed = pack((zeros.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=0)
    out = torch.zeros(n, g, dtype=torch.int32)
    out[:packed.shape[0]] = packed
    return out


def _scheme(bits: int, group_size: int | None, actorder: bool) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False, "observer": "minmax",
               "strategy": "channel" if group_size is None else "group", "group_size": group_size,
               "actorder": "group" if actorder else None, "block_structure": None, "observer_kwargs": {}}
    return {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def export_compressed_tensors(checkpoint: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
                              verify: bool = True) -> dict:
    """Write ``output`` (atomically) from the rptq checkpoint ``checkpoint``; returns a summary dict."""
    from .export import load_quantized
    checkpoint, output = Path(checkpoint), Path(output)
    version, pack = _require_ct()
    outputs.check_output(output, force, is_ours=is_ct_export, kind="export directory", directory=True,
                         sources=(checkpoint,))
    model, _ = load_quantized(checkpoint, dtype=torch.float32, verify=verify)
    refuse_unexportable(model.rptq_config, str(checkpoint))
    family = family_for(model.config)
    tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    schemes: set[tuple] = set()
    for i, layer in enumerate(family.decoder_layers(model)):
        prefix = f"{family.layers}.{i}."
        inverse = {}
        for point, norm_path, _ in family.norm_points():
            norm: ReorderNorm = layer.get_submodule(norm_path)
            inverse[point] = torch.argsort(norm.perm)
            # stock norm: gamma[perm] was stored, so gamma = stored[argsort(perm)]
            tensors[prefix + norm_path + ".weight"] = norm.weight.detach()[inverse[point]].to(torch.float16)
            if norm.bias is not None:
                tensors[prefix + norm_path + ".bias"] = norm.bias.detach()[inverse[point]].to(torch.float16)
            done.add(prefix + norm_path + ".")
        for path, point in family.linear_inputs():
            linear: QuantLinear = layer.get_submodule(path)
            inv = inverse.get(point)
            groups, size = _column_groups(linear, inv, prefix + path, str(checkpoint))
            contiguous = groups is None or bool((groups[1:] >= groups[:-1]).all())
            schemes.add((linear.bits, size, not contiguous))
            tensors.update({f"{prefix}{path}.{k}": v for k, v in _linear_tensors(linear, inv, groups, pack).items()})
            done.add(prefix + path + ".")
    if len({(b, s) for b, s, _ in schemes}) != 1:
        raise RptqError(f"{checkpoint} mixes weight bit widths or group sizes across layers ({sorted(schemes)}); "
                        "compressed-tensors export handles one scheme per model")
    bits, size, _ = next(iter(schemes))
    actorder = any(a for _, _, a in schemes)
    if not actorder:  # plain contiguous groups: no g_idx
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".weight_g_idx")}
    head_name = head_path(model)
    head = model.get_submodule(head_name)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if isinstance(head, QuantLinear):  # --head-bits 8: a float head there (compressed-tensors keeps it FP), untied
        tensors[f"{head_name}.weight"] = head.dequantized_weight().to(torch.float16)
        if head.bias is not None:
            tensors[f"{head_name}.bias"] = head.bias.detach().to(torch.float16)
        done.add(f"{head_name}.")
        tied = False
    for key, value in model.state_dict().items():  # embeddings, final norm, lm_head, positions
        if not any(key.startswith(d) for d in done) and ".rptq." not in key and value.is_floating_point():
            tensors[key] = value.detach().to(torch.float16)
    if tied:
        tensors.pop(f"{head_name}.weight", None)
    ignore = [head_name]
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": _scheme(bits, size, actorder)}, "ignore": ignore, "kv_cache_scheme": None,
          "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": version}
    hf_config = json.loads((checkpoint / "config.json").read_text())
    rptq_qc = hf_config.pop("quantization_config")
    hf_config.pop("transformers_weights", None)
    hf_config["tie_word_embeddings"] = tied
    hf_config["quantization_config"] = qc
    _write(output, checkpoint, tensors, hf_config, rptq_qc)
    return {"bits": bits, "group_size": size, "actorder": actorder, "tensors": len(tensors)}


def _write(output: Path, checkpoint: Path, tensors: dict, hf_config: dict, rptq_qc: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temporary_dir(output)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / CT_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        for name in COPIED:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        (tmp / "rptq_export.json").write_text(json.dumps(
            {"exported_from": str(checkpoint), "format": "compressed-tensors", "rptq_quantization": rptq_qc},
            indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        from .export import _replace_dir
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_ct_export(path: Path) -> bool:
    """An export directory rptq wrote (the only kind `rptq export --force` replaces)."""
    return (Path(path) / "rptq_export.json").is_file()
