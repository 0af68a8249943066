"""The KL-collapse experiment (docs/benchmarks.md, "The KL-collapse experiment") on SmolLM2-135M-Instruct
with the `alliteration` oracle as reward: RLOO with beta = 0 (no KL penalty) against beta > 0, same budget
(steps and seconds).

Targets: beta = 0 collapses ("tall tall tall ...": distinct-2 below half the SFT model's), while beta > 0
raises the oracle reward by >= 30% over the SFT model, keeps distinct-2 >= 0.8x the SFT model's and
the mean KL under 5 nats. All numbers are measured on the same held-out story prompts with the same
sampling seed; the SFT row is the reference model (adapters off) sampled the same way.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kl_collapse.py   # 2 arms x 80 steps (~15 min each here)

Writes kl_collapse.png in the run folder: oracle score, distinct-2 and KL per evaluation for every arm, the
SFT model's values as the step-0 point. Each arm's summary is kept in its folder, so arms can run as separate
processes into one --out folder (`--betas 0` and `--betas 0.5` side by side on two cores), and `--report DIR`
prints the table and redraws the figure from every arm found there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def story_prompts(path: Path) -> Path:
    """The story prompts of data/prompts.jsonl (alliteration is a story-writing reward)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("kind") == "story"))
    return path


def plot_arms(work: Path) -> Path:
    """One figure, three panels (oracle score, distinct-2, KL to the reference) against the step, a curve per
    arm (each arm's eval.csv; step 0 is the SFT model)."""
    from rlhf.runlog import Panel, plot, read_log

    arms = sorted(work.glob("beta_*/eval.csv"), key=lambda p: float(p.parent.name.split("_", 1)[1]))
    frames = [(f"β = {p.parent.name.split('_', 1)[1]}", read_log(p)) for p in arms]
    panels = [Panel([(frame, "step", column, label, "o-") for label, frame in frames], title=title, ylabel=ylabel)
              for column, title, ylabel in (
                  ("objective/oracle", "alliteration (the reward)", "adjacent same-letter words"),
                  ("eval/distinct_2", "diversity", "distinct-2 of held-out samples"),
                  ("objective/kl", "KL to the SFT model", "nats / response"))]
    return plot(work / "kl_collapse.png", panels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.3], help="KL coefficients, one arm each")
    parser.add_argument("--algo", default="rloo", choices=["rloo", "ppo"], help="RL algorithm (default rloo)")
    parser.add_argument("--steps", type=int, default=80, help="most steps per arm")
    parser.add_argument("--budget-s", type=float, default=1200, help="training seconds per arm (same for all)")
    parser.add_argument("--batch-size", type=int, default=16, help="rollouts per step (RLOO: 4 prompts x 4)")
    parser.add_argument("--response-length", type=int, default=16, help="new tokens per response")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="learning rate (2e-3 collapses beta = 0 by step 20 but makes every beta > 0 arm drift)")
    parser.add_argument("--eval-size", type=int, default=16, help="held-out prompts")
    parser.add_argument("--model", default="default", help="base model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed (same for every arm)")
    parser.add_argument("--report", metavar="DIR", help="only print the table and redraw the figure of DIR's arms")
    args = parser.parse_args()
    if args.report:
        report(Path(args.report))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from policy.trainer import PPOConfig, train_policy

    work = Path(args.out or tempfile.mkdtemp(prefix="kl-collapse-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = story_prompts(work / "story_prompts.jsonl")
    for beta in args.betas:
        t0 = time.time()
        summary = train_policy(PPOConfig(
            prompts=str(prompts), out=str(work / f"beta_{beta:g}"), reward="alliteration", model=args.model,
            algo=args.algo, steps=args.steps, batch_size=args.batch_size, response_length=args.response_length,
            lr=args.lr, kl_coef=beta, eval_every=10, eval_size=args.eval_size, eval_fraction=0.2,
            missing_eos_penalty=None,  # 32 tokens rarely finish a story: keep the oracle's score
            max_steps_time=args.budget_s, seed=args.seed))
        summary["beta"], summary["wall_s"] = beta, time.time() - t0
        samples = [json.loads(x) for x in Path(summary["samples"]).read_text().splitlines()]
        summary["example"] = samples[0]["policy"]["completion"]
        summary["sft_example"] = samples[0]["reference"]["completion"]
        summary["setup"] = (f"{args.algo.upper()}, alliteration oracle, {args.model}, batch {args.batch_size}, "
                            f"{args.response_length} tokens, lr {args.lr:g}, at most {args.steps} steps and "
                            f"{args.budget_s:.0f} s per arm")
        (work / f"beta_{beta:g}" / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"arm beta={beta:g}: {summary['steps']} steps in {summary['wall_s']:.0f} s", flush=True)
    report(work)


def report(work: Path) -> None:
    """The table, the targets and the figure from every arm's summary.json in `work` (beta 0 first)."""
    results = sorted((json.loads(p.read_text()) for p in work.glob("beta_*/summary.json")), key=lambda r: r["beta"])
    sft = results[0]["reference"]
    print(f"\n{results[0]['setup']}; uptime {os.popen('uptime').read().strip()}\n")
    print("| model | steps | oracle (alliteration) | vs SFT | distinct-2 | vs SFT | KL (nats) | entropy |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| SFT (reference) | 0 | {sft['objective/oracle']:.2f} | 1.00x | {sft['eval/distinct_2']:.3f} | 1.00x "
          f"| 0 | {sft['policy/entropy']:.2f} |")
    for r in results:
        f = r["final"]
        print(f"| beta={r['beta']:g} | {r['steps']} | {f['objective/oracle']:.2f} | "
              f"{f['objective/oracle'] / max(sft['objective/oracle'], 1e-9):.2f}x | {f['eval/distinct_2']:.3f} | "
              f"{f['eval/distinct_2'] / max(sft['eval/distinct_2'], 1e-9):.2f}x | {f['objective/kl']:.2f} | "
              f"{f['policy/entropy']:.2f} |")
    print()
    if results[0]["beta"] == 0:
        collapse = results[0]["final"]["eval/distinct_2"] < 0.5 * sft["eval/distinct_2"]
        print(f"beta=0 collapse (distinct-2 < 0.5x SFT): {'MET' if collapse else 'MISSED'}")
    for r in results:
        if r["beta"] == 0:
            continue
        f = r["final"]
        ok = (f["objective/oracle"] >= 1.3 * sft["objective/oracle"],
              f["eval/distinct_2"] >= 0.8 * sft["eval/distinct_2"], f["objective/kl"] < 5)
        print(f"beta={r['beta']:g}: oracle >= 1.3x SFT {'MET' if ok[0] else 'MISSED'}, distinct-2 >= 0.8x SFT "
              f"{'MET' if ok[1] else 'MISSED'}, KL < 5 nats {'MET' if ok[2] else 'MISSED'}")
    print("\nfirst held-out prompt:")
    print(f"  SFT:    {results[0]['sft_example']!r}")
    for r in results:
        print(f"  beta={r['beta']:g}: {r['example']!r}")
    print(f"\nfigure: {plot_arms(work)}\nruns in {work}")


if __name__ == "__main__":
    main()
