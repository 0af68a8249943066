"""How good is a reward model on held-out preferences: pairwise accuracy, mean margin, calibration,
the accuracy per subset of an evaluation set (RewardBench's report: each subset, their mean, the overall
figure), and, where several annotators judged the same comparison, how often humans agree with each other
(the ceiling a reward model trained on their labels can be expected to reach)."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from reward_model.data import parse_record, read_records, to_example
from reward_model.model import encode_sample_ids, score_rows
from rlhf.bootstrap import cluster_bootstrap_interval
from rlhf.pairs import pair_credit, pairwise_accuracy
from rlhf.records import Pair, RankedTask, encode_prompt


def expected_calibration_error(probs: Sequence[float], bins: int = 10) -> float:
    """ECE (Guo et al. 2017) of p = sigmoid(r_chosen - r_rejected) = P(chosen preferred).

    Each comparison counts in both orientations, (p, outcome 1) and (1 - p, outcome 0), so the
    reliability diagram over 10 equal-width bins of [0, 1] does not depend on which side was listed
    first; ECE = sum over bins of (bin size / total) * |mean predicted - observed frequency|.
    """
    points = [(p, 1.0) for p in probs] + [(1.0 - p, 0.0) for p in probs]
    if not points:
        return float("nan")
    totals = [[0, 0.0, 0.0] for _ in range(bins)]
    for p, outcome in points:
        b = min(int(p * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += p
        totals[b][2] += outcome
    return sum(abs(s_p - s_o) for n, s_p, s_o in totals if n) / len(points)


def _comparisons(records: Iterable[RankedTask | Pair], subsets: Iterable[str | None] | None = None):
    """(prompt, better text, worse text, annotator, task id, rank gap, subset) for every non-tied, non-identical
    pair (`subsets[i]`: the i-th record's subset, None without)."""
    for record, subset in zip(records, itertools.repeat(None) if subsets is None else subsets):
        ex = to_example(record)
        for b, w, gap in ex.pairs:
            if ex.texts[b] != ex.texts[w]:
                yield ex.prompt, ex.texts[b], ex.texts[w], ex.annotator, ex.task_id, gap, subset


def prompt_bootstrap_interval(prompts: Sequence[str], diffs: Sequence[float], draws: int = 2000,
                              seed: int = 0) -> tuple[float, float]:
    """95% interval of the pairwise accuracy when the held-out PROMPTS are resampled with replacement
    (`rlhf.bootstrap.cluster_bootstrap_interval`). The pairs of one prompt share its completions and
    annotators, so they are not independent: a held-out set of a few dozen prompts is far less precise than
    its pair count suggests, and the interval says how much the figure would move with another draw of
    prompts."""
    correct: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for prompt, diff in zip(prompts, diffs):
        correct[prompt][0] += pair_credit(diff)
        correct[prompt][1] += 1.0
    right, pairs = zip(*correct.values())
    return cluster_bootstrap_interval(right, pairs, draws, seed)


def subset_accuracy(comparisons: Sequence[tuple], diffs: Sequence[float]) -> dict[str, Any]:
    """RewardBench's report where comparisons name their subset: each subset's pairs, accuracy and interval over
    its prompts, and the unweighted mean of the subset accuracies (a large subset does not drown a small one);
    {} when no comparison names one. Comparisons without a subset count only in the overall figure."""
    by_subset: dict[str, list[tuple[Any, float]]] = defaultdict(list)
    for comparison, diff in zip(comparisons, diffs):
        if comparison[6] is not None:
            by_subset[comparison[6]].append((comparison[0], diff))
    if not by_subset:
        return {}
    report = {}
    for name, found in sorted(by_subset.items()):
        prompts, values = zip(*found)
        report[name] = {"pairs": len(values), "accuracy": pairwise_accuracy(values),
                        "accuracy_interval": list(prompt_bootstrap_interval(prompts, values))}
    return {"by_subset": report, "subset_mean": sum(r["accuracy"] for r in report.values()) / len(report)}


def diagnostics(comparisons: Sequence[tuple], diffs: Sequence[float]) -> dict[str, Any]:
    """What a user needs to trust a reward model beyond one accuracy figure (`diffs[i]` = r_better -
    r_worse of `comparisons[i]`):

    - by_rank_gap: accuracy on adjacent ranks (gap 1, the hard comparisons) vs ranks further apart;
    - by_length: accuracy when the preferred completion has more / as many / fewer words, beside
      `longer_wins`, the accuracy of "prefer the longer one": a reward model that is mostly a length
      detector does well only where the preferred answer is longer;
    - reliability: for bins of the model's confidence max(p, 1 - p), p = sigmoid(margin), how often it
      is right (a calibrated model's accuracy matches its confidence in every bin).
    """
    def groups(key) -> dict[str, dict[str, float]]:
        found: dict[str, list[float]] = defaultdict(list)
        for comparison, diff in zip(comparisons, diffs):
            found[key(comparison)].append(diff)
        return {name: {"pairs": len(v), "accuracy": pairwise_accuracy(v)} for name, v in sorted(found.items())}

    def words(text: str) -> int:
        return len(text.split())

    def length_key(c) -> str:
        delta = words(c[1]) - words(c[2])
        return "preferred longer" if delta > 0 else "same length" if delta == 0 else "preferred shorter"

    longer = [words(c[1]) - words(c[2]) for c in comparisons]
    reliability = []
    confidences = [1.0 / (1.0 + math.exp(-abs(d))) for d in diffs]
    for low in (0.5, 0.6, 0.7, 0.8, 0.9):
        inside = [d for d, conf in zip(diffs, confidences) if low <= conf < low + 0.1 or (low == 0.9 and conf == 1.0)]
        if inside:
            reliability.append({"confidence": f"{low:.1f}-{low + 0.1:.1f}", "pairs": len(inside),
                                "accuracy": pairwise_accuracy(inside)})
    return {
        "by_rank_gap": groups(lambda c: "1 (adjacent)" if c[5] == 1 else "2" if c[5] == 2 else "3+"),
        "by_length": groups(length_key),
        "longer_wins": pairwise_accuracy(longer),
        "reliability": reliability,
    }


def human_agreement(comparisons: Sequence[tuple[str, str, str, str, str]],
                    model_prefers: dict[tuple[str, str, str], bool] | None = None) -> dict[str, Any]:
    """Leave-one-out agreement: for each annotator's judgement of a comparison that others also judged,
    does it match the majority of the OTHER annotators (ties among the others are left out)?

    With `model_prefers` ((prompt, a, b) -> model prefers a), the model's agreement with the same
    individual judgements is reported beside it, on exactly the same denominator.
    """
    votes: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)  # key -> annotator -> +1/-1
    for prompt, better, worse, annotator, *_ in comparisons:
        a, b = sorted((better, worse))
        votes[(prompt, a, b)][annotator] = 1 if better == a else -1
    judged = agree = model_agree = 0
    for key, by_annotator in votes.items():
        if len(by_annotator) < 2:
            continue
        for annotator, vote in by_annotator.items():
            others = sum(v for other, v in by_annotator.items() if other != annotator)
            if others == 0:
                continue
            judged += 1
            agree += (vote > 0) == (others > 0)
            if model_prefers is not None:
                model_agree += (vote > 0) == model_prefers[key]
    result: dict[str, Any] = {"multi_annotated_judgements": judged}
    if judged:
        result["human_agreement"] = agree / judged
        if model_prefers is not None:
            result["model_agreement_same_judgements"] = model_agree / judged
    return result


