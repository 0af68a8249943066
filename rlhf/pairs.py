"""Pair expansion: a ranking of K completions becomes C(K,2) (chosen, rejected) pairs; and the credit a scorer
earns on one pair.

Pure functions, no I/O. Tied completions give no pair (InstructGPT ranks without ties; with
ties we only keep the comparisons the annotator actually expressed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

from rlhf.records import Pair, RankedTask


def pair_indices(ranks: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranking, rank 1 best; ties give no pair.

    Ordered by the better completion's rank, then the worse one's, so output is deterministic.
    """
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    return [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))
            if ranks[order[a]] < ranks[order[b]]]


def expand_pairs(ranked: RankedTask) -> list[Pair]:
    """The C(K,2) preference pairs of one ranked task (fewer when it has ties)."""
    c = ranked.completions
    return [Pair(ranked.prompt, c[better].text, c[worse].text, ranked.task_id, ranked.annotator, c[better].rank,
                 c[worse].rank) for better, worse in pair_indices(ranked.ranks)]


def proposal_moves(proposal: Mapping[str, int], ranks: Mapping[str, int]) -> int:
    """How many completion pairs the annotator ordered differently from the proposal (better, worse or tied).
    For rankings without ties it is the Kendall tau distance: the fewest swaps of adjacent completions that
    turn one order into the other."""
    def relation(r: Mapping[str, int], a: str, b: str) -> int:
        return (r[a] > r[b]) - (r[a] < r[b])

    ids = sorted(proposal)
    return sum(relation(proposal, a, b) != relation(ranks, a, b) for a, b in combinations(ids, 2))


def pair_credit(margin: float) -> float:
    """One comparison's share of a pairwise accuracy, from its margin (the preferred completion's score minus the
    other's): right 1, a tie in score 1/2, wrong 0."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def pairwise_accuracy(margins: Iterable[float]) -> float:
    """Fraction of comparisons a scorer orders right, a tie counting half (`pair_credit`); 0 without any."""
    credits = [pair_credit(margin) for margin in margins]
    return sum(credits) / max(len(credits), 1)

