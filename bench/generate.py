"""Sampling speed: ours (`rlhf.generation.sample_batch`) against plain `model.generate` and against the
memory-bandwidth bound, side by side in one run, at several batch sizes.

    .venv/bin/python bench/generate.py [--model default] [--batch-sizes 8 32] [--k 4] [--max-new-tokens 48]

A batch of B sequences is B / K prompts with K samples each, as `rlhf generate` and the policy's rollouts
sample. Plain `generate` gets the arguments whose samples `decode_samples` reproduces (`do_sample`, temperature,
`top_k=0`, `min_new_tokens=1`, `num_return_sequences=K`, the KV cache); both start from the same seed and the
run checks they give the same samples. Tokens are counted up to and including EOS. Each method runs once to warm
up, then `--repeats` times alternately; the median is reported.

The bound: a decode step must read every weight once (the embedding's rows aside, a tied output layer once), so
at B rows a step cannot beat weight bytes / memory bandwidth, measured here as the bytes a large tensor copy moves
(read + write) per second. tokens/s bound = B * bandwidth / weight bytes. It ignores the prompt's prefill and the
attention over the cache, so no real sampler reaches it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rlhf.generation import SamplingParams, completion_lengths, encode_prompts, sample_batch
from rlhf.hardware import configure_threads, cpu_description
from rlhf.models import eos_token_ids, load_causal_lm, load_tokenizer
from rlhf.prompts import read_prompts


def plain_generate(model, tokenizer, prompts, k, params, seed):
    """transformers' own sampler: one `generate` call, every prompt expanded to its K samples."""
    enc = encode_prompts(tokenizer, prompts, 10_000)
    torch.manual_seed(seed)
    out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                         temperature=params.temperature, top_p=params.top_p, top_k=0,
                         max_new_tokens=params.max_new_tokens, min_new_tokens=1, num_return_sequences=k,
                         eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                         use_cache=True)
    return out[:, enc.input_ids.shape[1]:]


def ours(model, tokenizer, prompts, k, params, seed):
    return sample_batch(model, tokenizer, prompts, k, params, generator_seed=seed)[1]


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by copying a tensor much larger than the caches; the best of a few."""
    source = torch.rand(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # touch both first
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = max(best, 2 * source.numel() * 4 / (time.perf_counter() - start))
    return best


def weight_bytes(model) -> int:
    """Bytes read per decode step: every parameter once (tied weights are one tensor)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads, _ = configure_threads()
    start = time.perf_counter()
    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - start
    eos = eos_token_ids(model, tokenizer)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    bandwidth = copy_bandwidth()
    weights = weight_bytes(model)
    all_prompts = [p for _, p in read_prompts("data/prompts.jsonl")]

    rows = []
    with torch.no_grad():
        for batch in args.batch_sizes:
            prompts = all_prompts[:max(1, batch // args.k)]
            methods = {"ours": ours, "plain generate": plain_generate}
            times: dict[str, list[float]] = {name: [] for name in methods}
            samples = {}
            for repeat in range(args.repeats + 1):
                for name, run in methods.items():
                    t0 = time.perf_counter()
                    samples[name] = run(model, tokenizer, prompts, args.k, params, seed=repeat)
                    if repeat:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
                same = torch.equal(samples["ours"], samples["plain generate"])
                if not same:
                    print(f"batch {batch}, seed {repeat}: the samples differ")
            lengths, finished = completion_lengths(samples["ours"], eos)
            tokens = int((lengths + finished.long()).sum())
            bound = batch * bandwidth / weights
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append((batch, tokens, medians, bound, same))
            print(f"batch {batch}: ours {medians['ours']:.2f} s, plain generate {medians['plain generate']:.2f} s, "
                  f"same samples: {same}", flush=True)

    print(f"\nmodel {args.model} (float32, {weights / 1e6:.0f} MB of weights), K = {args.k}, up to "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}; {threads} threads; load {load_s:.1f} s")
    print(f"CPU: {cpu_description()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print("| batch | tokens | ours tok/s | plain generate tok/s | ours / plain | bound tok/s | ours / bound | same "
          "samples |\n|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch, tokens, medians, bound, same in rows:
        ours_rate, plain_rate = tokens / medians["ours"], tokens / medians["plain generate"]
        print(f"| {batch} | {tokens} | {ours_rate:.1f} | {plain_rate:.1f} | {ours_rate / plain_rate:.2f}x | "
              f"{bound:.0f} | {ours_rate / bound:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
