"""Labeling statistics: progress, per-annotator throughput, and inter-annotator agreement, as pandas
DataFrames (`stats_tables`: per annotator, per task, per annotator pair) and as the summary dict that
`rlhf stats --json`, the app's admin view and the demo report read (`compute_stats`).

Agreement is measured on tasks ranked by two or more annotators, for every pair of annotators that
shares a task:
- pairwise agreement: of the completion pairs that both annotators order strictly (a tie by either
  gives no comparison), the fraction they order the same way; pooled over all shared tasks.
- Kendall's tau-b between the two rank vectors of a shared task (tau-b corrects for ties; 1 = same
  order, -1 = reversed), averaged over all (task, annotator pair) instances.

Flags (`flag_counts`): how many rankings and skips carry each flag annotators set (`rlhf label --flags`).

Per annotator (`annotator_table`, `rlhf stats --by annotator`; docs/metrics.md, "Annotators"):
- gold accuracy: over the completion pairs a gold question's answer orders strictly, the share the annotator
  ordered the same way, a tie counted half (`gold_agreement`), pooled over the gold questions they answered;
  an annotator under the gold threshold is flagged;
- leave-one-out agreement: on tasks others ranked too, the share of the completion pairs the annotator orders
  strictly that the majority of the other annotators orders the same way (pairs the others tie on, or split
  evenly, are left out);
- tie share: rankings with at least one tie (an all-tied ranking is refused at submit); first-shown-first
  share: rankings that give the completion shown first (the annotator's display order) rank 1, about 1/K
  for an annotator without a position bias.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from labeling.store import SQLLabelStore, display_order

GOLD_THRESHOLD = 0.7
"""Gold accuracy under which an annotator is flagged (`--gold-threshold` of `rlhf label` and `rlhf stats`)."""


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared) over the index pairs that both rank vectors order strictly (rank 1 best)."""
    agree = compared = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da and db:
            compared += 1
            agree += (da > 0) == (db > 0)
    return agree, compared


def gold_agreement(ranks: Sequence[int], gold: Sequence[int]) -> tuple[float, int]:
    """(credit, pairs): over the index pairs the gold answer orders strictly, 1 for each the ranking orders the
    same way and 1/2 for each it ties (rank 1 best)."""
    credit, pairs = 0.0, 0
    for i, j in combinations(range(len(gold)), 2):
        dg = gold[i] - gold[j]
        if dg:
            pairs += 1
            dr = ranks[i] - ranks[j]
            credit += 0.5 if dr == 0 else float((dr > 0) == (dg > 0))
    return credit, pairs


def leave_one_out_agreement(own: dict[str, int], others: list[dict[str, int]]) -> tuple[int, int]:
    """(agreeing, compared): the completion pairs `own` orders strictly on which the other annotators' majority
    (more of them one way than the other) orders the same way; pairs without a majority are not compared."""
    ids = sorted(own)
    agree = compared = 0
    for a, b in combinations(ids, 2):
        mine = own[a] - own[b]
        if not mine:
            continue
        votes = sum((r[a] < r[b]) - (r[a] > r[b]) for r in others)  # > 0: the others put a first
        if votes:
            compared += 1
            agree += (votes > 0) == (mine < 0)
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


