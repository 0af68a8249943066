import math
import random
from collections import Counter

import pytest

from labeling.simulate import sample_order, simulate
from labeling.store import open_store
from labeling_helpers import make_tasks
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


def test_simulate_fills_the_queue_with_strict_rankings(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        tasks = make_tasks(12, k=3)
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
        assert not store.verify_password("sim-1", "")
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
