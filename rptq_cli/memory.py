"""``rptq memory``: the bytes a model needs, predicted from its config.json alone (no weights are read).

Every figure is one formula below, written against the code that allocates the bytes, so the tests can hold
the prediction against what that code really stores:

* **Checkpoint** (:func:`checkpoint_bytes`): every tensor that ``export.checkpoint_tensors`` writes, in its
  on-disk dtype (the table in export.py's docstring). Per quantized linear [N, K] with G weight groups::

      qweight  uint8  N · packed_row_bytes(K, wbits)         (quant/pack.py: blocks of 32 codes, 4·bits bytes)
      scales   fp16   N · G · 2
      zeros    uint8  packed_row_bytes(N · G, wbits)         (one flat stream, padded once per tensor)
      group_sizes int32  G · 4
      bias     fp16   N · 2                                  (when the model has one)
      act.*    static: scale f32 + zero u8 + group_sizes i32 = 9 · Ga;  per token: clip f32 + group_sizes = 8 · Ga

  a linear kept in FP (--wbits 16) stores ``weight`` fp16 N · K · 2 instead. Per norm: weight fp16, perm int32
  (and bias fp16 for LayerNorm) over its C channels. Per attention: q/k/v quantizer params as ``act.*`` over
  their groups, and ``qk_perm`` int32 [kv_heads, head_dim] for RoPE families. Everything outside the decoder
  layers (embeddings, positions, final norm, untied lm_head) is fp16, shapes from the model built on the meta
  device (a copy of the config with one layer: nothing is allocated).
* **Groups.** Weight groups are the input's clusters (``cluster``), one per row (``channel``) or ceil(K / g)
  (a group size g). Cluster counts are the config's, clamped to the channels like ``rptq quantize`` does:
  x1 = R1, x2 = R4, down_in = R5; k = kv_heads · R2, q = heads · R2, v = kv_heads · R3, o_in = heads · R3
  (per head, each query head takes its KV head's clusters). KMeans can leave a cluster empty, so a real
  checkpoint may have fewer groups; :class:`Groups` with the counts of a real checkpoint gives its exact size.
* **KV cache** (:func:`kv_bytes`): FP16 ``2 · layers · B · kv_heads · S · head_dim · 2``; packed (nn/kv_cache.py)
  ``2 · layers · B · kv_heads · S · packed_row_bytes(head_dim, abits)`` (= ``PackedKVCache.nbytes()``), plus
  ``layers · B · kv_heads · S · 3 · (R2 + R3)`` on per-token grids (a float16 scale and a uint8 zero per cluster
  of each head, token and K/V; ``--kv-grid token``); with the
  buffers preallocated for ``max_length = S`` the capacity is S rounded up to ``GROWTH_TOKENS`` (=
  ``reserved_nbytes()``).
* **Peak of ``rptq quantize``** (:func:`quantize_peak`, layer streamed): the largest of its phases (embed,
  calibrate, GPTQ, write; :func:`quantize_phases`), each a sum of the terms it lists. **Peak of running the
  packed model** (:func:`run_peak`): a sum of the terms it lists. Each term is documented there.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONFIG_DIR, FP, QuantConfig
from .errors import RptqError
from .points import ACT_POINTS, POINTS, REORDERS, STAT_POINTS
from .quant.pack import packed_row_bytes

MODEL_CONFIG_DIR = CONFIG_DIR / "models"  #: offline config.json of big models (``rptq memory llama-70b``)
RUNTIME_BYTES = 400 * 2**20  #: python + torch + transformers + rptq after import (measured RSS: ~350 MiB)
GROWTH_TOKENS = 256  #: nn/kv_cache.py PackedKVLayer.GROWTH_TOKENS (kept equal by a test)
KV_GRID_BYTES = 3  #: a per-token grid: float16 scale + uint8 zero (nn/kv_cache.py, kernels.kv_append_token)
CLIP_SAMPLE_ROWS = 2048  #: quantize.py: token rows kept per activation point for the MSE clip search
HEAD_TEMPORARIES = 24  #: bytes a weight of rtn_quantize's float32 temporaries (weight, expanded grid, rounding)
GiB = 2**30


# ------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Linear:
    path: str     # inside a decoder layer, e.g. "self_attn.q_proj"
    point: str    # the activation point that feeds it (config.py)
    k: int        # in_features
    n: int        # out_features
    bias: bool


@dataclass(frozen=True)
class Shapes:
    """What the formulas need from a model's config: one decoder layer's tensors and everything outside."""
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    rope: bool
    linears: tuple[Linear, ...]
    norms: tuple[tuple[str, int, bool], ...]      # (path, channels, has bias)
    outside: dict = field(default_factory=dict)   # name -> numel of each fp16 tensor outside the layers
    embedding_numel: int = 0                      # of the modules that run before layer 0
    half_numel: int = 0                           # token embeddings and lm_head: float16 when packed (nn/head.py)
    head_in: int = 0                              # the lm_head's input features (OPT-350m: word_embed_proj_dim)
    head_weight: str = ""                         # the lm_head's weight in the state dict (nn.head.head_path)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (linears with biases, norms)."""
        return (sum(l.n * l.k + l.n * l.bias for l in self.linears)
                + sum(c * (1 + b) for _, c, b in self.norms))

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + sum(self.outside.values())


