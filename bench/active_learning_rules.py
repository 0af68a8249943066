"""Active-labeling rules compared over many seeds, on a reward model that trains in milliseconds.

    .venv/bin/python bench/active_learning_rules.py [--k 4] [--task-size 4] [--oracle descriptive] [--budget 80]
        [--every 20] [--seeds 16]

`bench/active_learning.py` measures the product's loop with the real reward model, but one training per
round makes a seed cost minutes, and one seed cannot separate rules whose curves differ by a point. Here
the reward model is a read-out of the product's kind (the hidden state a third of the way up, mean over the
completion) of the FROZEN base model, with a Bradley-Terry logistic head
refit each round: the same data, annotators and rounds as `bench/active_learning.py` (the cached SFT
completions; `--oracle`, the demo's `descriptive` by default, as one scripted annotator with noise 0.1,
overlap 1; 20% of the prompts held out and ranked without noise; every rule's first round in the same random
order; tasks whose completions all tie skipped), so the rules are compared over many seeds in a few minutes.
`--task-size` splits each prompt's K cached completions into several tasks, for a pool several times the budget.

Rules (each orders the unranked tasks after every refit; r = the head's rewards, p_ij = sigmoid(r_i - r_j)):
- random: `labeling.active.random_key`, the product's seeded order;
- margin: the product's `--order uncertainty`, the smallest gap between adjacent rewards first
  (`labeling.active.reward_margin`);
- pair-variance: the largest sum over the task's C(K,2) pairs of p_ij (1 - p_ij), every pair's
  uncertainty rather than the closest one's;
- information: the product's `--order information` (`reward_model.posterior.information_order`): the
  expected information gain about the head under its Laplace posterior (MacKay 1992; the D-optimal design
  criterion), 1/2 log det(I + G A^-1 G^T) with A the posterior precision and G's rows sqrt(p_ij (1 - p_ij)) d_ij
  over the task's pairs (d: feature differences). It weighs a pair's closeness by how little the ranked pairs
  already say about its direction, which the margin cannot tell from a true tie;
- information-batch: the same gain, but the round's `--every` tasks chosen greedily as one batch, each pick's
  G^T G added to A before the rest are scored again (batch-mode D-optimal design, Hoi et al. 2006), so that a
  round is not spent on near-copies of one uncertain direction.

Printed: mean held-out accuracy per round (tasks skipped in brackets), each rule's paired difference from
random (same seed) with its standard error over seeds, and the rankings each needs to reach random's final
mean accuracy (interpolated between rounds).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from active_learning import rankings_to_reach  # noqa: E402
from rm_quality import (  # noqa: E402
    FrozenFeatures,
    accuracy,
    cached_tasks,
    comparisons,
    fit_pairwise_logistic,
    oracle_rankings,
)

from reward_model.posterior import PRIOR  # noqa: E402

RULES = ("random", "margin", "pair-variance", "information", "information-batch")


def order_tasks(rule: str, open_tasks: list[str], features: dict, w, pairs, seed: int, batch: int) -> list[str]:
    """The unranked tasks in the rule's serving order (`pairs`: the ranked pairs' feature differences; `batch`:
    the rankings until the next refit)."""
    import torch

    from labeling.active import random_key, reward_margin
    from reward_model.posterior import information_order, information_terms

    tie_break = {t: random_key(seed, t) for t in open_tasks}
    if rule == "random" or w is None:
        return sorted(open_tasks, key=tie_break.get)
    if rule == "margin":
        return sorted(open_tasks, key=lambda t: (reward_margin((features[t] @ w).tolist()), tie_break[t]))
    k = next(iter(features.values())).shape[0]
    i, j = torch.combinations(torch.arange(k), 2).unbind(1)
    if rule == "pair-variance":
        def score(t):
            p = torch.sigmoid(features[t][i] @ w - features[t][j] @ w)
            return float((p * (1 - p)).sum())
        return sorted(open_tasks, key=lambda t: (-score(t), tie_break[t]))
    candidates = [features[t][i] - features[t][j] for t in open_tasks]
    if rule == "information":
        order = information_order(candidates, pairs, w)
    else:
        order = greedy_information_batch(*information_terms(candidates, pairs, w), batch)
    return [open_tasks[n] for n in order]


def greedy_information_batch(g, covariance, batch: int) -> list[int]:
    """Task indices: `batch` picked greedily by joint information gain, then the rest by their gain after that
    batch (g [T, P, H] and A^-1 as `reward_model.posterior.information_terms`)."""
    import torch

    m = g @ covariance  # G A^-1 per task, kept up to date as picks are added
    s = torch.eye(g.shape[1], dtype=g.dtype) + m @ g.transpose(1, 2)  # I + G A^-1 G^T
    taken = torch.zeros(len(g), dtype=torch.bool)
    chosen: list[int] = []
    for _ in range(min(batch, len(g))):
        best = int(torch.logdet(s).masked_fill(taken, float("-inf")).argmax())
        chosen.append(best)
        taken[best] = True
        # Woodbury: (A + G_b^T G_b)^-1 = A^-1 - A^-1 G_b^T S_b^-1 G_b A^-1
        correction = (m @ g[best].T) @ torch.linalg.solve(s[best], m[best])
        s = s - correction @ g.transpose(1, 2)
        m = m - correction
    gains = torch.logdet(s)  # after the batch's information
    return chosen + sorted((t for t in range(len(g)) if not taken[t]), key=lambda t: -float(gains[t]))


def run_rule(rule: str, seed: int, pool: list[dict], features: dict, scores: dict, test_x, args) -> list[tuple]:
    """[(rankings, held-out accuracy, skips)] after each refit."""
    import torch

    from labeling.simulate import sample_ranks
    from rlhf.pairs import pair_indices

    annotator = random.Random(f"{seed}-annotator")
    queue = order_tasks("random", [t["id"] for t in pool], features, None, None, seed, args.every)
    ranked, skips, curve = 0, 0, []
    pairs = torch.zeros(0, next(iter(features.values())).shape[1])
    while ranked < args.budget and queue:
        task = queue.pop(0)
        ranks = sample_ranks(scores[task], args.noise, 0.0, annotator)
        if len(set(ranks)) < 2:
            skips += 1
            continue
        ranked += 1
        f = features[task]
        pairs = torch.cat([pairs, torch.stack([f[b] - f[w] for b, w in pair_indices(ranks)])])
        if ranked % args.every == 0:
            w = fit_pairwise_logistic(pairs, args.l2)
            curve.append((ranked, accuracy((test_x @ w).tolist()), skips))  # a tie counts half, as everywhere
            queue = order_tasks(rule, queue, features, w, pairs, seed, args.every)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--oracle", default="descriptive")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt, generated once and cached by "
                        "rm_quality (K = 16: 17 minutes on 2 cores)")
    parser.add_argument("--task-size", type=int, help="split each cached prompt's K completions into tasks of this "
                        "many (8 -> two tasks of 4): a pool several times the budget (default: K)")
    parser.add_argument("--budget", type=int, default=80, help="rankings per rule and seed")
    parser.add_argument("--every", type=int, default=20, help="rankings between refits")
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0..N-1")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--l2", type=float, default=PRIOR / 2, help="the head's L2 penalty (features standardised; "
                        "the information rules' prior is reward_model.posterior.PRIOR = 2 x its default)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from rlhf.layer_request import resolve_layer
    from rlhf.models import resolve_model
    from rlhf.oracles import load_oracle

    torch.set_num_threads(args.threads)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    depth = AutoConfig.from_pretrained(resolve_model(args.model)).num_hidden_layers
    layer = resolve_layer(0.33, depth) or depth
    tasks = cached_tasks(args.model, args.k, 32)
    table = FrozenFeatures(args.model, tasks).table
    oracle = load_oracle(args.oracle)
    test_rows = [r for r in oracle_rankings(tasks, oracle, 0.2, 0) if r["split"] == "test"]
    size = args.task_size or args.k
    if args.k % size:
        raise SystemExit(f"--task-size {size} must divide --k {args.k}")
    pool = [{**t, "id": f"{t['id']}-{i // size}", "completions": t["completions"][i:i + size]}
            for t in tasks if t["prompt"] not in {r["prompt"] for r in test_rows} for i in range(0, args.k, size)]
    raw = {t["id"]: torch.stack([table[((t["prompt"], c["text"]), "mean", layer)]
                                 for c in t["completions"]]) for t in pool}
    scale = torch.cat(list(raw.values())).abs().mean(0) + 1e-6  # one L2 penalty fits every dimension
    features = {t: f / scale for t, f in raw.items()}
    test_pairs = comparisons(test_rows)
    test_x = torch.stack([table[((p, b), "mean", layer)] - table[((p, w), "mean", layer)]
                          for p, b, w in test_pairs]) / scale
    scores = {t["id"]: [float(oracle(t["prompt"], c["text"])) for c in t["completions"]] for t in pool}
    rankable = sum(len(set(s)) > 1 for s in scores.values())
    print(f"K={args.k} in tasks of {size}: {len(pool)} tasks to label ({rankable} not all-tied), "
          f"{len(test_pairs)} held-out pairs; read-out mean@{layer} of the frozen base model; "
          f"budget {args.budget}, refit every {args.every}, {args.seeds} seeds", flush=True)

    curves = {rule: [run_rule(rule, seed, pool, features, scores, test_x, args) for seed in range(args.seeds)]
              for rule in args.rules}
    rounds = [n for n, _, _ in curves[args.rules[0]][0]]
    mean = {rule: [statistics.mean(c[i][1] for c in cs) for i in range(len(rounds))] for rule, cs in curves.items()}
    print("\n| rankings | " + " | ".join(args.rules) + " |")
    print("|---:|" + "---:|" * len(args.rules))
    for i, n in enumerate(rounds):
        cells = [f"{mean[r][i]:.3f} ({statistics.mean(c[i][2] for c in curves[r]):.0f})" for r in args.rules]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if "random" not in curves:
        return
    print("\npaired difference from random (same seed), mean +- standard error over seeds:")
    for rule in args.rules:
        if rule == "random":
            continue
        cells = []
        for i, n in enumerate(rounds):
            d = [c[i][1] - r[i][1] for c, r in zip(curves[rule], curves["random"])]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            cells.append(f"{n}: {statistics.mean(d):+.3f} +- {se:.3f}")
        print(f"  {rule:13s} " + ", ".join(cells))
    target = mean["random"][-1]
    print(f"\nrankings to reach random's final mean accuracy {target:.3f}:")
    for rule in args.rules:
        points = [{"rankings": n, "accuracy": a} for n, a in zip(rounds, mean[rule])]
        _, interpolated = rankings_to_reach(points, target)
        reached = f"{interpolated:.0f} ({interpolated / rounds[-1]:.0%} of random's)" if interpolated else "not reached"
        print(f"  {rule:13s} {reached}")


if __name__ == "__main__":
    main()
