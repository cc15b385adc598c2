"""Write a Llama-shaped model of real size with seeded random weights, without ever holding it in memory.

    python benchmarks/big_model.py /tmp/big/llama7b            # Llama-2-7B shape: 6.74B parameters, 13.5 GB
    python benchmarks/big_model.py OUT --layers 2 --hidden 256 --intermediate 704 --heads 8 --vocab 8192

The output is a Hugging Face model directory: ``config.json``, fp16 safetensors shards of about 2 GiB named in
``model.safetensors.index.json``, and the tokenizer of ``shared/models/llama-dev`` (byte-level BPE, 8192 tokens,
``</s>`` = id 0 is bos/eos/pad), so ``rptq quantize`` / ``eval`` accept it. The weights are a real init's
scale: every matrix (embeddings, projections, lm_head) normal with std 0.02, norms 1. Perplexity on them is
meaningless; they exist to measure memory and time.

Memory: each shard's safetensors header is computed from the shapes first, then every tensor is generated
and written in chunks of ``CHUNK_ELEMS`` values, so the script holds one chunk (a few tens of MB), never a layer
or a shard. Seeded per tensor (``seed`` and the tensor's index), so the bytes do not depend on the chunking.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

MAX_SHARD_BYTES = 2 * 1024**3
CHUNK_ELEMS = 16 * 2**20  # values generated at once: 64 MiB in float32
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "llama-dev"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """config.json of a Llama model; token ids follow the tokenizer (``</s>`` = 0 is bos, eos and pad)."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_dict()


def tensor_shapes(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                  vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order transformers saves a LlamaForCausalLM."""
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Consecutive tensors packed greedily into shards of at most ``max_bytes`` fp16 bytes (a bigger tensor
    gets a shard of its own), like transformers' ``max_shard_size``."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * numel(shape)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (8-byte little-endian length + JSON padded with spaces to 8 bytes) of fp16
    tensors stored back to back in the given order."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        end = offset + 2 * numel(shape)
        meta[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f, name: str, shape: tuple[int, ...], generator: torch.Generator) -> None:
    """Stream one tensor's fp16 bytes: norms are 1, everything else N(0, 0.02²), CHUNK_ELEMS values at a time."""
    total = numel(shape)
    if name.endswith("norm.weight"):
        f.write(torch.ones(total, dtype=torch.float16).numpy().tobytes())
        return
    done = 0
    while done < total:
        n = min(CHUNK_ELEMS, total - done)
        chunk = torch.randn(n, generator=generator, dtype=torch.float32).mul_(0.02).half()
        f.write(chunk.numpy().tobytes())
        done += n


def write_model(out: Path, args) -> None:
    kv = args.kv_heads or args.heads
    tensors = tensor_shapes(args.layers, args.hidden, args.intermediate, args.heads, kv, args.vocab)
    index = {name: i for i, (name, _) in enumerate(tensors)}
    shards = plan_shards(tensors, args.max_shard_bytes)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for s, entries in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            f.write(header(entries))
            for name, shape in entries:
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index[name])
                write_tensor(f, name, shape, generator)
                weight_map[name] = fname
                total += 2 * numel(shape)
        print(f"{fname}: {len(entries)} tensors, {(tmp / fname).stat().st_size / 2**30:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = llama_config(args.layers, args.hidden, args.intermediate, args.heads, kv, args.vocab)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(args.tokenizer / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    params = sum(numel(s) for _, s in tensors)
    print(f"wrote {out}: {params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB in {len(shards)} shards, "
          f"{time.perf_counter() - t0:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR.resolve(),
                    help="directory with tokenizer.json and tokenizer_config.json (default: shared llama-dev)")
    args = ap.parse_args(argv)
    if args.hidden % args.heads or args.heads % (args.kv_heads or args.heads):
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if not all((args.tokenizer / n).is_file() for n in TOKENIZER_FILES):
        ap.error(f"{args.tokenizer} lacks {' or '.join(TOKENIZER_FILES)}; pass --tokenizer DIR")
    with open(args.tokenizer / "tokenizer.json") as f:
        size = len(json.load(f)["model"]["vocab"])
    if size > args.vocab:
        ap.error(f"the tokenizer has {size} tokens, more than --vocab {args.vocab}")
    torch.set_num_threads(1)
    write_model(args.out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
