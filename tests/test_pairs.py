from math import comb

import pytest

from rlhf.pairs import expand_pairs, pair_indices
from rlhf.records import RankedCompletion, RankedTask


def ranked(ranks, annotator="a"):
    return RankedTask("t", annotator, "the prompt",
                      tuple(RankedCompletion(f"c{i}", f"text {i}", rank) for i, rank in enumerate(ranks)))


@pytest.mark.parametrize("k", range(2, 10))
def test_strict_ranking_gives_k_choose_2_pairs(k):
    ranks = list(range(k, 0, -1))  # reversed, so index order and rank order differ
    pairs = expand_pairs(ranked(ranks))
    assert len(pairs) == comb(k, 2)
    assert len({(p.chosen, p.rejected) for p in pairs}) == comb(k, 2)  # all distinct
    for p in pairs:
        assert p.rank_chosen < p.rank_rejected


@pytest.mark.parametrize("ranks, expected", [
    ([1, 1, 2], 2),           # the tie gives no pair
    ([1, 2, 2], 2),
    ([1, 1, 1, 2], 3),
    ([1, 1, 2, 2], 4),
    ([1, 2, 3, 3], 5),
    ([2, 1], 1),
])
def test_ties_give_no_pair(ranks, expected):
    assert len(expand_pairs(ranked(ranks))) == expected


def test_orientation_and_fields():
    pairs = expand_pairs(ranked([3, 1, 2]))
    assert [(p.chosen, p.rejected) for p in pairs] == [("text 1", "text 2"), ("text 1", "text 0"),
                                                        ("text 2", "text 0")]
    assert [(p.rank_chosen, p.rank_rejected) for p in pairs] == [(1, 2), (1, 3), (2, 3)]
    assert all(p.prompt == "the prompt" and p.task_id == "t" and p.annotator == "a" for p in pairs)


def test_pair_indices_exact():
    assert pair_indices([2, 1]) == [(1, 0)]
    assert pair_indices([1, 1, 2]) == [(0, 2), (1, 2)]
    assert pair_indices([1, 1]) == []
