"""Active labeling, measured: reward-model held-out accuracy against the number of rankings, when scripted
annotators rank the tasks in random order or in an order the reward model sets (labeling/active.py: `uncertainty`,
the smallest reward margin first, or `information`, the greatest expected information gain), same tasks, seeds
and budget, side by side in one run.

    .venv/bin/python bench/active_learning.py [--k 4] [--budget 80] [--every 20] [--epochs 5] [--seeds 0]

Data: the SFT completions cached by bench/rm_quality.py (--k per prompt of data/prompts.jsonl, 32 tokens), the
demo's `descriptive` oracle standing in for the annotators (one annotator, overlap 1, noise 0.1, as
`rlhf simulate`), 20% of the prompts held out by the export's rule and ranked without noise for the
evaluation. For each strategy: a fresh store with the other prompts' tasks; `simulate` with the strategy's
queue and `RetrainingLoop` (every --every rankings a reward model is trained from scratch on all rankings
so far with the `rlhf train-rm` defaults, --epochs epochs; the unranked tasks are scored again and the queue
re-ordered), until --budget rankings. Both strategies rank their first --every tasks in the same random order
(there is no reward model yet). Tasks whose completions all tie are skipped by the scripted annotator, as in
the demo; they cost no ranking but are counted (`skips`).

Printed: the learning curves (held-out pairwise accuracy per round), and the number of rankings each
strategy needs to reach the random strategy's final accuracy (the first round at or above it; linear
interpolation between rounds in brackets). Target: an order set by the reward model needs <= 70% of random's
rankings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rm_quality import CACHE, cached_tasks, oracle_rankings  # noqa: E402


class BudgetReached(Exception):
    pass


def run_strategy(strategy: str, tasks: list[dict], test_rows: list[dict], args, seed: int, out: Path) -> list[dict]:
    from labeling.active import ActiveQueue, RetrainingLoop
    from labeling.simulate import simulate
    from labeling.store import open_store
    from reward_model.evaluate import evaluate_reward_model
    from reward_model.model import load_reward_model
    from rlhf.oracles import load_oracle
    from rlhf.records import Task

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    curve: list[dict] = []
    with open_store(out / "labels.db") as store:
        store.import_tasks([Task.from_dict(t) for t in tasks])
        queue = ActiveQueue(strategy, seed=seed, task_ids=store.task_ids())
        started = time.time()

        def on_round(round_: int, rankings: int, rm_dir: str) -> None:
            rm, tokenizer = load_reward_model(rm_dir)
            result = evaluate_reward_model(rm, tokenizer, test_rows)
            skips = store.progress(1).skips
            curve.append({"strategy": strategy, "seed": seed, "round": round_, "rankings": rankings, "skips": skips,
                          "accuracy": result["accuracy"], "pairs": result["pairs"],
                          "seconds": round(time.time() - started, 1)})
            print(f"  {strategy:11s} seed {seed} round {round_}: {rankings} rankings ({skips} skips) -> held-out "
                  f"accuracy {result['accuracy']:.3f} on {result['pairs']} pairs [{time.time() - started:.0f} s]",
                  flush=True)
            if rankings >= args.budget:
                raise BudgetReached()

        loop = RetrainingLoop(store, queue, args.every, out / "rms",
                              {"model": args.model, "epochs": args.epochs, "seed": seed}, on_round=on_round,
                              overlap=1)
        try:
            simulate(store, load_oracle(args.oracle), annotators=1, overlap=1, noise=args.noise, seed=seed,
                     next_task=lambda annotator, overlap: queue.next_task(store, annotator, overlap),
                     after_ranking=loop)
        except BudgetReached:
            pass
    if not args.keep:
        shutil.rmtree(out / "rms", ignore_errors=True)
    return curve


def rankings_to_reach(curve: list[dict], target: float) -> tuple[int | None, float | None]:
    """(first round's rankings with accuracy >= target, linearly interpolated rankings), None if never."""
    previous = None
    for point in curve:
        if point["accuracy"] >= target:
            if previous is None or point["accuracy"] == previous["accuracy"]:
                return point["rankings"], float(point["rankings"])
            fraction = (target - previous["accuracy"]) / (point["accuracy"] - previous["accuracy"])
            return point["rankings"], previous["rankings"] + fraction * (point["rankings"] - previous["rankings"])
        previous = point
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--oracle", default="descriptive")
    parser.add_argument("--k", type=int, default=4, help="completions per task")
    parser.add_argument("--budget", type=int, default=80, help="rankings per strategy")
    parser.add_argument("--every", type=int, default=20, help="rankings between retrainings")
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs of each retraining (train-rm's default is 8; 5 keeps a round short)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=["random", "uncertainty", "information"],
                        choices=["random", "uncertainty", "information"])
    parser.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the reward models of every round")
    parser.add_argument("--out", default=str(CACHE / "active"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from rlhf.oracles import load_oracle

    tasks = cached_tasks(args.model, args.k, 32, limit=args.limit)
    rows = oracle_rankings(tasks, load_oracle(args.oracle), 0.2, 0)
    test_rows = [r for r in rows if r["split"] == "test"]
    test_prompts = {r["prompt"] for r in test_rows}
    pool = [t for t in tasks if t["prompt"] not in test_prompts]
    print(f"{len(pool)} tasks to label ({sum(r['split'] == 'train' for r in rows)} not all-tied), "
          f"{len(test_rows)} held-out rankings; budget {args.budget}, retrain every {args.every}, "
          f"{args.epochs} epochs", flush=True)
    curves = []
    for seed in args.seeds:
        for strategy in args.strategies:
            curves += run_strategy(strategy, pool, test_rows, args, seed, Path(args.out) / f"{strategy}-{seed}")
    (Path(args.out) / "curves.json").write_text(json.dumps(curves, indent=2))

    print("\nheld-out accuracy by rankings (mean over seeds):")
    rounds = sorted({c["rankings"] for c in curves})
    strategies = list(dict.fromkeys(c["strategy"] for c in curves))
    print("| rankings | " + " | ".join(strategies) + " |")
    print("|---:|" + "---:|" * len(strategies))
    for n in rounds:
        cells = []
        for s in strategies:
            points = [c for c in curves if c["strategy"] == s and c["rankings"] == n]
            if not points:
                cells.append("-")
                continue
            mean = sum(p["accuracy"] for p in points) / len(points)
            cells.append(f"{mean:.3f} ({sum(p['skips'] for p in points) / len(points):.0f} skips)")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for seed in args.seeds:
        by = {s: [c for c in curves if c["strategy"] == s and c["seed"] == seed] for s in strategies}
        if not by.get("random"):
            continue
        target = by["random"][-1]["accuracy"]
        for s in strategies:
            first, interpolated = rankings_to_reach(by[s], target)
            share = f"{first / by['random'][-1]['rankings']:.0%}" if first else "not reached"
            print(f"seed {seed}: {s} reaches random's final accuracy {target:.3f} at {first} rankings "
                  f"({'-' if interpolated is None else f'{interpolated:.0f}'} interpolated; {share} of random's)")


if __name__ == "__main__":
    main()
