"""Is the online loop worth it? The same number of rankings and PPO steps spent (a) offline: one round of SFT
samples, one reward model, one PPO run, against (b) online: `--rounds` rounds of `rlhf loop`, each ranking the
current policy's samples, retraining the reward model on all rankings so far and continuing the policy.

    .venv/bin/python bench/online_loop.py [--oracles descriptive,on_topic] [--seeds 0,1,2] [--rankings 192]
                                          [--rounds 3] [--policy-steps 12] [--model default] [--out runs/bench-online]

Both arms are `pipeline.loop` runs with scripted annotators (overlap 1, noise 0.1) and the same prompt split,
held-out prompts and evaluation seed, so their evaluations are paired by (oracle, seed). Measured per arm:

- the final oracle score at matched KL: each run's held-out evaluations (every `--eval-every` PPO steps, across the
  rounds) form a curve of oracle score against KL to the SFT model; both arms are read at the smaller of their
  two final KLs, each at the latest point of its curve there (linear between evaluations; the KL of an online
  run can fall in a later round), so neither wins by drifting further;
- the final policy's oracle score and KL as they are;
- the reward model's accuracy on the final policy's samples (K per held-out prompt, ranked by the oracle
  without noise): how well the reward model judges where the policy ends up.

Printed: a row per (oracle, seed) and, per oracle, the paired difference online - offline with its 95% t-interval
over the seeds; `uptime` and the CPU before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.loop import LoopConfig, run_loop  # noqa: E402
from rlhf.hardware import cpu_description  # noqa: E402
from rlhf.runlog import read_log  # noqa: E402

T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # t quantiles, df 1..10


def trajectory(out: Path, rounds: int) -> list[tuple[float, float]]:
    """(KL, oracle) of every held-out evaluation in order, across the rounds (a round's first evaluation repeats the
    last one of the round before and is left out)."""
    points = []
    for r in range(1, rounds + 1):
        frame = read_log(out / f"round-{r}" / "policy" / "eval.csv")
        rows = frame.to_dict("records")[(1 if r > 1 else 0):]
        points += [(float(row["objective/kl"]), float(row["objective/oracle"])) for row in rows]
    return points


def oracle_at(points: list[tuple[float, float]], kl: float) -> float:
    """The oracle score of the latest policy on the curve at `kl`: from the last evaluation with a KL of at most
    `kl`, linear to the next one (a curve need not grow in KL: a later round may come back under it)."""
    last = max((i for i, (k, _) in enumerate(points) if k <= kl), default=None)
    if last is None:
        return points[0][1]
    if last == len(points) - 1:
        return points[last][1]
    (k0, o0), (k1, o1) = points[last], points[last + 1]
    return o0 + (o1 - o0) * (kl - k0) / (k1 - k0)  # k0 <= kl < k1


def run_arm(args, oracle: str, seed: int, rounds: int) -> dict:
    out = Path(args.out) / f"{oracle}-seed{seed}-rounds{rounds}"
    cfg = LoopConfig(out=str(out), model=args.model, oracle=oracle, seed=seed, rounds=rounds,
                     prompts_per_round=args.rankings // rounds, policy_steps=args.policy_steps // rounds,
                     rm_epochs=args.rm_epochs, eval_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens,
                     eval_every=args.eval_every, order="random", resume=(out / "loop.json").is_file())
    rounds_done = run_loop(cfg)
    last = rounds_done[rounds]["evaluate"]["row"]
    seconds = sum(step.get("seconds", 0) for steps in rounds_done.values() for step in steps.values())
    return {"out": str(out), "points": trajectory(out, rounds), "kl": last["kl"], "oracle": last["oracle"],
            "oracle_sft": last["oracle_sft"], "rm_acc_policy_samples": last["rm_acc_policy_samples"],
            "seconds": round(seconds)}  # the steps' own times, also when an earlier invocation ran them


def interval(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.3f} (one seed)"
    half = T_975[min(len(diffs) - 2, len(T_975) - 1)] * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracles", default="descriptive,on_topic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rankings", type=int, default=192, help="rankings in all, the same for both arms")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the online arm")
    parser.add_argument("--policy-steps", type=int, default=12, help="PPO steps in all, the same for both arms")
    parser.add_argument("--rm-epochs", type=int, default=3)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="runs/bench-online")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}\nuptime before: {os.popen('uptime').read().strip()}", flush=True)
    results = []
    # Seeds outer: a run stopped early still has every oracle at its first seeds.
    for seed in map(int, args.seeds.split(",")):
        for oracle in args.oracles.split(","):
            offline, online = (run_arm(args, oracle, seed, rounds) for rounds in (1, args.rounds))
            matched = min(offline["kl"], online["kl"])
            for arm in (offline, online):
                arm["oracle_at_matched_kl"] = oracle_at(arm["points"], matched)
            results.append({"oracle": oracle, "seed": seed, "matched_kl": matched, "offline": offline,
                            "online": online})
            print(f"[bench] {oracle} seed {seed}: matched KL {matched:.3f}: offline "
                  f"{offline['oracle_at_matched_kl']:.3f}, online {online['oracle_at_matched_kl']:.3f}", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)  # after each pair of arms: nothing lost to a stop
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nuptime after: {os.popen('uptime').read().strip()}\n")
    print(f"{args.rankings} rankings and {args.policy_steps} PPO steps per arm; online = {args.rounds} rounds\n")
    print("| oracle | seed | SFT | matched KL | offline @KL | online @KL | offline final (KL) | online final (KL) "
          "| RM acc. on final policy, offline | online | seconds off / on |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        a, b = row["offline"], row["online"]
        print(f"| {row['oracle']} | {row['seed']} | {a['oracle_sft']:.3f} | {row['matched_kl']:.3f} | "
              f"{a['oracle_at_matched_kl']:.3f} | {b['oracle_at_matched_kl']:.3f} | "
              f"{a['oracle']:.3f} ({a['kl']:.2f}) | "
              f"{b['oracle']:.3f} ({b['kl']:.2f}) | {a['rm_acc_policy_samples']:.3f} | "
              f"{b['rm_acc_policy_samples']:.3f} | {a['seconds']} / {b['seconds']} |")
    print("\nPaired difference online - offline, mean [95% t-interval over seeds]:\n")
    print("| oracle | oracle score at matched KL | RM accuracy on the final policy's samples |")
    print("|---|---:|---:|")
    for oracle in args.oracles.split(","):
        rows = [r for r in results if r["oracle"] == oracle]
        if not rows:
            continue
        score = [r["online"]["oracle_at_matched_kl"] - r["offline"]["oracle_at_matched_kl"] for r in rows]
        accuracy = [r["online"]["rm_acc_policy_samples"] - r["offline"]["rm_acc_policy_samples"] for r in rows]
        print(f"| {oracle} | {interval(score)} | {interval(accuracy)} |")


if __name__ == "__main__":
    main()
