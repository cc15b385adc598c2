"""Tiny random models and a tokenizer built offline from the text the tests carry."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def corpus_text() -> str:
    return CORPUS.read_text()


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the carried corpus; ``</s>`` is bos/eos/pad and is prepended like OPT."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text()], trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="</s>")


def tiny_config(family: str = "opt", *, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
                layers: int = 2, ffn: int = 160, vocab: int = 384, bias: bool = False, **extra):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "opt":
        return OPTConfig(ffn_dim=ffn, word_embed_proj_dim=hidden, do_layer_norm_before=True, dropout=0.0,
                         **common, **extra)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(intermediate_size=ffn, num_key_value_heads=kv_heads or heads, tie_word_embeddings=True, **common)
    if family == "llama":
        kw["attention_bias"] = bias
    return cls(**kw, **extra)


def build_model(family: str = "opt", seed: int = 0, **cfg):
    """A random model in float32 whose norms are not the identity (so a wrong permutation shows)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **cfg), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.normal_(0, 0.05)
            p.copy_(p.half().float())  # fp16-exact, like weights loaded from a real fp16 checkpoint
    return model.eval()


def save_tiny(path: Path, family: str = "opt", **cfg) -> Path:
    tok = build_tokenizer()
    model = build_model(family, vocab=len(tok), **cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
