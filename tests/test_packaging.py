"""``pip install .`` (not editable) gives a working ``rptq``: the presets ship inside the package.

The wheel is built from a copy of the source tree (setuptools' ``build/lib`` keeps files of earlier builds,
which would hide a file missing from the package), without the compiled extension (``RPTQ_NO_EXTENSION=1``:
the test is about packaging, and the reference kernels run without it), and installed with ``--target`` into
a temporary directory that is the only place ``rptq_cli`` can be imported from.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".hypothesis",
                                    ".pytest_cache", "tests", "out", "docs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site directory holding the installed wheel, the rptq script in it)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    env = {**os.environ, "RPTQ_NO_EXTENSION": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source], env=env,
                   check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("rptq-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], env=env, check=True, capture_output=True)
    return site, site / "bin" / "rptq"


def _only_installed(site: Path) -> dict:
    """The environment of a run that imports rptq_cli from ``site`` only (the run's cwd is outside the repo)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_the_wheel_ships_the_presets(installed, tmp_path):
    site, _ = installed
    probe = ("import rptq_cli, rptq_cli.config as c; print(rptq_cli.__file__); print(c.load_preset('w4a8')); "
             "print(c.preset_names()); from rptq_cli.memory import read_config; print(read_config('llama-70b')"
             "['hidden_size'])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_only_installed(site),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert Path(out[0]).is_relative_to(site), out[0]  # the installed copy, not the source tree
    assert out[1] == "{'wbits': 4, 'abits': 8}"
    assert "w4a8" in out[2] and "w4a4kv" in out[2] and "w4a4-fine" in out[2]
    assert out[3] == "8192"


def test_installed_rptq_evaluates_a_preset(installed, tiny_llama_dir, corpus_file, tmp_path):
    site, rptq = installed
    out = tmp_path / "eval.json"
    result = subprocess.run([rptq, "eval", tiny_llama_dir, "--config", "w4a8", "--data-path", corpus_file,
                             "--calib-path", corpus_file, "--nsamples", "2", "--seqlen", "16", "--json", out],
                            cwd=tmp_path, env=_only_installed(site), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["quantization"]["label"] == "W4A8-token" and report["results"]["wikitext"]["ppl"] > 0