def _comparisons(rankings: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, annotator pair) where both ranked the task: agree, compared, tau (NaN when undefined)."""
    rows = []
    for task_id, task in rankings.groupby("task_id", sort=False):
        ranks = dict(zip(task["annotator"], task["ranks"]))
        for name_a, name_b in combinations(sorted(ranks), 2):
            ids = sorted(ranks[name_a])
            a = [ranks[name_a][i] for i in ids]
            b = [ranks[name_b][i] for i in ids]
            agree, compared = pair_agreement(a, b)
            tau = kendall_tau_b(a, b)
            rows.append({"task_id": task_id, "annotator_a": name_a, "annotator_b": name_b, "agree": agree,
                         "compared": compared, "tau": math.nan if tau is None else tau})
    return pd.DataFrame(rows, columns=["task_id", "annotator_a", "annotator_b", "agree", "compared", "tau"])


def _agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """Pooled pairwise agreement (NaN where nothing was compared) and mean tau of comparison rows."""
    out = pd.DataFrame({"pairwise_agreement": frame["agree"] / frame["compared"].where(frame["compared"] > 0)})
    return out.assign(mean_kendall_tau=frame["tau"])


def stats_tables(store: SQLLabelStore, overlap: int = 2) -> dict[str, pd.DataFrame]:
    """The tables of `rlhf stats` (see the module docstring for agreement). ADMIN/CLI ONLY: it reads every
    annotator's rankings.

    - annotators: annotator, ranked, skipped, median_seconds (per ranked task, where the client sent times);
    - tasks: one row per ranked task: task_id, rankings, annotators, median_seconds, pairwise_agreement,
      mean_kendall_tau (over the task's annotator pairs; empty with fewer than two rankings);
    - agreement: one row per annotator pair sharing a task: annotator_a, annotator_b, shared_tasks,
      pairwise_agreement, mean_kendall_tau;
    - flags: one row per flag set on a ranking or a skip, most used first: flag, rankings, skips (`flag_counts`).
    """
    tables = _tables(store, overlap)[0]
    tables["flags"] = pd.DataFrame([{"flag": flag, **counts} for flag, counts in flag_counts(store.notes()).items()],
                                   columns=["flag", "rankings", "skips"])
    return tables


def _tables(store: SQLLabelStore, overlap: int):
    progress = store.progress(overlap)
    rankings = pd.DataFrame([{"task_id": r.task_id, "annotator": r.annotator, "seconds": r.seconds,
                              "ranks": dict(r.ranks)} for r in store.export_rankings()],
                            columns=["task_id", "annotator", "seconds", "ranks"])
    rankings["seconds"] = pd.to_numeric(rankings["seconds"])
    comparisons = _comparisons(rankings)

    annotators = pd.DataFrame([{"annotator": a.annotator, "ranked": a.ranked, "skipped": a.skipped}
                               for a in progress.annotators], columns=["annotator", "ranked", "skipped"])
    median_seconds = rankings.groupby("annotator")["seconds"].median()
    annotators["median_seconds"] = annotators["annotator"].map(median_seconds).astype(float)

    tasks = rankings.groupby("task_id", sort=False).agg(
        rankings=("annotator", "size"), annotators=("annotator", lambda names: ", ".join(sorted(names))),
        median_seconds=("seconds", "median"))
    by_task = comparisons.groupby("task_id").agg(agree=("agree", "sum"), compared=("compared", "sum"),
                                                 tau=("tau", "mean"))
    tasks = tasks.join(_agreement(by_task)).reset_index()

    by_pair = comparisons.groupby(["annotator_a", "annotator_b"]).agg(
        shared_tasks=("task_id", "size"), agree=("agree", "sum"), compared=("compared", "sum"), tau=("tau", "mean"))
    agreement = by_pair[["shared_tasks"]].join(_agreement(by_pair)).reset_index()
    return {"annotators": annotators, "tasks": tasks, "agreement": agreement}, progress, comparisons


ANNOTATOR_COLUMNS = ["annotator", "ranked", "skipped", "median_seconds", "gold_tasks", "gold_accuracy", "flagged",
                     "loo_tasks", "loo_agreement", "tie_share", "first_shown_first_share"]


def annotator_table(store: SQLLabelStore, gold_threshold: float = GOLD_THRESHOLD) -> pd.DataFrame:
    """One row per annotator (see the module docstring): ranked, skipped, median_seconds, gold_tasks,
    gold_accuracy, flagged (gold accuracy under `gold_threshold`), loo_tasks and loo_agreement (leave-one-out),
    tie_share, first_shown_first_share. ADMIN/CLI ONLY: it reads every annotator's rankings."""
    progress = {p.annotator: p for p in store.progress(1).annotators}
    rankings = store.export_rankings()
    gold = store.gold_answers()
    by_task: dict[str, list] = {}
    for r in rankings:
        by_task.setdefault(r.task_id, []).append(r)
    rows = {name: {"annotator": name, "ranked": p.ranked, "skipped": p.skipped, "seconds": [], "gold_credit": 0.0,
                   "gold_pairs": 0, "gold_tasks": 0, "loo_agree": 0, "loo_compared": 0, "loo_tasks": 0, "tied": 0,
                   "first": 0} for name, p in progress.items()}
    for r in rankings:
        row = rows[r.annotator]
        if r.seconds is not None:
            row["seconds"].append(r.seconds)
        row["tied"] += len(set(r.ranks.values())) < len(r.ranks)
        row["first"] += r.ranks[display_order(r.annotator, r.task_id, r.ranks)[0]] == 1
        if r.task_id in gold:
            answer, source = gold[r.task_id]
            if r.annotator != source:
                ids = sorted(answer)
                credit, pairs = gold_agreement([r.ranks[i] for i in ids], [answer[i] for i in ids])
                row["gold_credit"] += credit
                row["gold_pairs"] += pairs
                row["gold_tasks"] += 1
        others = [o.ranks for o in by_task[r.task_id] if o.annotator != r.annotator]
        if others:
            agree, compared = leave_one_out_agreement(r.ranks, others)
            row["loo_agree"] += agree
            row["loo_compared"] += compared
            row["loo_tasks"] += 1
    table = []
    for row in rows.values():
        gold_accuracy = row["gold_credit"] / row["gold_pairs"] if row["gold_pairs"] else math.nan
        table.append({
            "annotator": row["annotator"], "ranked": row["ranked"], "skipped": row["skipped"],
            "median_seconds": float(pd.Series(row["seconds"], dtype=float).median()),
            "gold_tasks": row["gold_tasks"], "gold_accuracy": gold_accuracy,
            "flagged": bool(row["gold_pairs"]) and gold_accuracy < gold_threshold,
            "loo_tasks": row["loo_tasks"],
            "loo_agreement": row["loo_agree"] / row["loo_compared"] if row["loo_compared"] else math.nan,
            "tie_share": row["tied"] / row["ranked"] if row["ranked"] else math.nan,
            "first_shown_first_share": row["first"] / row["ranked"] if row["ranked"] else math.nan})
    return pd.DataFrame(table, columns=ANNOTATOR_COLUMNS)


def review_queue(store: SQLLabelStore, limit: int = 50) -> list[dict[str, Any]]:
    """The tasks whose rankings disagree most, for an admin's review: every ordinary task with two or more
    rankings, by pooled pairwise agreement among its annotators (lowest first; a task whose annotators ordered
    no pair alike-or-not comes last), then by more rankings; each with its rankings and its resolution, if any.
    ADMIN/CLI ONLY."""
    by_task: dict[str, list] = {}
    for ranking in store.export_rankings(gold=False):
        by_task.setdefault(ranking.task_id, []).append(ranking)
    resolved = store.resolutions()
    rows = []
    for order, (task_id, rankings) in enumerate(by_task.items()):
        if len(rankings) < 2:
            continue
        agree = compared = 0
        for a, b in combinations(rankings, 2):
            ids = sorted(a.ranks)
            got = pair_agreement([a.ranks[i] for i in ids], [b.ranks[i] for i in ids])
            agree, compared = agree + got[0], compared + got[1]
        resolution = resolved.get(task_id)
        rows.append((compared == 0, agree / compared if compared else 1.0, -len(rankings), order, {
            "task_id": task_id, "agreement": agree / compared if compared else None,
            "rankings": [{"annotator": r.annotator, "ranks": r.ranks, "comment": r.comment, "flags": list(r.flags)}
                         for r in rankings],
            "resolved": None if resolution is None else {"ranks": resolution[0], "by": resolution[1],
                                                         "at": resolution[2]}}))
    return [row[-1] for row in sorted(rows, key=lambda row: row[:4])[:limit]]


def _value(value: Any) -> Any:
    """A table cell as plain JSON: NaN -> None, numpy numbers -> Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def table_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a table as JSON-ready dicts (NaN -> None)."""
    return [{key: _value(v) for key, v in row.items()} for row in frame.to_dict("records")]


def compute_stats(store: SQLLabelStore, overlap: int = 2, gold_threshold: float = GOLD_THRESHOLD) -> dict:
    """Progress at `overlap`, per-annotator counts with median seconds per ranked task and gold accuracy (flagged
    under `gold_threshold`), and agreement (see the module docstring), from `stats_tables` and `annotator_table`.
    ADMIN/CLI ONLY: it reads every annotator's rankings."""
    tables, progress, comparisons = _tables(store, overlap)
    gold = {row["annotator"]: row for row in table_records(annotator_table(store, gold_threshold))}
    compared = int(comparisons["compared"].sum())
    taus = comparisons["tau"].dropna()
    return {
        "tasks": progress.tasks,
        "overlap": overlap,
        "complete": progress.complete,
        "rankings": progress.rankings,
        "skips": progress.skips,
        "annotators": [{"name": a["annotator"], "ranked": a["ranked"], "skipped": a["skipped"],
                        "median_seconds": a["median_seconds"], "gold_tasks": gold[a["annotator"]]["gold_tasks"],
                        "gold_accuracy": gold[a["annotator"]]["gold_accuracy"],
                        "flagged": gold[a["annotator"]]["flagged"]} for a in table_records(tables["annotators"])],
        "gold_threshold": gold_threshold,
        "agreement": {
            "shared_tasks": int(comparisons["task_id"].nunique()),
            "pairwise_agreement": int(comparisons["agree"].sum()) / compared if compared else None,
            "mean_kendall_tau": float(taus.mean()) if len(taus) else None,
            "by_pair": [{"annotators": [e["annotator_a"], e["annotator_b"]], "shared_tasks": e["shared_tasks"],
                         "pairwise_agreement": e["pairwise_agreement"], "mean_kendall_tau": e["mean_kendall_tau"]}
                        for e in table_records(tables["agreement"])],
        },
        "proposals": proposal_stats(store.events()),
        "flags": flag_counts(store.notes()),
    }


def flag_counts(notes: list[dict]) -> dict[str, dict[str, int]]:
    """{flag: {"rankings": n, "skips": n}} over the stored rankings and skips (`SQLLabelStore.notes`), most used
    first: what annotators flagged (a skip with "broken-prompt" says the task itself is wrong)."""
    counts: dict[str, dict[str, int]] = {}
    for note in notes:
        for flag in note["flags"]:
            counts.setdefault(flag, {"rankings": 0, "skips": 0})[
                "rankings" if note["status"] == "ranked" else "skips"] += 1
    return dict(sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0])))


