"""`rptq inspect`: the channel-range figure and its summary, on tiny models, offline."""
import json

import pytest
import torch

from rptq_cli.stats_file import StatsFile
from rptq_cli.reorder import plan_layer
from rptq_cli.config import build_config
from rptq_cli.models.base import HeadLayout
from cli_run import assert_user_error, run

CALIB = ["--nsamples", "4", "--seqlen", "32", "--seed", "0"]

pytest.importorskip("matplotlib")


def test_inspect_model_writes_png_and_json(tiny_opt_dir, corpus_file, tmp_path):
    png, out = tmp_path / "r1.png", tmp_path / "r1.json"
    result = run("inspect", tiny_opt_dir, "--layer", 1, "--calib-path", corpus_file, *CALIB, "--clusters", 8,
                 "-o", png, "--json", out)
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    data = json.loads(out.read_text())
    assert data["layer"] == 1 and data["point"] == "R1" and data["channels"] == 64 and data["heads"] == 1
    sizes = [c["size"] for c in data["clusters"]]
    assert sum(sizes) == 64 and 1 < len(sizes) <= 8 and data["n_clusters"] == len(sizes)
    assert sorted(data["perm"]) == list(range(64))
    lo, hi = torch.tensor(data["min"]), torch.tensor(data["max"])
    assert bool((lo <= hi).all())
    assert data["per_tensor_range"] == [pytest.approx(float(lo.min())), pytest.approx(float(hi.max()))]
    width = hi - lo
    assert data["range_ratio_max_median"] == pytest.approx(float(width.max() / width.median()), rel=1e-5)
    # each cluster's grid is narrower than the tensor's, so it wastes less of it
    assert 0 <= data["waste"]["clustered"] < data["waste"]["per_tensor"] < 1
    assert 0 <= data["lost_bits"]["clustered"] < data["lost_bits"]["per_tensor"]
    for c in data["clusters"]:
        assert data["per_tensor_range"][0] <= c["min"] <= c["max"] <= data["per_tensor_range"][1]
        assert c["waste"] <= c["per_tensor_waste"] + 1e-6
    assert data["calibration"]["nsamples"] == 4
    assert "range ratio max/median" in result.output and "cluster sizes" in result.output


def test_inspect_stats_file_matches_quantize_clustering(stats_file, tmp_path):
    """The clusters drawn are those `rptq quantize` would make from the same stats and seed."""
    out = tmp_path / "r2.json"
    result = run("inspect", stats_file, "--layer", 0, "--point", "R2", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["tensor"] == "k" and data["heads"] == 4 and data["seed"] == 0
    stats = StatsFile.load(stats_file)
    plan = plan_layer(stats.layers[0], HeadLayout(4, 4, 16), build_config(), seed=0)
    assert data["perm"] == plan["R2"].perm.tolist()
    assert [c["size"] for c in data["clusters"]] == plan["R2"].cluster_sizes.tolist()


def test_inspect_png_from_stats_r5(stats_file, tmp_path):
    png = tmp_path / "r5.png"
    result = run("inspect", stats_file, "--layer", 1, "--point", "R5", "-o", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(b"\x89PNG")
    # an existing figure is replaced only with --force, and then only one rptq inspect wrote
    assert_user_error(run("inspect", stats_file, "--layer", 1, "-o", png), "exists")
    assert run("inspect", stats_file, "--layer", 1, "-o", png, "--force").exit_code == 0
    other = tmp_path / "mine.png"
    other.write_bytes(b"\x89PNG not ours")
    assert_user_error(run("inspect", stats_file, "--layer", 1, "-o", other, "--force"), "not a")


@pytest.mark.parametrize("layer", [2, -1])
def test_inspect_bad_layer(stats_file, tiny_opt_dir, tmp_path, layer):
    png = tmp_path / "x.png"
    assert_user_error(run("inspect", stats_file, "--layer", layer, "-o", png), "--layer", "0..1")
    assert_user_error(run("inspect", tiny_opt_dir, "--layer", layer, "-o", png), "--layer", "0..1")
    assert not png.exists()


def test_inspect_needs_an_output(stats_file):
    assert_user_error(run("inspect", stats_file, "--layer", 0), "-o")


def test_inspect_without_matplotlib(stats_file, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert_user_error(run("inspect", stats_file, "--layer", 0, "-o", tmp_path / "x.png"), "pip install matplotlib")
