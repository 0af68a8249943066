"""Scripted annotators: rank the pending tasks with an oracle, through the same store API as the app.

`simulate` creates annotators `sim-1..sim-N` (accounts without a password: they cannot log in) and
lets them take turns calling `next_task` + `submit_ranking`, exactly like people in the browser,
until the queue is empty for all of them.

Ties. Completions whose oracle scores are within `tie_margin` of each other (exactly equal with the
default 0) are one tie group and get the same rank, as a person marks two equally good answers as a
tie; the store, pair expansion and export then drop those comparisons. Breaking them at random would
put coin-flip pairs into both the training and the held-out data (with the alliteration count, a
quarter of all pairs) and cap every reward model's accuracy far below 1.

Noise model. For a task with oracle scores s_1..s_K, a ranking is a Plackett-Luce sample with
logits s_i / T, drawn with the Gumbel-max trick (sort s_i / T + Gumbel noise). The temperature is
T = noise * (max s - min s): `noise` is measured in units of the task's own score range, so it
means the same for any oracle scale. In a pairwise view the task's best completion is put above its
worst with probability sigmoid(1 / noise): noise=0.1 -> 0.99995, 0.5 -> 0.88, 1 -> 0.73. noise=0
sorts by score. The noise orders the tie groups (each with its mean score); a task whose completions
all tie is skipped ("all completions equally good"), as a person would skip it.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from labeling.store import SQLLabelStore
from rlhf.errors import UserError
from rlhf.oracles import Oracle
from rlhf.records import Task, last_user_turn


def oracle_scores(oracle: Oracle, task: Task) -> list[float]:
    """The oracle's score of each completion of `task` (a non-finite or non-numeric score is a UserError)."""
    scores = []
    for completion in task.completions:
        value = oracle(last_user_turn(task.prompt), completion.text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"oracle returned {value!r} for a completion of task {task.id!r}; it must return a "
                            f"finite number")
        scores.append(float(value))
    return scores


def tie_groups(scores: list[float], tie_margin: float = 0.0) -> list[list[int]]:
    """Indices of `scores` grouped into ties, groups in increasing score order: sorted by score, a
    completion joins the current group while it is within `tie_margin` of the group's lowest score."""
    if tie_margin < 0:
        raise ValueError("tie_margin must be >= 0")
    groups: list[list[int]] = []
    for i in sorted(range(len(scores)), key=lambda i: scores[i]):
        if groups and scores[i] - scores[groups[-1][0]] <= tie_margin:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def sample_order(scores: list[float], noise: float, rng: random.Random) -> list[int]:
    """Indices of `scores` from best to worst: a Plackett-Luce sample at temperature noise * score range
    (see the module docstring); noise=0 sorts by score. Equal scores are ordered at random."""
    if noise < 0:
        raise ValueError("noise must be >= 0")
    spread = max(scores) - min(scores)
    if noise == 0 or spread == 0:
        keys = scores  # equal logits: the random tie-break key alone makes a uniform permutation
    else:
        temperature = noise * spread
        # Gumbel-max: argsort of logits + Gumbel(0, 1) is a Plackett-Luce sample of the softmax(logits).
        keys = [s / temperature - math.log(-math.log(rng.random() or 1e-300)) for s in scores]
    tiebreak = [rng.random() for _ in scores]
    return sorted(range(len(scores)), key=lambda i: (-keys[i], tiebreak[i]))


def sample_ranks(scores: list[float], noise: float, tie_margin: float, rng: random.Random) -> list[int]:
    """Dense ranks (1 best) of one scripted ranking: tie groups (`tie_groups`) share a rank, and the
    groups are ordered by `sample_order` on their mean scores."""
    groups = tie_groups(scores, tie_margin)
    order = sample_order([sum(scores[i] for i in g) / len(g) for g in groups], noise, rng)
    ranks = [0] * len(scores)
    for rank, group in enumerate(order, start=1):
        for i in groups[group]:
            ranks[i] = rank
    return ranks


def simulate(store: SQLLabelStore, oracle: Oracle, annotators: int = 3, overlap: int = 2, noise: float = 0.1,
             seed: int = 0, on_progress: Callable[[int], None] | None = None, tie_margin: float = 0.0,
             next_task: Callable[[str, int], Task | None] | None = None,
             after_ranking: Callable[[int], None] | None = None) -> dict:
    """Rank every pending task with `annotators` scripted annotators until the queue is empty for all.

    `next_task(annotator, overlap)` serves the tasks (default: the store's queue; active labeling passes
    `ActiveQueue.next_task`); `after_ranking(n)` is called after the n-th stored ranking (active labeling
    retrains the reward model there: `labeling.active.RetrainingLoop`).

    Annotators take turns (one task each per turn), as people working in parallel would. Each one's
    random stream is seeded by (seed, name), so a run is reproducible. `on_progress(1)` is called after
    each stored ranking. Returns a summary: rankings stored, per-annotator counts, the fraction of
    compared completion pairs that agree with the oracle, and the store's totals afterwards.
    """
    if annotators < 1:
        raise UserError("--annotators must be at least 1")
    if overlap < 1:
        raise UserError("--overlap must be at least 1")
    if overlap > annotators:
        raise UserError(f"--overlap {overlap} needs at least {overlap} annotators, got {annotators}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise UserError("--noise must be a finite number >= 0")
    if not (tie_margin >= 0 and math.isfinite(tie_margin)):
        raise UserError("--tie-margin must be a finite number >= 0")
    names = [f"sim-{i}" for i in range(1, annotators + 1)]
    for name in names:
        if not store.has_annotator(name):
            store.add_annotator(name)  # a scripted account: no password, it cannot sign in
    rngs = {name: random.Random(f"{seed}\x00{name}") for name in names}
    counts = {name: 0 for name in names}
    agree = compared = skipped = 0
    serve = next_task or store.next_task
    active = list(names)
    while active:
        for name in list(active):
            task = serve(name, overlap)
            if task is None:
                active.remove(name)
                continue
            scores = oracle_scores(oracle, task)
            ranks = sample_ranks(scores, noise, tie_margin, rngs[name])
            if len(set(ranks)) == 1:
                # Nothing to compare: a person skips such a task, and the store refuses an all-tied ranking.
                store.skip_task(name, task.id, reason="all completions equally good")
                skipped += 1
                continue
            store.submit_ranking(name, task.id, {c.id: r for c, r in zip(task.completions, ranks)})
            counts[name] += 1
            if after_ranking is not None:
                after_ranking(sum(counts.values()))
            for a in range(len(ranks)):
                for b in range(len(ranks)):
                    if ranks[a] < ranks[b] and scores[a] != scores[b]:
                        compared += 1
                        agree += scores[a] > scores[b]
            if on_progress is not None:
                on_progress(1)
    progress = store.progress(overlap)
    return {
        "annotators": counts,
        "rankings": sum(counts.values()),
        "skipped": skipped,
        "oracle_agreement": agree / compared if compared else None,
        "tasks": progress.tasks,
        "complete": progress.complete,
        "overlap": overlap,
        "noise": noise,
        "tie_margin": tie_margin,
        "seed": seed,
    }