def proposal_stats(events: list[dict]) -> dict:
    """How annotators treated the reward model's proposed order (`rlhf label --pre-rank`; `labeling.active`):
    over the first submits of tasks opened with a proposal, how many kept it unchanged and how many completion
    pairs they moved on average. A high kept rate with a weak reward model is a sign of anchoring."""
    shown = [e["payload"] for e in events if e["kind"] == "submit" and "proposal" in e["payload"]]
    kept = sum(bool(p.get("proposal_kept")) for p in shown)
    return {"shown": len(shown), "kept": kept, "kept_fraction": kept / len(shown) if shown else None,
            "mean_moves": sum(p["proposal_moves"] for p in shown) / len(shown) if shown else None}


def write_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path, fmt: str) -> list[Path]:
    """Each table as OUT_DIR/<name>.csv or .json (a list of row objects), written atomically."""
    from rlhf.jsonl import atomic_write

    paths = []
    for name, frame in tables.items():
        path = Path(out_dir) / f"{name}.{fmt}"
        with atomic_write(path) as handle:
            if fmt == "csv":
                frame.to_csv(handle, index=False)
            else:
                handle.write(json.dumps(table_records(frame), indent=2) + "\n")
        paths.append(path)
    return paths


def format_stats(stats: dict) -> str:
    """A short human-readable report of `compute_stats` output (what `rlhf stats` prints)."""
    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    lines = [f"tasks: {stats['tasks']}  complete at overlap {stats['overlap']}: {stats['complete']}  "
             f"rankings: {stats['rankings']}  skips: {stats['skips']}"]
    if stats["annotators"]:
        width = max(9, *(len(a["name"]) for a in stats["annotators"]))
        lines.append(f"{'annotator':<{width}}  {'ranked':>6}  {'skipped':>7}  {'median s/task':>13}  "
                     f"{'gold accuracy (n)':>17}")
        for a in stats["annotators"]:
            gold = f"{num(a.get('gold_accuracy'))} ({a.get('gold_tasks', 0)})"
            lines.append(f"{a['name']:<{width}}  {a['ranked']:>6}  {a['skipped']:>7}  "
                         f"{num(a['median_seconds'], '{:.1f}'):>13}  {gold:>17}"
                         + ("  FLAGGED: under the gold threshold" if a.get("flagged") else ""))
    agreement = stats["agreement"]
    lines.append(f"agreement on {agreement['shared_tasks']} shared tasks: pairwise "
                 f"{num(agreement['pairwise_agreement'])}, mean Kendall tau {num(agreement['mean_kendall_tau'])}")
    for entry in agreement["by_pair"]:
        a, b = entry["annotators"]
        lines.append(f"  {a} vs {b}: {entry['shared_tasks']} tasks, pairwise {num(entry['pairwise_agreement'])}, "
                     f"tau {num(entry['mean_kendall_tau'])}")
    if stats.get("flags"):
        lines.append("flags: " + ", ".join(f"{flag} {c['rankings'] + c['skips']} ({c['rankings']} ranked, "
                                           f"{c['skips']} skipped)" for flag, c in stats["flags"].items()))
    proposals = stats.get("proposals") or {}
    if proposals.get("shown"):
        lines.append(f"reward-model proposals: kept as is in {proposals['kept']} of {proposals['shown']} rankings "
                     f"({num(proposals['kept_fraction'], '{:.0%}')}), {num(proposals['mean_moves'], '{:.2f}')} "
                     "pairs moved on average")
    return "\n".join(lines)
