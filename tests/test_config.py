import pytest

from rptq_cli.config import QuantConfig, build_config, parse_clusters, preset_names
from rptq_cli.errors import RptqError
from rptq_cli.points import ACT_POINT_NAMES as ACT_POINTS

# DESIGN §2: bits of (x1, q, k, v, p, o_in, x2, down_in) per preset; token mode (the default) keeps the
# softmax output in floating point, paper mode puts it at 8 bits
TABLE = {
    "w4a16": (16, 16, 16, 16, 16, 16, 16, 16),
    "w4a8": (8, 8, 8, 8, 16, 8, 8, 8),
    "w4a4": (8, 4, 4, 4, 16, 4, 8, 4),
    "w4a4-fine": (8, 4, 4, 4, 16, 4, 8, 4),
    "w4a8-paper": (8, 8, 8, 8, 8, 8, 8, 8),
    "w4a4-paper": (8, 4, 4, 4, 8, 4, 8, 4),
    "w4a4-strict": (4, 4, 4, 4, 4, 4, 4, 4),
    "w4a8-strict": (8, 8, 8, 8, 8, 8, 8, 8),
    "w4a4kv": (16, 16, 4, 4, 16, 16, 16, 16),
    "w4a4kv-token": (16, 16, 4, 4, 16, 16, 16, 16),
    "w4a3kv": (16, 16, 3, 3, 16, 16, 16, 16),
    "w3a3kv": (16, 16, 3, 3, 16, 16, 16, 16),
}


@pytest.mark.parametrize("preset", sorted(TABLE))
def test_presets_follow_the_design_table(preset):
    config = build_config(preset)
    assert tuple(config.act_bits(p) for p in ACT_POINTS) == TABLE[preset]
    assert config.wbits == (3 if preset.startswith("w3") else 4)


def test_every_preset_is_in_the_table():
    assert set(preset_names()) == set(TABLE)


def test_flags_override_presets():
    config = build_config("w4a4kv", wbits=3, clusters={"R1": 16})
    assert config.wbits == 3 and config.kv_only and config.clusters["R1"] == 16 and config.clusters["R2"] == 4
    assert config.label == "W3A4KV"
    assert build_config("w4a4", mode="strict").label == "W4A4-strict"
    assert build_config("w4a16", head_bits=8).label == "W4A16-head8"
    fine = build_config("w4a4-fine", clusters={"R1": 16})  # --clusters changes only the points it names
    assert fine.clusters == {"R1": 16, "R2": 16, "R3": 16, "R4": 32, "R5": 128} and fine.mode == "token"


def test_kv_grid_puts_only_k_and_v_on_per_token_grids():
    static, token = build_config("w4a4kv"), build_config("w4a4kv-token")
    assert static.kv_grid == "static" and token.kv_grid == "token" and token.label == "W4A4KV-kvtoken"
    assert [p for p in ACT_POINTS if token.per_token(p)] == ["k", "v"]
    assert not any(static.per_token(p) for p in ACT_POINTS)
    paper = build_config("w4a4-paper", kv_grid="token")  # static activations, per-token KV
    assert [p for p in ACT_POINTS if paper.per_token(p)] == ["k", "v"]
    with pytest.raises(RptqError, match="--kv-grid"):
        QuantConfig(wbits=4, abits=4, kv_grid="dynamic")


def test_round_trip_through_dict():
    config = QuantConfig(wbits=3, abits=4, weight_groups="128", reorder=False)
    assert config.weight_groups == 128
    assert QuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs,match", [
    (dict(wbits=5), "--wbits 5"), (dict(abits=2), "--abits 2"), (dict(mode="loose"), "--mode"),
    (dict(weight_groups="g128"), "--weight-groups"), (dict(weight_quantizer="awq"), "--weight-quantizer"),
    (dict(clusters={"R7": 2}), "R7"), (dict(clusters={"R1": 0}), "R1=0"), (dict(act_clip="p99"), "--act-clip"),
    (dict(cluster_multiple=0), "--cluster-multiple 0"), (dict(cluster_multiple=128), "--cluster-multiple 128"),
    (dict(head_bits=4), "--head-bits 4"),
])
def test_invalid_settings(kwargs, match):
    with pytest.raises(RptqError, match=match):
        QuantConfig(**kwargs)


def test_parse_clusters():
    assert parse_clusters("R1=32, r2=4") == {"R1": 32, "R2": 4}
    with pytest.raises(RptqError, match="R1=x"):
        parse_clusters("R1=x")
    with pytest.raises(RptqError, match="w9"):
        build_config("w9")


def test_token_mode_keeps_paper_bits_and_makes_linear_inputs_per_token():
    paper, token = build_config("w4a4", mode="paper"), build_config("w4a4")
    assert [token.act_bits(p) for p in ACT_POINTS if p != "p"] == [paper.act_bits(p) for p in ACT_POINTS if p != "p"]
    assert token.act_bits("p") == 16 and paper.act_bits("p") == 8
    assert [p for p in ACT_POINTS if token.per_token(p)] == ["x1", "q", "o_in", "x2", "down_in"]
    assert not any(paper.per_token(p) for p in ACT_POINTS)
    assert token.label == "W4A4-token" and paper.label == "W4A4"
    assert not any(build_config("w4a4kv", mode="token").per_token(p) for p in ACT_POINTS)  # only K, V: static
