"""The attention path at decode: the lean RoPE forward, SDPA for unquantized softmax, and the tensors derived once
from the quantizers' buffers, each against what it replaced."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from rptq_cli.config import QuantConfig
from rptq_cli.export import load_quantized
from rptq_cli.nn import attention
from rptq_cli.nn.attention import AttentionQuant, SignedSin, _LeanRopeAttention, attend, rotate
from rptq_cli.nn.kv_cache import PackedKVCache
from rptq_cli.nn.quantizers import ActQuant

from quantized import SMALL, corpus_ids, quantized_checkpoint
from tiny import tiny_config


def test_rotate_is_transformers_rope():
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = LlamaRotaryEmbedding(tiny_config("llama", hidden=64, heads=4))(q, torch.arange(5).expand(2, 5))
    signed_sin = SignedSin()
    sin_signed = signed_sin(sin)
    assert signed_sin(sin) is sin_signed and signed_sin(sin.clone()) is not sin_signed  # once per step
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rotate(q, cos[:, None], sin_signed[:, None]), want_q)  # bit for bit
    assert torch.equal(rotate(k, cos[:, None], sin_signed[:, None]), want_k)


def transformers_forward(model):
    """``model`` with its attention modules back on transformers' own forward."""
    for m in model.modules():
        if isinstance(m, _LeanRopeAttention):
            m.__class__ = type(m).__mro__[2]
    return model


@pytest.mark.parametrize("family, config", [
    ("llama", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL)),  # packed KV cache, R2 gather
    ("qwen2", QuantConfig(wbits=4, abits=16, clusters=SMALL)),  # float path, q/k/v bias
])
def test_lean_rope_attention_computes_transformers_forward(tmp_path, family, config):
    path = quantized_checkpoint(tmp_path / "ckpt", family, config)
    lean, tok = load_quantized(path)
    assert all(isinstance(m.self_attn, _LeanRopeAttention) for m in lean.model.layers)
    reference = transformers_forward(load_quantized(path)[0])
    ids = corpus_ids(tok)[:, :24]
    with torch.no_grad():
        for model in (lean, reference):  # prefill 16 tokens, then decode 8 one at a time
            cache = PackedKVCache.from_model(model, max_length=24)
            out = model(ids[:, :16], past_key_values=cache, use_cache=True)
            logits = [out.logits] + [model(ids[:, t:t + 1], past_key_values=out.past_key_values,
                                           use_cache=True).logits for t in range(16, 24)]
            model.logits = torch.cat(logits, dim=1)
    assert torch.equal(lean.logits, reference.logits)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_attends_like_the_repeated_heads(with_mask, fused):
    q, k, v = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.zeros(1, 1, 3, 9)  # longer than the keys: cut to them
    mask[..., 5:7] = torch.finfo(torch.float32).min
    mask = mask if with_mask else None
    scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3
    scores = scores if mask is None else scores + mask[..., :7]
    want = torch.softmax(scores, -1) @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(attend(q, k, v, mask, 0.3, fused=fused), want, rtol=0, atol=1e-5)


def test_r2_gather_indexes_follow_the_permutation_buffer():
    perm = torch.stack([torch.randperm(8) for _ in range(2)])
    spec = AttentionQuant(qk_perm=perm.clone())
    q = torch.randn(1, 4, 1, 8)
    assert torch.equal(spec.permute_q(q), q.gather(-1, perm.repeat_interleave(2, 0)[None, :, None, :].expand_as(q)))
    spec.qk_perm.copy_(perm.flip(-1))  # written in place, as load_state_dict does
    assert torch.equal(spec.permute_q(q), q.gather(-1, perm.flip(-1).repeat_interleave(2, 0)[None, :, None, :]
                                                   .expand_as(q)))
    spec.qk_perm = perm  # replaced, as .to() does
    k = torch.randn(1, 2, 3, 8)
    assert torch.equal(spec.permute_k(k), k.gather(-1, perm[None, :, None, :].expand_as(k)))


def test_head_groups_are_built_once_and_rebuilt_when_the_clip_changes():
    quant = ActQuant.per_token(torch.tensor([3, 5, 8], dtype=torch.int32), 4, clip=torch.tensor([0.9, 0.8, 0.7]))
    sizes, clips = quant.head_groups(2, 8)
    assert quant.head_groups(2, 8)[0] is sizes  # cached: the float path asks on every forward
    assert sizes.tolist() == [[3, 5], [8, 0]]
    quant.clip.fill_(0.5)
    assert quant.head_groups(2, 8)[1].tolist() == [[0.5, 0.5], [0.5, 1.0]]


def test_sdpa_only_without_activation_quantizers(monkeypatch):
    """A quantizer downstream would turn SDPA's different rounding into different codes."""
    seen = []
    monkeypatch.setattr(attention, "attend", lambda *args: seen.append(args[-1]) or args[0])
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    quant = ActQuant.from_range(-torch.ones(2), torch.ones(2), torch.tensor([8, 8], dtype=torch.int32), 4)
    calibrating = AttentionQuant()
    calibrating.observer = lambda name, x: None
    for spec in (None, AttentionQuant(), AttentionQuant(k=quant, v=quant), calibrating):
        module = torch.nn.Module()
        module.rptq = spec
        attention.rptq_attention(module, q, k, k, None, 0.3)
    assert seen == [False, True, False, False]


def test_unquantized_q_and_k_skip_the_r2_gather():
    """q·kᵀ sums over the channels: permuting both changes nothing, so without a quantizer or observer of q or k
    the gather is skipped."""
    assert not AttentionQuant(qk_perm=torch.arange(8).expand(2, 8)).needs_r2_order
    assert AttentionQuant(qk_perm=torch.arange(8).expand(2, 8),
                          k=ActQuant.per_token(torch.tensor([8, 8], dtype=torch.int32), 4)).needs_r2_order
    observed = AttentionQuant(qk_perm=torch.arange(8).expand(2, 8))
    observed.observer = lambda name, x: None
    assert observed.needs_r2_order
