"""Labeling statistics: progress, per-annotator throughput, and inter-annotator agreement.

Agreement is measured on tasks ranked by two or more annotators, for every pair of annotators that
shares a task:
- pairwise agreement: of the completion pairs that both annotators order strictly (a tie by either
  gives no comparison), the fraction they order the same way; pooled over all shared tasks.
- Kendall's tau-b between the two rank vectors of a shared task (tau-b corrects for ties; 1 = same
  order, -1 = reversed), averaged over all (task, annotator pair) instances.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from itertools import combinations
from typing import Sequence

from labeling.store import LabelStore


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared) over the index pairs that both rank vectors order strictly (rank 1 best)."""
    agree = compared = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da and db:
            compared += 1
            agree += (da > 0) == (db > 0)
    return agree, compared


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Kendall's tau-b of two rank vectors: (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)).

    None when either vector is all ties (the coefficient is undefined)."""
    if len(a) != len(b):
        raise ValueError("rank vectors must have the same length")
    concordant, compared = pair_agreement(a, b)  # discordant = compared - concordant
    untied_a, untied_b = (sum(v[i] != v[j] for i, j in combinations(range(len(v)), 2)) for v in (a, b))
    denominator = math.sqrt(untied_a * untied_b)  # sqrt((n0 - ties_a)(n0 - ties_b))
    return None if denominator == 0 else (2 * concordant - compared) / denominator


def compute_stats(store: LabelStore, overlap: int = 2) -> dict:
    """Progress at `overlap`, per-annotator counts with median seconds per ranked task, and agreement
    (see the module docstring). ADMIN/CLI ONLY: it reads every annotator's rankings."""
    progress = store.progress(overlap)
    rankings = store.export_rankings()
    seconds: dict[str, list[float]] = defaultdict(list)
    by_task: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for r in rankings:
        if r.seconds is not None:
            seconds[r.annotator].append(r.seconds)
        by_task[r.task_id][r.annotator] = r.ranks

    by_pair: dict[tuple[str, str], dict] = {}
    total_agree = total_compared = 0
    taus: list[float] = []
    shared_tasks = 0
    for task_rankings in by_task.values():
        if len(task_rankings) < 2:
            continue
        shared_tasks += 1
        for name_a, name_b in combinations(sorted(task_rankings), 2):
            ids = sorted(task_rankings[name_a])
            a = [task_rankings[name_a][i] for i in ids]
            b = [task_rankings[name_b][i] for i in ids]
            agree, compared = pair_agreement(a, b)
            tau = kendall_tau_b(a, b)
            entry = by_pair.setdefault((name_a, name_b), {"agree": 0, "compared": 0, "taus": [], "tasks": 0})
            entry["agree"] += agree
            entry["compared"] += compared
            entry["tasks"] += 1
            total_agree += agree
            total_compared += compared
            if tau is not None:
                entry["taus"].append(tau)
                taus.append(tau)

    return {
        "tasks": progress.tasks,
        "overlap": overlap,
        "complete": progress.complete,
        "rankings": progress.rankings,
        "skips": progress.skips,
        "annotators": [
            {"name": a.annotator, "ranked": a.ranked, "skipped": a.skipped,
             "median_seconds": statistics.median(seconds[a.annotator]) if seconds[a.annotator] else None}
            for a in progress.annotators
        ],
        "agreement": {
            "shared_tasks": shared_tasks,
            "pairwise_agreement": total_agree / total_compared if total_compared else None,
            "mean_kendall_tau": statistics.fmean(taus) if taus else None,
            "by_pair": [
                {"annotators": [a, b], "shared_tasks": e["tasks"],
                 "pairwise_agreement": e["agree"] / e["compared"] if e["compared"] else None,
                 "mean_kendall_tau": statistics.fmean(e["taus"]) if e["taus"] else None}
                for (a, b), e in sorted(by_pair.items())
            ],
        },
    }


def format_stats(stats: dict) -> str:
    """A short human-readable report of `compute_stats` output (what `rlhf stats` prints)."""
    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    lines = [f"tasks: {stats['tasks']}  complete at overlap {stats['overlap']}: {stats['complete']}  "
             f"rankings: {stats['rankings']}  skips: {stats['skips']}"]
    if stats["annotators"]:
        width = max(9, *(len(a["name"]) for a in stats["annotators"]))
        lines.append(f"{'annotator':<{width}}  {'ranked':>6}  {'skipped':>7}  {'median s/task':>13}")
        for a in stats["annotators"]:
            lines.append(f"{a['name']:<{width}}  {a['ranked']:>6}  {a['skipped']:>7}  "
                         f"{num(a['median_seconds'], '{:.1f}'):>13}")
    agreement = stats["agreement"]
    lines.append(f"agreement on {agreement['shared_tasks']} shared tasks: pairwise "
                 f"{num(agreement['pairwise_agreement'])}, mean Kendall tau {num(agreement['mean_kendall_tau'])}")
    for entry in agreement["by_pair"]:
        a, b = entry["annotators"]
        lines.append(f"  {a} vs {b}: {entry['shared_tasks']} tasks, pairwise {num(entry['pairwise_agreement'])}, "
                     f"tau {num(entry['mean_kendall_tau'])}")
    return "\n".join(lines)
