"""Reward-model quality on a known preference: can the RM learn the alliteration oracle?

    .venv/bin/python bench/rm_quality.py [--model default] [--k 4] [--epochs 2] [--lr 3e-4]

1. K completions per prompt of data/prompts.jsonl from the SFT model (`generate_tasks`, cached in
   $RLHF_BENCH_CACHE or /tmp/rlhf-bench-cache: generation is the slow part and is done once).
2. Ranked by the `alliteration` oracle, no noise; equal oracle scores tie (ties give no pair).
3. Held out by PROMPT (20% of prompts go to the test split), trained with `train_reward_model`
   (K-wise loss, LoRA), evaluated on the held-out prompts' pairs.
Target (issue 4): held-out pairwise accuracy >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RLHF_BENCH_CACHE", "/tmp/rlhf-bench-cache"))


def cached_tasks(model: str, k: int, max_new_tokens: int, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Generated tasks (K completions per prompt of data/prompts.jsonl), generated once and cached."""
    name = f"tasks-{Path(model).name}-k{k}-t{max_new_tokens}-s{seed}-n{limit or 'all'}.jsonl"
    path = CACHE / name
    if not path.is_file():
        import torch

        from rlhf.generation import SamplingParams, generate_tasks
        from rlhf.jsonl import write_jsonl
        from rlhf.models import load_causal_lm, load_tokenizer
        from rlhf.prompts import read_prompts

        prompts = read_prompts(ROOT / "data" / "prompts.jsonl", limit)
        tokenizer = load_tokenizer(model)
        lm = load_causal_lm(model, dtype=torch.float32).eval()
        started = time.time()
        tasks = generate_tasks(lm, tokenizer, prompts, k, SamplingParams(max_new_tokens=max_new_tokens),
                               model_name=model, seed=seed, batch_size=64)
        count = write_jsonl(path, (t.to_dict() for t in tasks))
        print(f"generated {count} tasks x {k} in {time.time() - started:.0f} s -> {path}", file=sys.stderr)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def oracle_rankings(tasks: list[dict], k: int, test_fraction: float, seed: int) -> list[dict]:
    """rankings.jsonl rows ranked by the alliteration oracle (dense ranks, ties equal), held out by prompt."""
    from rlhf.oracles import alliteration

    rng = random.Random(seed)
    test_ids = set(rng.sample([t["id"] for t in tasks], round(len(tasks) * test_fraction)))
    rows = []
    for task in tasks:
        completions = task["completions"][:k]
        scores = [alliteration(task["prompt"], c["text"]) for c in completions]
        if len(set(scores)) < 2:
            continue  # every completion ties: no comparison to learn from
        dense = {s: i + 1 for i, s in enumerate(sorted(set(scores), reverse=True))}
        rows.append({"task_id": task["id"], "annotator": "alliteration", "prompt": task["prompt"],
                     "completions": [{"id": c["id"], "text": c["text"], "rank": dense[s]}
                                     for c, s in zip(completions, scores)],
                     "split": "test" if task["id"] in test_ids else "train"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="SFT model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt (default 4: ~1,000 pairs)")
    parser.add_argument("--generate-k", type=int, default=8, help="completions generated (and cached) per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: RewardTrainingConfig's")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--batch-rankings", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="default: RewardTrainingConfig's")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CACHE / "rm_quality_run"))
    args = parser.parse_args()

    import shutil

    from reward_model.config import RewardTrainingConfig
    from reward_model.train import train_reward_model
    from rlhf.jsonl import write_jsonl

    tasks = cached_tasks(args.model, args.generate_k, args.max_new_tokens, limit=args.limit)
    rows = oracle_rankings(tasks, args.k, args.test_fraction, args.seed)
    data = CACHE / f"rm_quality_data_k{args.k}"
    write_jsonl(data / "rankings.jsonl", rows)
    shutil.rmtree(args.out, ignore_errors=True)
    extra = {key: value for key, value in (("lr", args.lr), ("dtype", args.dtype)) if value is not None}
    config = RewardTrainingConfig(data=str(data), out=args.out, model=args.model, epochs=args.epochs,
                                  lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                                  batch_rankings=args.batch_rankings, seed=args.seed, checkpoint_every=0, **extra)
    summary = train_reward_model(config)
    test = summary["test"]
    print(f"data: {len(rows)} rankings of K={args.k} ({summary['train_pairs']} train pairs, {test['pairs']} "
          f"held-out pairs from {sum(r['split'] == 'test' for r in rows)} held-out prompts)")
    print(f"config: epochs={config.epochs} lr={config.lr} lora_r={config.lora_r} "
          f"batch_rankings={config.batch_rankings} dtype={config.dtype}; trained in {summary['seconds']} s")
    print(f"train accuracy (last epoch) {summary['final_epoch_accuracy']:.3f}; held-out: accuracy "
          f"{test['accuracy']:.3f}, mean margin {test['mean_margin']:.3f}, ECE {test['ece']:.3f}")
    print(f"target >= 0.85: {'MET' if test['accuracy'] >= 0.85 else 'MISSED'}")


if __name__ == "__main__":
    main()
