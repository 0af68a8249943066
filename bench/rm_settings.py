"""Reward-model settings across prompt splits: which training defaults hold up on held-out prompts?

    .venv/bin/python bench/rm_settings.py --data DIR [DIR ...] --setting "epochs=3" --setting "epochs=5" ...
    .venv/bin/python bench/rm_settings.py --make-splits OUT --oracles sentiment on_topic --split-seeds 0 1 2

Each DIR holds a rankings.jsonl whose rows are marked "split": "train" or "test" (an `rlhf export` folder, or
one that --make-splits writes: the cached K completions of bench/rm_quality.py ranked by a noiseless oracle,
split by prompt with the export's rule and the given seeds). Every setting (`RewardTrainingConfig` fields as
key=value; --common is added to each) trains `train_reward_model` on every DIR, in --workers processes at
once, and is scored on that DIR's held-out rows. A few dozen held-out prompts move one figure by +-0.07
(docs/benchmarks.md, "Reward-model quality"), so a setting is judged by its mean over several splits and preferences,
never by one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def parse_setting(text: str) -> dict:
    """'epochs=5 lr=1e-4' -> {'epochs': 5, 'lr': 0.0001}: each item read as `rlhf train-rm`'s flag of that name
    (`rlhf.config_args`, so typed and checked as on the command line; a bare `resume` is --resume)."""
    from reward_model.config import RewardTrainingConfig
    from rlhf.config_args import add_config_arguments, given_fields

    parser = argparse.ArgumentParser(prog="--setting", exit_on_error=False)
    add_config_arguments(parser, RewardTrainingConfig)
    items = [item.partition("=") for item in text.split()]
    if any(key in ("data", "out") for key, _, _ in items):
        raise SystemExit(f"--setting {text!r}: data and out are each job's own")
    try:
        parsed, unknown = parser.parse_known_args(
            ["--" + key.replace("_", "-") + sep + value for key, sep, value in items] + ["--data=", "--out="])
    except argparse.ArgumentError as error:
        raise SystemExit(f"--setting {text!r}: {error}") from None
    if unknown:
        raise SystemExit(f"--setting {text!r}: no such RewardTrainingConfig field: {' '.join(unknown)}")
    given = given_fields(RewardTrainingConfig, parsed)
    return {key: value for key, value in given.items() if key not in ("data", "out")}


def train_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from reward_model.config import RewardTrainingConfig
    from reward_model.train import train_reward_model

    config = RewardTrainingConfig(data=job["data"], out=job["out"], checkpoint_every=0, **job["settings"])
    summary = train_reward_model(config, progress=False)
    test = summary["test"]
    return {"setting": job["name"], "data": job["data"], "test": test["accuracy"],
            "interval": test.get("accuracy_interval"), "pairs": test.get("pairs"),
            "train_last_epoch": summary["final_epoch_accuracy"], "seconds": summary["seconds"]}


def make_splits(out: Path, oracles: list[str], seeds: list[int], k: int, test_fraction: float) -> None:
    from rm_quality import cached_tasks, oracle_rankings

    from rlhf.jsonl import write_jsonl
    from rlhf.oracles import load_oracle

    tasks = cached_tasks("default", k, 32)
    for name in oracles:
        for seed in seeds:
            rows = oracle_rankings(tasks, load_oracle(name), test_fraction, seed)
            count = write_jsonl(out / f"{name}-k{k}-split{seed}" / "rankings.jsonl", rows)
            print(f"{name} split {seed}: {count} rankings -> {out / f'{name}-k{k}-split{seed}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=[], help="folders holding a split rankings.jsonl")
    parser.add_argument("--setting", action="append", default=[],
                        help='RewardTrainingConfig fields: "epochs=5 lr=1e-4"')
    parser.add_argument("--common", default="", help="fields added to every setting (e.g. the base model)")
    parser.add_argument("--workers", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, help="torch threads per training (default: the cores / --workers)")
    parser.add_argument("--out", default="/tmp/rlhf-bench-cache/rm_settings")
    parser.add_argument("--make-splits", type=Path, help="write oracle-ranked split folders here and stop")
    parser.add_argument("--oracles", nargs="+", default=["sentiment", "on_topic"])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    if args.make_splits:
        make_splits(args.make_splits, args.oracles, args.split_seeds, args.k, args.test_fraction)
        return

    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    common = parse_setting(args.common)
    settings = {text: {**common, **parse_setting(text)} for text in args.setting or ["epochs=5"]}
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [{"name": name, "settings": values, "data": str(Path(data)), "threads": threads,
             "out": str(Path(args.out) / name.replace(" ", "_") / Path(data).name)}
            for name, values in settings.items() for data in args.data]
    results, started = [], time.time()
    log = Path(args.out) / "results.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(train_one, jobs):
            results.append(result)
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{time.time() - started:5.0f} s] {result['setting']:28s} {Path(result['data']).name:24s} "
                  f"held-out {result['test']:.3f} (last epoch {result['train_last_epoch']:.3f}, "
                  f"{result['seconds']:.0f} s)", flush=True)

    names = [Path(d).name for d in args.data]
    print("\n| setting | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for name in settings:
        by_data = {Path(r["data"]).name: r["test"] for r in results if r["setting"] == name}
        cells = " | ".join(f"{by_data[n]:.3f}" if n in by_data else "-" for n in names)
        mean = statistics.fmean(by_data.values()) if by_data else float("nan")
        print(f"| {name} | {cells} | **{mean:.3f}** |")
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
