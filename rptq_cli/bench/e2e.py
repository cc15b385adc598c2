"""The end-to-end rows of ``rptq bench``: decode speed and peak memory of quantized models against the same
model with Hugging Face ``generate`` in bf16 (CPU) or fp16 (GPU).

The default model is a Llama-shaped network built from a config with random weights (no download), saved once
as an fp16 directory and once per variant as an rptq checkpoint (W4A16: 4-bit weights; W4A4KV: 4-bit
weights, 4-bit packed KV cache; each also with ``--head-bits 8``). ``rptq bench --e2e-model DIR`` measures a
real model directory the same way, quantized here with RTN on a few random calibration windows (speed and
memory do not depend on the calibration). Each side is loaded and decoded in its own fresh process, so that
its peak memory is its own: resident memory on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..process import peak_rss_mb
from .table import row as table_row

PROMPT_TOKENS = 16
#: timed generate calls per side (a fresh cache each); the median is reported
GENERATE_REPEATS = 3
#: passes over all sides, in turn, each side in a fresh process; each side's fastest pass is reported
ROUNDS = 2


def model_config(quick: bool):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
                       num_hidden_layers=4 if quick else 8, vocab_size=8192, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


#: the checkpoints decoded: name → (preset, --head-bits). The 8-bit head matters where the vocabulary table is
#: a large part of the bytes a token streams (the bench model: a quarter at 4 bits; SmolLM2: more)
VARIANTS = {"w4a16": ("w4a16", 16), "w4a4kv": ("w4a4kv", 16), "w4a16_head8": ("w4a16", 8),
            "w4a4kv_head8": ("w4a4kv", 8)}


def prepare(directory: Path, model_cfg, reorder: bool = True) -> None:
    """Write ``directory/fp16`` (a random model of ``model_cfg``) and ``directory/<variant>`` (its checkpoints)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32).eval()
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        eos_token="t0", pad_token="t0")
    model.to(torch.float16).save_pretrained(directory / "fp16")
    tokenizer.save_pretrained(directory / "fp16")
    for name, (preset, head_bits) in VARIANTS.items():
        quantize(AutoModelForCausalLM.from_pretrained(directory / "fp16", dtype=torch.float32).eval(), tokenizer,
                 preset, directory / name, reorder, clusters={"R1": 8, "R4": 8, "R5": 8}, head_bits=head_bits)


def quantize(model, tokenizer, preset: str, output: Path, reorder: bool = True, clusters: dict | None = None,
             head_bits: int | None = None) -> None:
    """Quantize ``model`` (in place) with ``preset``, RTN, on two random windows, and save it to ``output``."""
    from ..config import build_config
    from ..export import save_quantized
    from ..models import family_for
    from ..quantize import quantize_model
    config = build_config(preset, weight_quantizer="rtn", act_clip="minmax", clusters=clusters, reorder=reorder,
                          head_bits=head_bits)
    calib = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, family_for(model.config), calib, config, progress=False)
    save_quantized(model, tokenizer, config, output, provenance={"source_model": "bench"})


def decode(directory: Path, which: str, new_tokens: int, threads: int, device: str = "cpu") -> dict:
    """Load one side (``directory`` holds an ``rptq`` checkpoint or an ``fp`` model) on ``device`` and time greedy
    decoding of ``new_tokens`` after a short prompt (in this process): the median of GENERATE_REPEATS calls, the
    prompt's prefill included."""
    from transformers import AutoModelForCausalLM

    from .. import kernels
    from ..export import load_quantized
    from ..nn.kv_cache import PackedKVCache
    torch.set_num_threads(threads)
    gpu = torch.device(device).type == "cuda"
    if which == "fp":
        dtype = torch.float16 if gpu else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        backend = "torch_fp16" if gpu else "torch_bf16"
    else:
        model, _ = load_quantized(directory, dtype=torch.float16 if gpu else torch.float32)
        backend = kernels.backend(device)
    model.to(device)
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    times = []
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(GENERATE_REPEATS):
            cache = PackedKVCache.from_model(model, max_length=PROMPT_TOKENS + new_tokens) if which == "rptq" else None
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompt, past_key_values=cache, **kwargs)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mb()
    return {"tokens_per_s": new_tokens / seconds, "ms_per_token": 1000 * seconds / new_tokens,
            "peak_mb": peak_mb, "backend": backend}


