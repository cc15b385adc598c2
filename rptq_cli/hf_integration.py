"""``AutoModelForCausalLM.from_pretrained(ckpt)`` for rptq checkpoints: the ``rptq`` quantization method.

    import rptq_cli                      # registers "rptq" with transformers (lazily: see hf_hook.py)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/")          # packed, on rptq's kernels
    cache = rptq_cli.PackedKVCache.from_model(model, max_length=prompt_tokens + new_tokens)
    model.generate(**inputs, max_new_tokens=new_tokens, past_key_values=cache)

``cache`` holds K/V as packed codes where the checkpoint quantizes them, else as float values in preallocated
buffers (transformers' DynamicCache would copy the whole cache on every token). Without ``past_key_values``
generate also runs, on transformers' FP cache (the simulated-quantization path: same tokens, more memory).
``dtype`` follows transformers: "auto" (the default) is the checkpoint's float16; pass ``dtype=torch.float32``
on a CPU, as ``rptq eval`` does. ``device_map`` places the model on one device
("cpu", "cuda", "cuda:1", {"": 0}, or "auto": the first GPU if any).

How: transformers builds the model skeleton on the meta device and calls the quantizer around its weight
loading. The rptq quantizer loads the checkpoint with :func:`rptq_cli.export.load_quantized` (the one
validated loader: format version, file hashes, value ranges), hides the skeleton's tensors from
transformers' own loader (which then reads, initializes and reports nothing), and afterwards puts the packed
modules in place of the skeleton's. The model returned is therefore module for module the one
``load_quantized`` builds, and its logits are equal.

Without ``import rptq_cli`` plain transformers must not load an rptq checkpoint as an FP model with random
weights where the packed ones are: config.json's ``transformers_weights`` (see hf_hook.NEEDS_IMPORT) makes it
stop with a ValueError that says to import rptq_cli.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .hf_hook import NEEDS_IMPORT
from .strict import QUANT_METHOD

# rptq's modules and transformers' importers must not meet at import time: this module is imported while
# transformers.modeling_utils is still loading (hf_hook.py), so everything of rptq that needs a model class
# (export, nn) is imported inside the methods below.


class RptqConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of an rptq checkpoint, kept as written (QuantConfig fields)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self.quant_method = QUANT_METHOD


class RptqHfQuantizer(HfQuantizer):
    """Loads a pre-quantized rptq checkpoint; rptq quantizes through its own CLI, not through transformers."""

    requires_calibration = True  # pre-quantized checkpoints only

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.directory = self.dtype = self.device = None

    def update_attn_implementation(self, config):
        # runs before transformers resolves the weight files: lift the guard that stops plain transformers
        if getattr(config, "transformers_weights", None) == NEEDS_IMPORT:
            config.transformers_weights = None
        return config

    def preprocess_model(self, model, dtype=None, device_map=None, checkpoint_files=None, **kwargs):
        super().preprocess_model(model, dtype=dtype, **kwargs)
        if not checkpoint_files:
            raise ValueError("rptq: from_pretrained found no weight files for this checkpoint")
        self.directory, self.dtype = Path(checkpoint_files[0]).parent, dtype or torch.float32
        self.device = _single_device(device_map)
        # an instance attribute shadows the method: transformers' loader sees no tensor to fill, so it reads,
        # initializes and reports nothing; the packed modules replace the skeleton's after it (below)
        model.state_dict = _no_tensors
        model._keys_to_ignore_on_load_unexpected = {""}  # every checkpoint key is rptq's, loaded below

    def _process_model_after_weight_loading(self, model, **kwargs):
        # here, not in preprocess_model: that one runs inside transformers' meta-device, default-dtype context
        from .export import load_quantized
        from .nn.attention import use_rptq_attention
        del model.state_dict
        packed, _ = load_quantized(self.directory, dtype=self.dtype)
        if type(packed) is not type(model):
            raise ValueError(f"rptq checkpoints load as {type(packed).__name__} (AutoModelForCausalLM), not as "
                             f"{type(model).__name__}")
        for name, child in packed.named_children():
            model._modules[name] = child
        packed.config.quantization_config = model.config.quantization_config
        model.config = packed.config  # the packed modules read this one (attention implementation "rptq")
        model.rptq_config = packed.rptq_config
        use_rptq_attention(model)
        if self.device is not None:
            model.to(self.device)
        return model

    def is_serializable(self, safe_serialization=None):
        return False  # the checkpoint directory is the serialized form; copy it

    @property
    def is_trainable(self):
        return False


def _no_tensors(*args, **kwargs):
    return {}


def _single_device(device_map) -> torch.device | None:
    """One device from a from_pretrained device_map; maps spanning devices are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("rptq checkpoints load on one device: pass device_map='cpu', 'cuda', 'cuda:N' or "
                             "{'': N}, not a map spanning devices")
        device_map = devices.pop()
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def register() -> None:
    """Register the ``rptq`` method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(RptqConfig)
        register_quantizer(QUANT_METHOD)(RptqHfQuantizer)


register()
