"""Scripted annotators: rank the pending tasks with an oracle, through the same store API as the app.

`simulate` creates annotators `sim-1..sim-N` (accounts without a password: they cannot log in) and
lets them take turns calling `next_task` + `submit_ranking`, exactly like people in the browser,
until the queue is empty for all of them. Each ranking is strict (no ties).

Noise model. For a task with oracle scores s_1..s_K, a ranking is a Plackett-Luce sample with
logits s_i / T, drawn with the Gumbel-max trick (sort s_i / T + Gumbel noise). The temperature is
T = noise * (max s - min s): `noise` is measured in units of the task's own score range, so it
means the same for any oracle scale. In a pairwise view the task's best completion is put above its
worst with probability sigmoid(1 / noise): noise=0.1 -> 0.99995, 0.5 -> 0.88, 1 -> 0.73. noise=0
sorts by score. Equal scores (and tasks whose completions all score the same) are ordered at random.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from labeling.store import LabelStore
from rlhf.errors import UserError
from rlhf.oracles import Oracle
from rlhf.records import Task


def oracle_scores(oracle: Oracle, task: Task) -> list[float]:
    """The oracle's score of each completion of `task` (a non-finite or non-numeric score is a UserError)."""
    scores = []
    for completion in task.completions:
        value = oracle(task.prompt, completion.text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"oracle returned {value!r} for a completion of task {task.id!r}; it must return a finite number")
        scores.append(float(value))
    return scores


def sample_order(scores: list[float], noise: float, rng: random.Random) -> list[int]:
    """Indices of `scores` from best to worst: a Plackett-Luce sample at temperature noise * score range
    (see the module docstring); noise=0 sorts by score. Ties are broken at random."""
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


def simulate(store: LabelStore, oracle: Oracle, annotators: int = 3, overlap: int = 2, noise: float = 0.1,
             seed: int = 0, on_progress: Callable[[int], None] | None = None) -> dict:
    """Rank every pending task with `annotators` scripted annotators until the queue is empty for all.

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
    names = [f"sim-{i}" for i in range(1, annotators + 1)]
    for name in names:
        if not store.has_annotator(name):
            store.add_annotator(name, None)
    rngs = {name: random.Random(f"{seed}\x00{name}") for name in names}
    counts = {name: 0 for name in names}
    agree = compared = 0
    active = list(names)
    while active:
        for name in list(active):
            task = store.next_task(name, overlap)
            if task is None:
                active.remove(name)
                continue
            scores = oracle_scores(oracle, task)
            order = sample_order(scores, noise, rngs[name])
            ranks = {task.completions[i].id: position + 1 for position, i in enumerate(order)}
            store.submit_ranking(name, task.id, ranks)
            counts[name] += 1
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    if scores[order[a]] != scores[order[b]]:
                        compared += 1
                        agree += scores[order[a]] > scores[order[b]]
            if on_progress is not None:
                on_progress(1)
    progress = store.progress(overlap)
    return {
        "annotators": counts,
        "rankings": sum(counts.values()),
        "oracle_agreement": agree / compared if compared else None,
        "tasks": progress.tasks,
        "complete": progress.complete,
        "overlap": overlap,
        "noise": noise,
        "seed": seed,
    }
