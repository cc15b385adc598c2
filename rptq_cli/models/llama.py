"""Llama, Mistral and Qwen2: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention (Qwen2: bias on q/k/v).

The three share one layer layout, so one declaration serves them. R2 is taken after RoPE (see
``rptq_cli/nn/attention.py``); R5 permutes gate_proj and up_proj rows together. RoPE's ``inv_freq`` is
computed from the config, not stored, so ``model.rotary_emb`` is rebuilt when a checkpoint loads. Mistral
(every layer) and Qwen2 (the layers its ``layer_types`` marks) attend only to the last ``sliding_window`` keys.
"""
from .base import Family, register


class LlamaFamily(Family):
    def sliding_window(self, config, layer_index: int) -> int | None:
        window = getattr(config, "sliding_window", None)  # Llama has none; Qwen2 sets it None unless used
        layer_types = getattr(config, "layer_types", None)  # Qwen2: full attention below max_window_layers
        if layer_types is not None and layer_types[layer_index] != "sliding_attention":
            return None
        return window


LLAMA = register(LlamaFamily(
    model_types=("llama", "mistral", "qwen2"),
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    norm_kind="rms",
    rope=True,
    ffn_size="intermediate_size",
    computed_modules=("model.rotary_emb",),
))
