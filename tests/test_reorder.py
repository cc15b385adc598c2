"""The reorder fold is exact: the folded FP32 model computes the same logits as the original."""
import pytest
import torch

from rptq_cli.calibrate import LayerRunner, collect_stats
from rptq_cli.config import QuantConfig
from rptq_cli.models import family_for
from rptq_cli.nn.attention import use_rptq_attention
from rptq_cli.nn.norm import ReorderNorm
from rptq_cli.outliers import inject_outliers
from rptq_cli.models.base import head_layout
from rptq_cli.reorder import fold_layer, plan_layer
from tiny import build_model

CLUSTERS = QuantConfig(clusters=dict(R1=5, R2=3, R3=3, R4=6, R5=7))
CASES = [
    ("opt", dict(hidden=64, heads=4)),
    ("opt", dict(hidden=96, heads=6, ffn=200)),
    ("opt", dict(hidden=48, heads=2, ffn=96, layers=3)),
    ("llama", dict(hidden=64, heads=8, kv_heads=2)),
    ("llama", dict(hidden=64, heads=4, kv_heads=4)),
    ("llama", dict(hidden=64, heads=8, kv_heads=2, bias=True)),
    ("llama", dict(hidden=64, heads=4, kv_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0})),
    ("llama", dict(hidden=64, heads=4, kv_heads=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    ("qwen2", dict(hidden=64, heads=4, kv_heads=2)),
    ("mistral", dict(hidden=64, heads=4, kv_heads=1)),
]


def fold_model(model, tokens, config=CLUSTERS):
    family = family_for(model.config)
    stats = collect_stats(LayerRunner(model, family, tokens, "cpu"), progress=False)
    heads = head_layout(family, model.config)
    plans = []
    for layer, layer_stats in zip(family.decoder_layers(model), stats):
        plans.append(plan_layer(layer_stats, heads, config))
        fold_layer(layer, family, heads, plans[-1])
    return plans


@pytest.mark.parametrize("family,cfg", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_fold_preserves_logits(family, cfg):
    model = build_model(family, **cfg)
    inject_outliers(model, family_for(model.config), channels=3)
    use_rptq_attention(model)
    tokens = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits
    plans = fold_model(model, tokens)
    with torch.no_grad():
        folded = model(tokens).logits
    rel = (folded - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-5, rel
    # the fold really moved channels (an identity permutation would pass trivially)
    assert any(not torch.equal(p["R1"].perm, torch.arange(p["R1"].perm.numel())) for p in plans)
    assert any(not torch.equal(p["R2"].perm, torch.arange(p["R2"].perm.numel())) for p in plans)
    assert isinstance(family_for(model.config).decoder_layers(model)[0].get_submodule(
        family_for(model.config).attn_norm), ReorderNorm)


def test_fold_preserves_generation():
    """Decoding with a KV cache through the folded model gives the same tokens (R2 gather on cached keys)."""
    model = build_model("llama", hidden=64, heads=8, kv_heads=2)
    use_rptq_attention(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    fold_model(model, torch.randint(0, model.config.vocab_size, (2, 16)))
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_r2_r3_stay_inside_heads():
    model = build_model("llama", hidden=64, heads=8, kv_heads=2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    plans = fold_model(model, tokens)
    head_dim = 8
    for plan in plans:
        for perm in (plan["R2"].perm, plan["R3"].perm):
            heads_of = perm.view(2, head_dim) // head_dim
            assert torch.equal(heads_of, torch.arange(2)[:, None].expand(2, head_dim))
        assert sum(plan["R2"].groups_per_head) == plan["R2"].cluster_sizes.numel()


def test_outlier_injection_preserves_function_and_widens_ranges():
    model = build_model("opt")
    family = family_for(model.config)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
    stats_before = collect_stats(LayerRunner(model, family, tokens, "cpu"), progress=False)
    inject_outliers(model, family, channels=2, low=40, high=50)
    with torch.no_grad():
        after = model(tokens).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-5
    stats_after = collect_stats(LayerRunner(model, family, tokens, "cpu"), progress=False)
    width = lambda s: (s["x1"][1] - s["x1"][0])
    ratio = width(stats_after[0]).max() / width(stats_after[0]).median()
    assert ratio > 3 * width(stats_before[0]).max() / width(stats_before[0]).median()
