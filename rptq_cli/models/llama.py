"""Llama, Mistral and Qwen2: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention (Qwen2: bias on q/k/v).

The three share one layer layout, so one declaration serves them. R2 is taken after RoPE (see
``rptq_cli/nn/attention.py``); R5 permutes gate_proj and up_proj rows together.
"""
from .base import Family, register

LLAMA = register(Family(
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
))
