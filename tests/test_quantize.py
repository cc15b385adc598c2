"""The layer-by-layer RPTQ pipeline in simulation: what it installs, and that the reorder pays off."""
import warnings

import pytest
import torch

from rptq_cli.calibrate import LayerRunner, collect_stats
from rptq_cli.config import QuantConfig
from rptq_cli.errors import RptqError
from rptq_cli.models import family_for
from rptq_cli.nn.attention import use_rptq_attention
from rptq_cli.nn.linear import QuantLinear
from rptq_cli.outliers import inject_outliers
from rptq_cli.quantize import quantize_model
from tiny import build_model

SMALL = dict(R1=8, R2=2, R3=2, R4=8, R5=8)


def calib_tokens(model, n=8, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def quantized(family="opt", config=None, outliers=True, seed=0, **cfg):
    model = build_model(family, seed=seed, **cfg)
    fam = family_for(model.config)
    if outliers:
        inject_outliers(model, fam, channels=3)
    quantize_model(model, fam, calib_tokens(model), config, progress=False)
    return model


def logits_error(model, reference, tokens):
    with torch.no_grad():
        return ((model(tokens).logits - reference).pow(2).mean() / reference.pow(2).mean()).item()


@pytest.mark.parametrize("mode,expect", [
    ("paper", {"x1": 8, "q": 4, "k": 4, "v": 4, "p": 8, "o_in": 4, "x2": 8, "down_in": 4}),
    ("strict", {"x1": 4, "q": 4, "k": 4, "v": 4, "p": 4, "o_in": 4, "x2": 4, "down_in": 4}),
])
def test_installs_the_quantizers_of_each_mode(mode, expect):
    config = QuantConfig(wbits=4, abits=4, mode=mode, clusters=SMALL, weight_quantizer="rtn")
    assert {p: config.act_bits(p) for p in expect} == expect
    model = quantized(config=config)
    layer = model.model.decoder.layers[0]
    attn = layer.self_attn
    assert layer.self_attn.q_proj.act.bits == expect["x1"] and layer.fc1.act.bits == expect["x2"]
    assert attn.out_proj.act.bits == expect["o_in"] and layer.fc2.act.bits == expect["down_in"]
    assert (attn.rptq.q.bits, attn.rptq.k.bits, attn.rptq.v.bits, attn.rptq.p_bits) == \
           (expect["q"], expect["k"], expect["v"], expect["p"])
    assert all(m.bits == 4 for m in model.modules() if isinstance(m, QuantLinear))


def test_kv_only_quantizes_only_k_and_v():
    model = quantized(config=QuantConfig(wbits=4, abits=3, kv_only=True, clusters=SMALL, weight_quantizer="rtn"))
    layer = model.model.decoder.layers[1]
    assert layer.self_attn.rptq.k.bits == 3 and layer.self_attn.rptq.v.bits == 3
    assert layer.self_attn.rptq.q is None and layer.self_attn.rptq.p_bits == 16
    assert all(m.act is None for m in layer.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("mode", ["paper", "token"])
def test_weight_groups_follow_input_clusters(mode):
    model = quantized(config=QuantConfig(wbits=4, abits=8, clusters=SMALL, weight_quantizer="rtn", mode=mode))
    layer = model.model.decoder.layers[0]
    for linear in (layer.self_attn.q_proj, layer.fc1, layer.fc2, layer.self_attn.out_proj):
        assert torch.equal(linear.group_sizes, linear.act.group_sizes)
        # static ranges run the fused integer kernel; per-token grids quantize the input, then linear_a16
        assert linear.fused == (mode == "paper") and linear.act.dynamic == (mode == "token")
    assert layer.self_attn.q_proj.group_sizes.numel() == 8


def test_cluster_multiple_gives_every_linear_whole_runs_of_16():
    model = quantized("llama", QuantConfig(wbits=4, abits=4, kv_only=True, clusters=SMALL, weight_quantizer="rtn",
                                           cluster_multiple=16), kv_heads=2)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        assert (linear.group_sizes % 16 == 0).all() and linear.group_sizes.numel() > 1, linear.group_sizes
    assert (layer.self_attn.rptq.k.group_sizes % 16 == 0).all()


def test_no_reorder_is_per_tensor():
    model = quantized(config=QuantConfig(wbits=4, abits=4, reorder=False, weight_quantizer="rtn"))
    layer = model.model.decoder.layers[0]
    assert layer.self_attn.q_proj.act.group_sizes.tolist() == [64]
    assert layer.self_attn.rptq.k.group_sizes.tolist() == [64]


@pytest.mark.parametrize("family,cfg,abits", [("opt", {}, 8), ("opt", {}, 4), ("llama", {"kv_heads": 2}, 4)])
def test_rptq_beats_per_tensor_with_outlier_channels(family, cfg, abits):
    base = build_model(family, seed=3, **cfg)
    inject_outliers(base, family_for(base.config), channels=3)
    use_rptq_attention(base)
    tokens = calib_tokens(base, n=4, seed=9)
    with torch.no_grad():
        reference = base(tokens).logits
    errors = {}
    for reorder in (True, False):
        config = QuantConfig(wbits=16, abits=abits, reorder=reorder, clusters=SMALL, mode="paper")
        errors[reorder] = logits_error(quantized(family, config, seed=3, **cfg), reference, tokens)
    assert errors[True] < 0.5 * errors[False], errors
    # per-token grids on top of the reorder beat the official static ranges
    token = QuantConfig(wbits=16, abits=abits, clusters=SMALL, mode="token")
    assert logits_error(quantized(family, token, seed=3, **cfg), reference, tokens) < errors[True]


def test_gptq_beats_rtn():
    base = build_model("opt", seed=4)
    use_rptq_attention(base)
    tokens = calib_tokens(base, n=4, seed=5)
    with torch.no_grad():
        reference = base(tokens).logits
    err = {q: logits_error(quantized("opt", QuantConfig(wbits=3, abits=16, clusters=SMALL, weight_quantizer=q),
                                     outliers=False, seed=4), reference, tokens) for q in ("gptq", "rtn")}
    assert err["gptq"] < err["rtn"], err


def test_same_inputs_same_model():
    config = QuantConfig(wbits=4, abits=4, clusters=SMALL)
    a, b = quantized(config=config).state_dict(), quantized(config=config).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cluster_counts_are_clamped_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quantized(config=QuantConfig(wbits=16, abits=8, clusters=dict(R2=64), weight_quantizer="rtn"))
    # tiny OPT: 64 channels over 4 heads, so R2 asks 64 clusters of 16 channels per head
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "clusters asked" in
            str(w.message)] == ["64 clusters asked for 16 channels per head; using 16"] * 2  # one per layer
    k = model.model.decoder.layers[0].self_attn.rptq.k
    assert k.group_sizes.numel() <= 64 and int(k.group_sizes.min()) >= 1


def test_nan_in_calibration_is_a_user_error():
    model = build_model("opt")
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    fam = family_for(model.config)
    with pytest.raises(RptqError, match="NaN"):
        collect_stats(LayerRunner(model, fam, calib_tokens(model, n=2), "cpu"), progress=False)
