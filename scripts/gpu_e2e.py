"""A quantized checkpoint on a GPU, end to end: the CUDA kernels against the CPU ones, through the model.

    python3 scripts/gpu_e2e.py CHECKPOINT... [--corpus tests/data/corpus.txt]

For each checkpoint: perplexity of the corpus on the CPU (float32) and on the GPU (float16), greedy
generation with the packed KV cache on both, and the backend each used.
"""
import argparse
import time

import torch

from rptq_cli import kernels
from rptq_cli.evaluate import perplexity
from rptq_cli.export import load_quantized
from rptq_cli.nn.kv_cache import PackedKVCache


def generate(model, prompt, tokens=32):
    cache = PackedKVCache.from_model(model)
    start = time.perf_counter()
    out = model.generate(prompt.to(model.device), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         past_key_values=cache, pad_token_id=0)
    return out[0, prompt.shape[1]:].cpu(), time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--corpus", default="tests/data/corpus.txt")
    args = ap.parse_args()
    for path in args.checkpoints:
        cpu, tok = load_quantized(path, dtype=torch.float32)
        gpu, _ = load_quantized(path, dtype=torch.float16)
        gpu.to("cuda")
        text = tok(open(args.corpus).read() * 4, return_tensors="pt").input_ids
        ppl_cpu = perplexity(cpu, text, seqlen=128, progress=False)["ppl"]
        ppl_gpu = perplexity(gpu, text, seqlen=128, progress=False)["ppl"]
        prompt = text[:, :8]
        out_cpu, _ = generate(cpu, prompt)
        generate(gpu, prompt, 4)  # warm-up
        out_gpu, seconds = generate(gpu, prompt)
        same = int((out_cpu == out_gpu).long().cumprod(0).sum())
        print(f"{path}: backend cpu={kernels.backend('cpu')} gpu={kernels.backend('cuda')}; "
              f"ppl cpu {ppl_cpu:.4f} gpu {ppl_gpu:.4f} (rel diff {abs(ppl_gpu - ppl_cpu) / ppl_cpu:.2e}); "
              f"greedy tokens equal for the first {same}/32; gpu decode {32 / seconds:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
