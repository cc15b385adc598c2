"""Perplexity of a model loaded by plain transformers (e.g. a compressed-tensors export), by rptq's protocol.

    python scripts/ct_perplexity.py DIR --data-path wiki.test.raw --seqlen 256

Loads DIR with ``AutoModelForCausalLM.from_pretrained(DIR, dtype=float32)`` on the CPU (rptq itself refuses
foreign quantized models) and evaluates it exactly as ``rptq eval --task wikitext --data-path ...`` does
(same tokenization, windows and formula), so the two numbers compare.
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptq_cli.data import eval_tokens
from rptq_cli.evaluate import perplexity


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = eval_tokens("wikitext", tokenizer, seqlen=args.seqlen, data_path=args.data_path)
    with torch.no_grad():
        r = perplexity(model, tokens, seqlen=args.seqlen, progress=False)
    print(f"{args.model}  {type(model.get_submodule('lm_head')).__name__}  wikitext: ppl {r['ppl']:.3f}  "
          f"({r['windows']} windows × {r['seqlen']})")


if __name__ == "__main__":
    main()