def read_config(model: str) -> dict:
    """The raw config.json of ``model``: a local directory, a config.json path, a name under configs/models/,
    or a hub id (only its config.json is downloaded)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise RptqError(f"{model} has no config.json; give a model directory, a config.json or a hub id")
    elif not path.is_file() and (MODEL_CONFIG_DIR / model / "config.json").is_file():
        path = MODEL_CONFIG_DIR / model / "config.json"
    elif not path.is_file():
        path = _hub_config(model)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RptqError(f"cannot read {path} ({type(exc).__name__}: {exc}); give a valid config.json") from None
    if not isinstance(raw, dict):
        raise RptqError(f"{path} is not a model config (a JSON object); give a valid config.json")
    return raw


def _hub_config(model: str) -> Path:
    if model.endswith(".json") or model.startswith((".", "/", "~")) or model.count("/") > 1:  # not a hub id
        raise RptqError(f"{model} does not exist; give a model directory, a config.json or a hub id")
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(model, "config.json"))
    except Exception as exc:  # offline, unknown repo, gated: all the same to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RptqError(f"cannot get the config.json of {model} ({first}); give a local model directory or "
                        f"config.json, or one of {', '.join(model_config_names())}") from None


def model_config_names() -> list[str]:
    return sorted(p.parent.name for p in MODEL_CONFIG_DIR.glob("*/config.json"))


def model_shapes(raw: dict) -> Shapes:
    """Shapes from a config dict, via the family adapter and a one-layer model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import family_for
    from .models.base import head_layout, supported_architectures
    from .nn.head import half_state_names, head_path
    model_type = raw.get("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError) as exc:
        archs = ", ".join(raw.get("architectures") or [str(model_type)])
        raise RptqError(f"unsupported architecture {archs} ({type(exc).__name__}); rptq supports "
                        f"{', '.join(supported_architectures())}") from None
    family = family_for(hf_config)
    heads = head_layout(family, hf_config)
    one = copy.deepcopy(hf_config)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    layer = family.decoder_layers(model)[0]
    linears = tuple(Linear(path, point, m.in_features, m.out_features, m.bias is not None)
                    for path, point in family.linear_inputs() for m in [layer.get_submodule(path)])
    norms = tuple((path, layer.get_submodule(path).weight.shape[0], getattr(layer.get_submodule(path), "bias", None)
                   is not None) for _, path, _ in family.norm_points())
    prefix = family.layers + "."
    outside = {k: v.numel() for k, v in model.state_dict().items() if not k.startswith(prefix)}
    head_weight = f"{head_path(model)}.weight"
    if getattr(hf_config, "tie_word_embeddings", False):
        outside.pop(head_weight, None)
    embedding = sum(n for k, n in outside.items() if any(k.startswith(e + ".") for e in family.embeddings))
    half = sum(outside.get(name, 0) for name in half_state_names(model))
    ffn = family.widths(hf_config)["ffn"]
    return Shapes(model_type=model_type, layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size,
                  intermediate=ffn, n_heads=heads.n_heads, n_kv=heads.n_kv, head_dim=heads.head_dim,
                  vocab=hf_config.vocab_size, rope=family.rope, linears=linears, norms=norms, outside=outside,
                  embedding_numel=embedding, half_numel=half,
                  head_in=model.get_output_embeddings().in_features, head_weight=head_weight)


# ------------------------------------------------------------------------------------------ groups


@dataclass(frozen=True)
class Groups:
    """Activation groups (clusters) at each point of one layer; weight groups follow from these."""
    x1: int
    q: int
    k: int
    v: int
    o_in: int
    x2: int
    down_in: int

    @classmethod
    def nominal(cls, shapes: Shapes, config: QuantConfig) -> "Groups":
        """The config's cluster counts clamped to the channels (cli._fit_clusters), as quantize asks KMeans."""
        points = [POINTS[name] for name in STAT_POINTS]
        if not config.reorder:  # one cluster per point; per query head when there is one KV head
            per_query = shapes.n_heads if shapes.n_kv == 1 else 1
            return cls(**{p.name: per_query if p.width == "query" else 1 for p in points})
        widths = {"hidden": shapes.hidden, "ffn": shapes.intermediate}
        heads = {"query": shapes.n_heads, "kv": shapes.n_kv}
        counts = {}
        for p in points:
            asked, per_head = config.clusters[p.reorder], REORDERS[p.reorder].per_head
            counts[p.name] = heads[p.width] * min(asked, shapes.head_dim) if per_head else min(asked, widths[p.width])
        return cls(**counts)


def weight_groups(k: int, spec, act_groups: int) -> int:
    """G of a weight with K input columns (quant/weights.py weight_group_sizes)."""
    if spec == "cluster":
        return act_groups
    if spec == "channel":
        return 1
    return -(-k // int(spec))


# ------------------------------------------------------------------------------------------ checkpoint


def act_param_bytes(config: QuantConfig, point: str, groups: int) -> int:
    """export._act_tensors: static scale f32 + zero u8 + group_sizes i32; per token clip f32 + group_sizes."""
    if config.act_bits(point) >= FP:
        return 0
    return groups * (8 if config.per_token(point) else 9)


def layer_bytes(shapes: Shapes, config: QuantConfig, groups: Groups) -> dict[str, int]:
    """On-disk bytes of one quantized decoder layer, by kind of tensor (keys of :data:`KINDS`)."""
    out = dict.fromkeys(KINDS, 0)
    wbits = config.wbits
    for lin in shapes.linears:
        act_g = getattr(groups, lin.point)
        if wbits < FP:
            g = weight_groups(lin.k, config.weight_groups, act_g)
            out["codes"] += lin.n * packed_row_bytes(lin.k, wbits)
            out["scales"] += lin.n * g * 2
            out["zeros"] += packed_row_bytes(lin.n * g, wbits)
            out["group tables"] += g * 4
        else:
            out["fp16 weights"] += lin.n * lin.k * 2
        out["biases"] += lin.n * 2 * lin.bias
        out["act params"] += act_param_bytes(config, lin.point, act_g)
    for _, c, bias in shapes.norms:
        out["norms"] += c * (2 + 4 + 2 * bias)
    out["qk params"] += sum(act_param_bytes(config, p.name, getattr(groups, p.name))
                            for p in ACT_POINTS if p.observed and p.in_attention)
    out["qk params"] += shapes.n_kv * shapes.head_dim * 4 * shapes.rope
    return out


KINDS = ("codes", "scales", "zeros", "group tables", "fp16 weights", "biases", "act params", "norms",
         "qk params", "embeddings, lm_head")


def checkpoint_bytes(shapes: Shapes, config: QuantConfig, groups: Groups | list[Groups] | None = None) -> dict[str, int]:
    """Bytes of every tensor of the packed checkpoint by kind (sum = the safetensors payload, headers excluded).
    ``groups``: one :class:`Groups` for every layer, one per layer, or None for :meth:`Groups.nominal`."""
    if groups is None:
        groups = Groups.nominal(shapes, config)
    per_layer = groups if isinstance(groups, list) else [groups] * shapes.layers
    if len(per_layer) != shapes.layers:
        raise ValueError(f"{len(per_layer)} layer groups for {shapes.layers} layers")
    total = dict.fromkeys(KINDS, 0)
    for g in per_layer:
        for kind, n in layer_bytes(shapes, config, g).items():
            total[kind] += n
    total["embeddings, lm_head"] = 2 * sum(shapes.outside.values()) + packed_head_delta(shapes, config)
    return total


def packed_head_bytes(shapes: Shapes, config: QuantConfig, loaded: bool = False) -> int:
    """An lm_head packed at ``--head-bits`` (nn/head.py quantize_head): its codes, fp16 scales, zeros (packed on
    disk, uint8 [N, G] when ``loaded``) and int32 group sizes, over groups of HEAD_GROUP columns; 0 for a float16
    head."""
    from .nn.head import HEAD_GROUP
    if config.head_bits >= FP:
        return 0
    n, k, bits = shapes.vocab, shapes.head_in, config.head_bits
    g = -(-k // HEAD_GROUP)
    zeros = n * g if loaded else packed_row_bytes(n * g, bits)
    return n * packed_row_bytes(k, bits) + n * g * 2 + zeros + g * 4


def packed_head_delta(shapes: Shapes, config: QuantConfig, loaded: bool = False) -> int:
    """What ``--head-bits`` changes in the bytes outside the layers: the packed head in, an untied float16 head out
    (a tied one stays: it is the embedding table)."""
    if config.head_bits >= FP:
        return 0
    return packed_head_bytes(shapes, config, loaded) - 2 * shapes.outside.get(shapes.head_weight, 0)


def fp16_bytes(shapes: Shapes) -> int:
    """The FP16 model's weights (tied lm_head counted once)."""
    return 2 * shapes.params


# ------------------------------------------------------------------------------------------ KV cache


def kv_bytes(shapes: Shapes, batch: int, seqlen: int, bits: int = FP, reserved: bool = False,
             token_groups: tuple[int, int] = (0, 0)) -> int:
    """K and V of every layer for ``batch`` sequences of ``seqlen`` tokens.

    bits 16: FP16 values. bits < 16: packed codes (PackedKVCache.nbytes), and with ``token_groups`` (clusters per
    head of K and of V, :func:`kv_token_groups`) the per-token grids stored beside them; ``reserved``: the
    buffers a cache built with ``max_length=seqlen`` allocates (capacity rounded up to GROWTH_TOKENS;
    reserved_nbytes)."""
    row = shapes.head_dim * 2 if bits >= FP else packed_row_bytes(shapes.head_dim, bits)
    tokens = -(-seqlen // GROWTH_TOKENS) * GROWTH_TOKENS if reserved and bits < FP else seqlen
    per_token_and_head = 2 * row + KV_GRID_BYTES * sum(token_groups)
    return shapes.layers * batch * shapes.n_kv * tokens * per_token_and_head


def kv_token_groups(shapes: Shapes, config: QuantConfig) -> tuple[int, int]:
    """Clusters per KV head of K and of V whose grids the cache stores per token (0, 0 on static grids)."""
    if not config.per_token("k"):
        return 0, 0
    g = Groups.nominal(shapes, config)
    return g.k // shapes.n_kv, g.v // shapes.n_kv


def kv_params_bytes(shapes: Shapes) -> int:
    """Per-channel K and V scale (f32) and zero (int32) each packed layer expands its quantizers into."""
    return shapes.layers * 2 * shapes.n_kv * shapes.head_dim * 8


# ------------------------------------------------------------------------------------------ peaks


def _gptq(config: QuantConfig) -> bool:
    return config.wbits < FP and config.weight_quantizer == "gptq"


def hessian_bytes(shapes: Shapes, config: QuantConfig) -> int:
    """GPTQ Hessians while the layer is calibrated: float32 [K, K] per distinct input (q/k/v share the x1 one,
    gate/up the x2 one: quantize.collect_hessians clones them only after the forward)."""
    if not _gptq(config):
        return 0
    return sum(4 * k * k for k in {l.point: l.k for l in shapes.linears}.values())


def hessian_update_bytes(shapes: Shapes, config: QuantConfig) -> int:
    """GPTQ.add_batch's ``x.T @ x``: a float32 [K, K] temporary for the widest input."""
    return 4 * max(l.k for l in shapes.linears) ** 2 if _gptq(config) else 0


def gptq_step(shapes: Shapes, config: QuantConfig, j: int, dtype_bytes: int = 4) -> dict[str, int]:
    """What lives while GPTQ factors the Hessian of linear ``j`` (quantize_layer_weights takes the linears in
    order; the Cholesky step is GPTQ.quantize's largest moment):

    - layer: the FP weights of linears j.. (compute dtype; each is freed when its linear is replaced) and the
      packed ones before j (their checkpoint bytes), norms;
    - Hessians: the float32 [K, K] copies of linears after j (each solver has its own);
    - workspace: H, its Cholesky factor or inverse, the upper factor U and one more [K, K] temporary inside
      torch's factorizations, 4 · 4K² (measured: the peak rises 3 · 4K² over H; quant/gptq.py frees the factor
      before the second factorization), and the float32 copy of W, 4NK.
    """
    lins = shapes.linears
    fp = sum(l.n * l.k + l.n * l.bias for l in lins[j:]) * dtype_bytes
    norms = sum(c * (1 + b) for _, c, b in shapes.norms) * dtype_bytes
    packed = sum(lin.n * packed_row_bytes(lin.k, config.wbits) for lin in lins[:j])
    return {"one layer": fp + norms + packed,
            "GPTQ Hessians": sum(4 * l.k * l.k for l in lins[j + 1:]),
            "GPTQ workspace": 4 * 4 * lins[j].k ** 2 + 4 * lins[j].n * lins[j].k}


def forward_bytes(shapes: Shapes, batch: int, seqlen: int, dtype_bytes: int = 4) -> int:
    """Transient activations of one decoder layer on ``batch`` windows: eager attention scores and
    probabilities [B, heads, S, S] f32, q/k/v/attention output/residual [B, S, hidden] and the MLP's
    [B, S, intermediate] ×3 (gate, up, product; fc1 and its ReLU for OPT)."""
    b_s = batch * seqlen
    attn = 2 * 4 * batch * shapes.n_heads * seqlen * seqlen
    return attn + dtype_bytes * b_s * (6 * shapes.hidden + 3 * shapes.intermediate)


def observer_bytes(shapes: Shapes, config: QuantConfig, nsamples: int, seqlen: int) -> int:
    """Token rows the MSE clip search keeps per activation point (ChannelObserver), f32. quantize keeps them
    whenever --act-clip is mse, also for a weight-only config."""
    if config.act_clip != "mse":
        return 0
    rows = min(CLIP_SAMPLE_ROWS, nsamples * seqlen)
    hd = shapes.head_dim
    channels = (2 * shapes.hidden + shapes.intermediate + 2 * shapes.n_heads * hd + 2 * shapes.n_kv * hd)
    return 4 * rows * channels


def quantize_phases(shapes: Shapes, config: QuantConfig, nsamples: int, seqlen: int, batch: int = 1,
                    dtype_bytes: int = 4) -> dict[str, dict[str, int]]:
    """The memory of each phase of layer-streamed ``rptq quantize`` (CPU, compute dtype ``dtype_bytes``), by term.
    Every phase holds the runtime (:data:`RUNTIME_BYTES`) and the calibration windows' hidden states
    (``act`` = nsamples · seqlen · hidden · dtype_bytes; a forward over them holds its input and its output):

    - embed: the modules before layer 0 in the compute dtype, plus the fp16 tensor being read; the captured
      inputs (a list, then their concatenation);
    - calibrate: one FP layer, the forward's input and output, the Hessians (:func:`hessian_bytes`) and one
      ``x.T @ x`` (:func:`hessian_update_bytes`), the clip samples (:func:`observer_bytes`) and one forward's
      transients (:func:`forward_bytes`);
    - GPTQ: the largest :func:`gptq_step` over the layer's linears (for Llama-7B, q_proj and down_proj are within 1%);
    - write: the largest tensor outside the layers read (fp16), in the compute dtype and back in fp16 for
      the shard;
    - lm_head (``--head-bits 8``): the head read in the compute dtype, its packed twin, and the float
      temporaries of rtn_quantize over one block of HEAD_ROWS rows (about HEAD_TEMPORARIES bytes a weight).

    The shards are not in memory: export.ShardWriter spills each tensor to disk as it arrives.
    """
    act = nsamples * seqlen * shapes.hidden * dtype_bytes
    largest_outside = max(shapes.outside.values(), default=0)
    phases = {
        "embed": {"embeddings": dtype_bytes * shapes.embedding_numel + 2 * largest_outside,
                  "calibration activations": 2 * act},
        "calibrate": {"one layer": dtype_bytes * shapes.layer_params, "calibration activations": 2 * act,
                      "GPTQ Hessians": hessian_bytes(shapes, config) + hessian_update_bytes(shapes, config),
                      "clip samples": observer_bytes(shapes, config, nsamples, seqlen),
                      "forward": forward_bytes(shapes, batch, seqlen, dtype_bytes)},
        "write": {"embeddings, lm_head": (dtype_bytes + 4) * largest_outside, "calibration activations": act},
    }
    if config.head_bits < FP:  # nn/head.py quantize_head: the float head, its packed twin, one block's temporaries
        from .nn.head import HEAD_ROWS
        phases["lm_head"] = {"lm_head": dtype_bytes * shapes.vocab * shapes.head_in,
                             "packed lm_head": packed_head_bytes(shapes, config),
                             "quantize temporaries": HEAD_TEMPORARIES * HEAD_ROWS * shapes.head_in,
                             "calibration activations": act}
    if _gptq(config):
        steps = [gptq_step(shapes, config, j, dtype_bytes) for j in range(len(shapes.linears))]
        phases["GPTQ"] = {"calibration activations": act, **max(steps, key=lambda s: sum(s.values()))}
    for terms in phases.values():
        terms["runtime"] = RUNTIME_BYTES
    return phases


def quantize_peak(shapes: Shapes, config: QuantConfig, nsamples: int, seqlen: int, batch: int = 1,
                  dtype_bytes: int = 4) -> dict[str, int]:
    """Predicted peak memory of ``rptq quantize``: the terms of its largest phase (:func:`quantize_phases`,
    named by :func:`quantize_peak_phase`); their sum is the figure."""
    phases = quantize_phases(shapes, config, nsamples, seqlen, batch, dtype_bytes)
    return phases[quantize_peak_phase(phases)]


def quantize_peak_phase(phases: dict[str, dict[str, int]]) -> str:
    return max(phases, key=lambda name: sum(phases[name].values()))


def resident_bytes(shapes: Shapes, config: QuantConfig, groups: Groups | None = None, dtype_bytes: int = 4) -> int:
    """The loaded packed model's tensors (export.load_quantized): packed codes and fp16 scales as stored, zeros
    unpacked to uint8 [N, G], static act zeros as int32, permutations as int64, token embeddings and lm_head in
    float16 (nn/head.py), every other FP tensor (norms, biases, positions) in the compute dtype; a tied lm_head
    shares the embedding."""
    groups = groups or Groups.nominal(shapes, config)
    total = 0
    for lin in shapes.linears:
        act_g = getattr(groups, lin.point)
        if config.wbits < FP:
            g = weight_groups(lin.k, config.weight_groups, act_g)
            total += lin.n * packed_row_bytes(lin.k, config.wbits) + lin.n * g * (2 + 1) + g * 4
        else:
            total += lin.n * lin.k * dtype_bytes
        total += lin.n * dtype_bytes * lin.bias + _act_resident(config, lin.point, act_g)
    packed = config.quantizes_weights or config.quantizes_acts  # an FP model has no permutations
    total += sum(c * (dtype_bytes * (1 + b) + 8 * packed) for _, c, b in shapes.norms)
    total += sum(_act_resident(config, p, getattr(groups, p)) for p in ("q", "k", "v"))
    total += 8 * shapes.n_kv * shapes.head_dim * shapes.rope * packed
    outside = sum(shapes.outside.values())
    if packed:
        return (shapes.layers * total + dtype_bytes * (outside - shapes.half_numel) + 2 * shapes.half_numel
                + packed_head_delta(shapes, config, loaded=True))
    return shapes.layers * total + dtype_bytes * outside


def _act_resident(config: QuantConfig, point: str, groups: int) -> int:
    """ActQuant buffers: group_sizes i32 + (clip f32 | scale f32 + zero i32)."""
    if config.act_bits(point) >= FP:
        return 0
    return groups * (8 if config.per_token(point) else 12)


def run_peak(shapes: Shapes, config: QuantConfig, batch: int, seqlen: int, dtype_bytes: int = 4,
             cpu: bool = True) -> dict[str, int]:
    """Predicted peak memory of running the packed model on ``batch`` sequences of ``seqlen`` tokens: runtime +
    resident tensors (:func:`resident_bytes`) + the float32 copy of the scales the CPU kernels keep
    (QuantLinear.kernel_scales; none on a GPU) + the KV cache (packed when K/V are quantized, else in the
    compute dtype) + one layer's transients + the logits B · S · vocab f32 (evaluation scores every position)."""
    kv_bits = config.act_bits("k")
    if kv_bits < FP:
        token_groups = kv_token_groups(shapes, config)
        kv = kv_bytes(shapes, batch, seqlen, kv_bits, token_groups=token_groups)
        kv += 0 if any(token_groups) else kv_params_bytes(shapes)
    else:
        kv = kv_bytes(shapes, batch, seqlen) * dtype_bytes // 2
    scales = 0
    if cpu and config.wbits < FP:
        g = Groups.nominal(shapes, config)
        scales = shapes.layers * sum(4 * l.n * weight_groups(l.k, config.weight_groups, getattr(g, l.point))
                                     for l in shapes.linears)
    return {
        "runtime": RUNTIME_BYTES,
        "weights (resident)": resident_bytes(shapes, config, dtype_bytes=dtype_bytes),
        "f32 scales (CPU kernels)": scales,
        "KV cache": kv,
        "forward": forward_bytes(shapes, batch, seqlen, dtype_bytes),
        "logits": 4 * batch * seqlen * shapes.vocab,
    }


# ------------------------------------------------------------------------------------------ the table

PAPER_PRESETS = ("w4a16", "w4a8", "w4a4kv", "w4a3kv", "w3a3kv")  #: columns when no config is given


def memory_report(raw: dict, configs: dict[str, QuantConfig], batch: int, seqlen: int, nsamples: int,
                  source: str = "") -> dict:
    """Every figure of ``rptq memory`` in bytes: {"model": ..., "settings": ..., "columns": {label: {...}}}."""
    shapes = model_shapes(raw)
    columns = {"FP16": {"weights": fp16_bytes(shapes), "KV cache": kv_bytes(shapes, batch, seqlen),
                        "run peak": sum(run_peak(shapes, QuantConfig(), batch, seqlen, dtype_bytes=2,
                                                 cpu=False).values())}}
    columns["FP16"]["weights + KV cache"] = columns["FP16"]["weights"] + columns["FP16"]["KV cache"]
    for label, config in configs.items():
        ckpt = checkpoint_bytes(shapes, config)
        kv_bits = config.act_bits("k")
        token_groups = kv_token_groups(shapes, config)
        kv = kv_bytes(shapes, batch, seqlen, kv_bits, token_groups=token_groups)
        phases = quantize_phases(shapes, config, nsamples, seqlen)
        quant = phases[quantize_peak_phase(phases)]
        run = run_peak(shapes, config, batch, seqlen)
        columns[label] = {"weights": sum(ckpt.values()), "weights by kind": ckpt, "KV cache": kv,
                          "KV cache reserved": kv_bytes(shapes, batch, seqlen, kv_bits, reserved=True,
                                                        token_groups=token_groups),
                          "weights + KV cache": sum(ckpt.values()) + kv,
                          "quantize peak": sum(quant.values()), "quantize peak by term": quant,
                          "quantize peak phase": quantize_peak_phase(phases),
                          "quantize phases": {name: sum(t.values()) for name, t in phases.items()},
                          "run peak": sum(run.values()), "run peak by term": run}
    return {"model": source, "model_type": shapes.model_type,
            "shape": {"layers": shapes.layers, "hidden": shapes.hidden, "intermediate": shapes.intermediate,
                      "heads": shapes.n_heads, "kv_heads": shapes.n_kv, "head_dim": shapes.head_dim,
                      "vocab": shapes.vocab, "params": shapes.params},
            "settings": {"batch": batch, "seqlen": seqlen, "nsamples": nsamples},
            "configs": {label: c.to_dict() for label, c in configs.items()}, "columns": columns}


def _gib(n: int) -> str:
    """GiB; a figure under 0.01 GiB in MiB (M) or KiB (K), so that no non-zero figure reads 0.00."""
    if n >= GiB // 100 or n == 0:
        return f"{n / GiB:.2f}"
    return f"{n / 2**20:.2f}M" if n >= 2**20 // 100 else f"{n / 1024:.2f}K"


def format_report(report: dict) -> str:
    """The report as a fixed-width table, GiB (2^30 bytes); smaller ones in MiB (M) or KiB (K)."""
    s, cols = report["shape"], report["columns"]
    labels = list(cols)
    width = max(12, *(len(l) + 2 for l in labels))
    head = (f"{report['model']} ({report['model_type']}): {s['params'] / 1e9:.2f}B parameters, {s['layers']} layers, "
            f"hidden {s['hidden']}, ffn {s['intermediate']}, {s['heads']} heads / {s['kv_heads']} KV heads × "
            f"{s['head_dim']}, vocab {s['vocab']}")
    st = report["settings"]
    lines = [head, f"memory in GiB; KV cache and run at batch {st['batch']} × {st['seqlen']} tokens; quantize with "
                   f"{st['nsamples']} calibration windows of {st['seqlen']} tokens, layer by layer on the CPU (fp32)",
             "", f"{'':<30}" + "".join(f"{l:>{width}}" for l in labels)]

    def row(name, get, indent=0):
        cells = [get(cols[l]) for l in labels]
        if all(c is None for c in cells[1:]) and cells[0] is None:
            return
        lines.append(f"{' ' * indent + name:<30}" + "".join(
            f"{('-' if c is None else _gib(c)):>{width}}" for c in cells))

    row("weights", lambda c: c["weights"])
    for kind in KINDS:
        if any(c.get("weights by kind", {}).get(kind) for c in cols.values()):
            row(kind, lambda c, k=kind: c.get("weights by kind", {}).get(k), 2)
    row("KV cache", lambda c: c["KV cache"])
    row("weights + KV cache", lambda c: c["weights + KV cache"])
    row("peak of rptq quantize", lambda c: c.get("quantize peak"))
    for phase in dict.fromkeys(ph for c in cols.values() for ph in c.get("quantize phases", {})):
        row(f"phase {phase}", lambda c, ph=phase: c.get("quantize phases", {}).get(ph), 2)
    if any("quantize peak phase" in c for c in cols.values()):
        lines.append("  terms of the largest phase:")
    terms = dict.fromkeys(t for c in cols.values() for t in c.get("quantize peak by term", {}))
    for term in terms:
        row(term, lambda c, t=term: c.get("quantize peak by term", {}).get(t), 2)
    row("peak running (eval)", lambda c: c["run peak"])
    terms = next((c["run peak by term"] for c in cols.values() if "run peak by term" in c), {})
    for term in terms:
        row(term, lambda c, t=term: c.get("run peak by term", {}).get(t), 2)
    lines += ["", "FP16 run: on a GPU in fp16; quantized runs: on the CPU (fp32 compute, packed weights and cache). "
                  "Weights: the packed checkpoint's tensor bytes (safetensors header excluded); cluster counts are "
                  "the config's (KMeans may use fewer)."]
    return "\n".join(lines)