def _in_subprocess(directory: Path, which: str, new_tokens: int, threads: int, device: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "rptq_cli.bench.e2e", str(directory), which, str(new_tokens),
                          str(threads), device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def decode_rows(quick: bool = False, threads: int | None = None, device: str = "cpu", model_cfg=None,
                rounds: int = ROUNDS) -> list[dict]:
    """The W4A16 and W4A4KV decode rows on ``device``: our checkpoints against HF ``generate`` of the same fp model
    (``model_cfg``, a LlamaConfig, defaults to :func:`model_config`)."""
    cfg = model_cfg or model_config(quick)
    reorder = _faiss_available()  # without faiss (some GPU images) the rows still run, on unreordered groups
    with tempfile.TemporaryDirectory(prefix="rptq-bench-") as tmp:
        directory = Path(tmp)
        prepare(directory, cfg, reorder)
        shape = f"llama {cfg.num_hidden_layers}L h{cfg.hidden_size}" + ("" if reorder else " no-reorder")
        return _measure(directory / "fp16", {name: directory / name for name in VARIANTS}, shape, quick, threads,
                        device, rounds)


def model_decode_rows(model_dir: str | Path, quick: bool = False, threads: int | None = None,
                      device: str = "cpu", rounds: int = ROUNDS) -> list[dict]:
    """The same rows for a real model directory (any family rptq supports), quantized here into a temporary
    directory with each variant."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="rptq-bench-") as tmp:
        checkpoints = {}
        for name, (preset, head_bits) in VARIANTS.items():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            checkpoints[name] = Path(tmp) / name
            quantize(model, AutoTokenizer.from_pretrained(model_dir), preset, checkpoints[name], _faiss_available(),
                     head_bits=head_bits)
        config = model.config
        del model  # each side is measured in its own process
        shape = f"{config.model_type} {config.num_hidden_layers}L h{config.hidden_size}"
        return _measure(model_dir, checkpoints, shape, quick, threads, device, rounds)


def _measure(fp_dir: Path, checkpoints: dict[str, Path], shape: str, quick: bool, threads: int | None,
             device: str, rounds: int = ROUNDS) -> list[dict]:
    """One row per checkpoint against HF ``generate`` of ``fp_dir``: ``rounds`` passes over all sides in turn, each
    side's fastest pass reported (a machine whose speed drifts between processes then slows every side alike),
    with the highest peak memory of its passes."""
    threads = threads or torch.get_num_threads()
    new_tokens = 24 if quick else 64
    sides = {"": (fp_dir, "fp"), **{name: (path, "rptq") for name, path in checkpoints.items()}}
    passes: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (path, which) in sides.items():
            passes[name].append(_in_subprocess(path, which, new_tokens, threads, device))
    best = {name: {**min(runs, key=lambda r: r["ms_per_token"]), "peak_mb": max(r["peak_mb"] for r in runs)}
            for name, runs in passes.items()}
    base = best.pop("")
    gpu = torch.device(device).type == "cuda"
    memory = "peak_gpu_mb" if gpu else "peak_rss_mb"
    rows = []
    for name, ours in best.items():
        row = table_row(f"{name}_e2e_decode", f"{shape} decode {new_tokens} tok", ours["backend"],
                        ours["ms_per_token"], f"hf_generate_{base['backend'].removeprefix('torch_')}",
                        base["ms_per_token"], tokens_per_s=ours["tokens_per_s"],
                        baseline_tokens_per_s=base["tokens_per_s"],
                        **{memory: ours["peak_mb"], f"baseline_{memory}": base["peak_mb"]})
        if gpu:
            row["device"] = torch.cuda.get_device_name()
        rows.append(row)
    return rows


if __name__ == "__main__":  # one side of the measurement, in a fresh process
    path, side, count, nthreads, dev = sys.argv[1:6]
    print(json.dumps(decode(Path(path), side, int(count), int(nthreads), dev)))
