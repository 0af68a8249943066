"""PPO, RLOO and GRPO side by side: the same prompts, seeds, batch and wall-clock budget per arm.

    OMP_NUM_THREADS=2 .venv/bin/python bench/policy_algos.py [--budget-s 300] [--eval-size 64]

Two rewards: the `alliteration` oracle used directly as the reward, and a reward model trained here on
the `descriptive` preference (rankings by the noiseless oracle over cached SFT completions, the
pipeline of bench/rm_quality.py), evaluated with that oracle. Each arm runs in its own process (so its
peak memory is its own) and is evaluated on the same held-out prompts (`split_by_prompt`, at least 64)
with the same sampling seed, before and after training. The table gives the oracle gain over the SFT
model with a 95% confidence interval from the per-prompt paired differences (1.96 standard errors), the
KL to the reference, distinct-2 relative to the SFT model's, seconds per step and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def train_descriptive_rm(model: str, out: Path, seed: int) -> Path:
    """A reward model on the descriptive preference, trained once and reused."""
    rm_dir = out / "rm-descriptive" / "rm"
    if (rm_dir / "reward_model.json").is_file():
        return rm_dir
    from rm_quality import cached_tasks, oracle_rankings, run_ours

    from rlhf.oracles import load_oracle

    rows = oracle_rankings(cached_tasks(model, 4, 32), load_oracle("descriptive"), 0.2, seed)
    args = argparse.Namespace(epochs=None, lr=None, seed=seed, model=model)
    result = run_ours(rows, args, out / "rm-descriptive")
    print(f"reward model (descriptive): held-out accuracy {result['test']:.3f}, {result['seconds']:.0f} s",
          flush=True)
    return rm_dir


def run_arm(args) -> None:
    """One arm in this process; prints one JSON line."""
    from policy.config import PPOConfig
    from policy.trainer import train_policy

    reward, oracle = ("rm", "descriptive") if args.arm_reward == "rm" else (args.arm_reward, args.arm_reward)
    started = time.time()
    summary = train_policy(PPOConfig(
        prompts=str(ROOT / "data" / "prompts.jsonl"), out=args.arm_out, reward=reward, oracle=oracle,
        rm=args.rm if reward == "rm" else None, model=args.model, algo=args.arm_algo, steps=10_000,
        batch_size=args.batch_size, response_length=args.response_length, lr=args.lr,
        eval_every=0, eval_fraction=args.eval_fraction, eval_size=args.eval_size, seed=args.seed,
        max_steps_time=args.budget_s))
    from rlhf.runlog import read_log

    rows = [json.loads(line) for line in Path(summary["samples"]).read_text().splitlines()]
    step_s = float(read_log(summary["train_log"])["time/step_s"].mean())
    print(json.dumps({"steps": summary["steps"], "step_s": step_s, "final": summary["final"],
                      "reference": summary["reference"],
                      "gains": [r["policy"]["oracle"] - r["reference"]["oracle"] for r in rows],
                      "wall_s": time.time() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "rloo", "grpo"])
    parser.add_argument("--rewards", nargs="+", default=["alliteration", "rm"],
                        help="'rm' (a descriptive-preference reward model) and/or oracle names")
    parser.add_argument("--budget-s", type=float, default=300, help="training seconds per arm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-fraction", type=float, default=0.3, help="held-out share of the 237 prompts")
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/rlhf-bench-cache/policy_algos")
    parser.add_argument("--arm-algo", help=argparse.SUPPRESS)
    parser.add_argument("--arm-reward", help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.arm_algo:
        return run_arm(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    rm_dir = train_descriptive_rm(args.model, out, args.seed) if "rm" in args.rewards else None
    results = {}
    for reward in args.rewards:
        for algo in args.algos:
            arm_out = out / f"{reward}-{algo}"
            if arm_out.exists():
                import shutil

                shutil.rmtree(arm_out)
            command = [sys.executable, __file__, "--arm-algo", algo, "--arm-reward", reward, "--arm-out", str(arm_out),
                       "--budget-s", str(args.budget_s), "--batch-size", str(args.batch_size),
                       "--response-length", str(args.response_length), "--lr", str(args.lr),
                       "--eval-fraction", str(args.eval_fraction), "--eval-size", str(args.eval_size),
                       "--model", args.model, "--seed", str(args.seed), "--rm", str(rm_dir or "")]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{reward}/{algo} failed:\n{done.stderr[-2000:]}", flush=True)
                continue
            results[reward, algo] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[reward, algo]
            print(f"{reward}/{algo}: {r['steps']} steps, oracle {r['final']['objective/oracle']:.3f} "
                  f"(SFT {r['reference']['objective/oracle']:.3f}), KL {r['final']['objective/kl']:.2f}", flush=True)

    print(f"\nuptime: {os.popen('uptime').read().strip()}")
    print(f"{args.model}, batch {args.batch_size}, {args.response_length} tokens, lr {args.lr:g}, "
          f"{args.budget_s:.0f} s of training per arm, {args.eval_size} held-out prompts\n")
    print("| reward | algorithm | steps | s/step | oracle: SFT -> policy | gain (95% CI) | KL (nats) "
          "| distinct-2 vs SFT | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (reward, algo), r in results.items():
        gains = r["gains"]
        mean = sum(gains) / len(gains)
        sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / max(len(gains) - 1, 1))
        half = 1.96 * sd / math.sqrt(len(gains))
        f, ref = r["final"], r["reference"]
        name = "RM (descriptive)" if reward == "rm" else reward
        print(f"| {name} | {algo} | {r['steps']} | {r['step_s']:.1f} | "
              f"{ref['objective/oracle']:.3f} -> {f['objective/oracle']:.3f} | {mean:+.3f} ± {half:.3f} | "
              f"{f['objective/kl']:.2f} | {f['eval/distinct_2'] / max(ref['eval/distinct_2'], 1e-9):.2f}x | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
