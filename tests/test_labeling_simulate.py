import math
import random
from collections import Counter

import pytest
from labeling_helpers import make_tasks

from labeling.simulate import sample_order, sample_ranks, simulate, tie_groups
from labeling.store import open_store
from rlhf.errors import UserError
from rlhf.records import Task


def test_noise_zero_sorts_by_score_and_breaks_ties_at_random():
    rng = random.Random(0)
    assert sample_order([1.0, 3.0, 2.0], 0.0, rng) == [1, 2, 0]
    orders = Counter(tuple(sample_order([1.0, 1.0, 0.0], 0.0, rng)) for _ in range(200))
    assert set(orders) == {(0, 1, 2), (1, 0, 2)}
    assert min(orders.values()) > 60


def test_equal_scores_give_a_uniform_permutation():
    rng = random.Random(1)
    orders = Counter(tuple(sample_order([2.0, 2.0, 2.0], 0.5, rng)) for _ in range(1200))
    assert len(orders) == 6 and min(orders.values()) > 150  # expected 200 each


def test_noise_is_a_temperature_relative_to_the_score_range():
    rng = random.Random(2)
    n = 6000
    # K=2: the better one comes first with probability sigmoid(1 / noise), whatever the score scale
    for scale in (1.0, 100.0):
        first = sum(sample_order([0.0, scale], 1.0, rng)[0] == 1 for _ in range(n)) / n
        assert first == pytest.approx(1 / (1 + math.exp(-1)), abs=0.02)
    # K=3 Plackett-Luce first choice: softmax(scores / (noise * range)) = softmax([0, .5, 1])
    firsts = Counter(sample_order([0.0, 1.0, 2.0], 1.0, rng)[0] for _ in range(n))
    z = 1 + math.exp(0.5) + math.exp(1)
    for index, logit in enumerate((0.0, 0.5, 1.0)):
        assert firsts[index] / n == pytest.approx(math.exp(logit) / z, abs=0.02)


def length_oracle(prompt, completion):
    return float(len(completion))


def test_tie_groups_and_tied_ranks():
    assert tie_groups([2.0, 1.0, 2.0, 0.0]) == [[3], [1], [0, 2]]
    assert tie_groups([0.30, 0.31, 0.5, 0.34], tie_margin=0.05) == [[0, 1, 3], [2]]
    rng = random.Random(0)
    # Equal scores tie (never a coin flip), whatever the noise; distinct scores at noise 0 sort.
    for noise in (0.0, 0.5):
        for _ in range(50):
            ranks = sample_ranks([1.0, 3.0, 1.0, 2.0], noise, 0.0, rng)
            assert ranks[0] == ranks[2] and sorted(set(ranks)) == [1, 2, 3]
    assert sample_ranks([1.0, 3.0, 1.0, 2.0], 0.0, 0.0, rng) == [3, 1, 3, 2]
    assert sample_ranks([5.0, 5.0], 0.3, 0.0, rng) == [1, 1]
    assert sample_ranks([0.30, 0.31, 0.5], 0.0, 0.05, rng) == [2, 2, 1]


def test_simulate_ties_equal_scores_and_exports_no_pair_for_them(tmp_path):
    from rlhf.pairs import expand_pairs

    with open_store(tmp_path / "labels.db") as store:
        task = Task.from_dict({"id": "t", "prompt": "p", "completions": ["aa", "bb", "c", "dddd"]})
        store.import_tasks([task])
        summary = simulate(store, length_oracle, annotators=1, overlap=1, noise=0.0)
        assert summary["oracle_agreement"] == 1.0
        (ranked,) = list(store.export_ranked_tasks())
        by_text = {c.text: c.rank for c in ranked.completions}
        assert by_text == {"dddd": 1, "aa": 2, "bb": 2, "c": 3}
        assert len(expand_pairs(ranked)) == 5  # C(4,2) = 6 minus the tied aa/bb pair


def test_simulate_skips_a_task_whose_completions_all_tie(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        store.import_tasks([Task.from_dict({"id": "same", "prompt": "p", "completions": ["ab", "cd"]}),
                            Task.from_dict({"id": "diff", "prompt": "q", "completions": ["a", "bcd"]})])
        summary = simulate(store, length_oracle, annotators=2, overlap=2, noise=0.5)
        assert summary["rankings"] == 2 and summary["skipped"] == 2
        assert {r.task_id for r in store.export_rankings()} == {"diff"}
        assert store.has_skipped("sim-1", "same") and store.has_skipped("sim-2", "same")


def test_simulate_fills_the_queue_with_strict_rankings(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        tasks = make_tasks(12, k=3)
        assert all(len({len(c.text) for c in t.completions}) == 3 for t in tasks)  # no equal scores
        store.import_tasks(tasks)
        summary = simulate(store, length_oracle, annotators=3, overlap=2, noise=0.0, seed=0)
        assert summary["rankings"] == 24 and sum(summary["annotators"].values()) == 24
        assert set(summary["annotators"]) == {"sim-1", "sim-2", "sim-3"}
        assert (summary["tasks"], summary["complete"]) == (12, 12)
        assert summary["oracle_agreement"] == 1.0
        rankings = store.export_rankings()
        assert Counter(r.task_id for r in rankings) == {t.id: 2 for t in tasks}
        by_id = {c.id: c.text for t in tasks for c in t.completions}
        for r in rankings:
            assert sorted(r.ranks.values()) == [1, 2, 3]  # strict
            ordered = sorted(r.ranks, key=r.ranks.get)
            lengths = [len(by_id[c]) for c in ordered]
            assert lengths == sorted(lengths, reverse=True)  # noise 0: by oracle score, best first
        assert len(store.events()) == 24  # through submit_ranking, like the app
        assert store.password_hash("sim-1") is None  # scripted accounts cannot sign in
        assert simulate(store, length_oracle, annotators=3, overlap=2)["rankings"] == 0  # queue is empty


def test_simulate_is_reproducible(tmp_path):
    results = []
    for name in ("one.db", "two.db"):
        with open_store(tmp_path / name) as store:
            store.import_tasks(make_tasks(8, k=4))
            simulate(store, length_oracle, annotators=2, overlap=2, noise=1.0, seed=7)
            results.append([(r.task_id, r.annotator, r.ranks) for r in store.export_rankings()])
    assert results[0] == results[1]


def test_simulate_rejects_bad_setups(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        store.import_tasks([Task.from_dict({"id": "t", "prompt": "p", "completions": ["a", "b"]})])
        with pytest.raises(UserError, match="needs at least 3 annotators"):
            simulate(store, length_oracle, annotators=2, overlap=3)
        with pytest.raises(UserError, match="noise"):
            simulate(store, length_oracle, noise=-1)
        with pytest.raises(UserError, match="finite number"):
            simulate(store, lambda p, c: float("nan"))
        assert store.export_rankings() == []
