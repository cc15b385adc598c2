"""points.py against the real modules of every family: each role exists and has the channels the description says."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rptq_cli.config import DEFAULT_CLUSTERS, TOKEN_POINTS
from rptq_cli.models import family_for
from rptq_cli.points import ACT_POINTS, POINTS, REORDER_POINTS, STAT_POINTS
from tiny import tiny_config


@pytest.mark.parametrize("name", ["opt", "llama", "mistral", "qwen2"])
def test_every_point_has_the_channels_of_its_modules(name):
    config = tiny_config(name, hidden=64, heads=4, kv_heads=None if name == "opt" else 2, ffn=96)
    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = family.decoder_layers(model)[0]
    widths = family.point_channels(config)
    assert widths == {"x1": 64, "q": 64, "k": 64 if name == "opt" else 32, "v": 64 if name == "opt" else 32,
                      "o_in": 64, "x2": 64, "down_in": 96}
    for p in ACT_POINTS:
        if not p.observed:
            continue
        for path in family.paths(*p.consumers):
            assert layer.get_submodule(path).in_features == widths[p.name], (p.name, path)
        for path in family.paths(*p.producers):
            assert layer.get_submodule(path).out_features == widths[p.name], (p.name, path)
        if p.norm is not None:
            assert layer.get_submodule(getattr(family, p.norm)).weight.numel() == widths[p.name]
    # the checkpoint stores no non-persistent buffer: the family rebuilds every module holding one on load
    computed = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    assert all(any(n.startswith(path + ".") for path in family.computed_modules) for n in computed), computed
    assert all(any(n.startswith(path + ".") for n in computed) for path in family.computed_modules)
    assert sorted(path for path, _ in family.linear_inputs()) == sorted(
        name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear))  # every linear, once


def test_tables_agree():
    assert STAT_POINTS == ("x1", "q", "k", "v", "o_in", "x2", "down_in")
    assert TOKEN_POINTS == ("x1", "q", "o_in", "x2", "down_in")
    assert DEFAULT_CLUSTERS == {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}
    for r in REORDER_POINTS:  # the points a reorder point clusters together are the ones it orders
        assert {p.name for p in ACT_POINTS if p.reorder == r.name} == set(r.features)
        assert all(POINTS[f].width in (("query", "kv") if r.per_head else ("hidden", "ffn")) for f in r.features)