@torch.no_grad()
def evaluate_reward_model(rm, tokenizer, path_or_records: str | Path | Iterable[Any],
                          max_length: int | None = None, batch_size: int = 32,
                          subsets: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Metrics of `rm` on a rankings/pairs JSONL file, or on records (RankedTask, Pair or their dicts).

    Every distinct (prompt, completion) is scored once. Returns: pairs, prompts, accuracy (a tie in reward
    counts half), accuracy_interval (`prompt_bootstrap_interval`), mean_margin (mean r_better - r_worse),
    ece (10 bins), the `diagnostics` (by rank gap, by length difference, reliability), `subset_accuracy`
    (by_subset, subset_mean) where rows name a subset (a file's `subset` column, or `subsets[i]` for the i-th
    record), and human_agreement beside model_agreement_same_judgements when several annotators judged the same
    comparison.
    """
    if isinstance(path_or_records, (str, Path)):
        rows = read_records(path_or_records)
        records, subsets = [record for _, record in rows], [row["subset"] for row, _ in rows]
    else:
        records = [parse_record(r) if isinstance(r, dict) else r for r in path_or_records]
    max_length = max_length or getattr(rm, "meta", {}).get("max_length", 512)
    comparisons = list(_comparisons(records, subsets))
    if not comparisons:
        return {"pairs": 0}
    keys = sorted({(c[0], text) for c in comparisons for text in (c[1], c[2])},
                  key=lambda key: (encode_prompt(key[0]), key[1]))
    rows = [encode_sample_ids(tokenizer, prompt, text, max_length) for prompt, text in keys]
    was_training = rm.training
    rm.eval()
    try:
        reward = dict(zip(keys, score_rows(rm, rows, tokenizer.pad_token_id, batch_size)))
    finally:
        rm.train(was_training)
    diffs = [reward[(p, better)] - reward[(p, worse)] for p, better, worse, *_ in comparisons]
    probs = [1.0 / (1.0 + math.exp(-d)) for d in diffs]
    result = {
        "pairs": len(diffs),
        "prompts": len({c[0] for c in comparisons}),
        "accuracy": pairwise_accuracy(diffs),
        "accuracy_interval": list(prompt_bootstrap_interval([c[0] for c in comparisons], diffs)),
        "mean_margin": sum(diffs) / len(diffs),
        "ece": expected_calibration_error(probs),
        **subset_accuracy(comparisons, diffs),
        **diagnostics(comparisons, diffs),
    }
    model_prefers = {}
    for p, better, worse, *_ in comparisons:
        a, b = sorted((better, worse))
        model_prefers[(p, a, b)] = reward[(p, a)] > reward[(p, b)]
    result.update(human_agreement(comparisons, model_prefers))
    return result
