"""Batched generation vs one-at-a-time, same model, prompts and settings, measured in one run.

    .venv/bin/python bench/generate.py [--model default] [--prompts 16] [--k 4] [--max-new-tokens 48]

Batched = `labeling.generate.generate_tasks` (all prompts x K samples in one left-padded `generate` call with
the KV cache). Baselines with plain `model.generate`: (a) one sequence at a time (prompt by prompt, sample by
sample), (b) one prompt at a time with its K samples (num_return_sequences=K). Tokens counted up to EOS.
Target: batched >= 4x baseline (a). Also reports the model's load time from the cache.
"""

from __future__ import annotations

import argparse
import time

import torch

from labeling.generate import generate_tasks
from rlhf.generation import SamplingParams, completion_lengths, encode_prompts
from rlhf.models import eos_token_ids, load_causal_lm, load_tokenizer
from rlhf.prompts import read_prompts


def plain_generate(model, tokenizer, prompts, k, params, per_call):
    """Plain model.generate, one prompt per call, `per_call` samples per call; returns generated tokens."""
    eos = eos_token_ids(model, tokenizer)
    tokens = 0
    for prompt in prompts:
        enc = encode_prompts(tokenizer, [prompt], 10_000)
        for _ in range(k // per_call):
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                                 temperature=params.temperature, top_k=0, max_new_tokens=params.max_new_tokens,
                                 num_return_sequences=per_call, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens += int(completion_lengths(out[:, enc.input_ids.shape[1]:], eos)[0].sum())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - start
    prompts = [p for _, p in read_prompts("data/prompts.jsonl", args.prompts)]
    params = SamplingParams(temperature=0.7, max_new_tokens=args.max_new_tokens)
    torch.manual_seed(0)

    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        tasks = list(generate_tasks(model, tokenizer, [(None, p) for p in prompts], args.k, params,
                                    model_name=args.model, batch_size=args.prompts * args.k))
        seconds = time.perf_counter() - start
        rows.append(("batched (all prompts x K, one call)", sum(c.num_tokens for t in tasks for c in t.completions),
                     seconds))
        print(f"batched: {rows[-1][1]} tokens in {seconds:.1f} s", flush=True)
        for label, per_call in [("plain generate, one prompt x K per call", args.k),
                                ("plain generate, one sequence per call", 1)]:
            start = time.perf_counter()
            tokens = plain_generate(model, tokenizer, prompts, args.k, params, per_call)
            rows.append((label, tokens, time.perf_counter() - start))
            print(f"{label}: {tokens} tokens in {rows[-1][2]:.1f} s", flush=True)

    print(f"model {args.model} ({args.dtype}), {args.prompts} prompts x K={args.k}, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; load from cache {load_s:.2f} s")
    print("| method | tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    for label, tokens, seconds in rows:
        print(f"| {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |")
    batched = rows[0][1] / rows[0][2]
    for label, tokens, seconds in rows[1:]:
        print(f"ratio batched / ({label}): {batched / (tokens / seconds):.2f}x")


if __name__ == "__main__":
    main()
