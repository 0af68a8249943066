"""reward_model.loss / evaluate metrics on hand-made numbers."""

import math

import pytest
import torch

from reward_model.data import DataStats, build_examples, collate
from reward_model.evaluate import expected_calibration_error, human_agreement, prompt_bootstrap_interval
from reward_model.loss import build_pair_index, pairwise_loss, ranking_loss, ranking_pairs, scale_free_loss
from reward_model.model import EncodedSample
from rlhf.records import Pair, RankedCompletion, RankedTask


def log1p_exp(x):
    return math.log1p(math.exp(x))


def ranked_task(task_id, texts):
    """A ranking of `texts` in order (ranks 1, 2, 3, ...) by annotator "a" of prompt "p"."""
    return RankedTask(task_id, "a", "p", tuple(RankedCompletion(f"c{i}", t, i + 1) for i, t in enumerate(texts)))


def test_pairwise_loss_closed_form():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0, 40.0]), torch.tensor([1.0, 0.0, 1.0, -40.0])
    got = pairwise_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + exp(-d))
    expected = [log1p_exp(-1.0), math.log(2.0), log1p_exp(2.0), 0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))).all()  # stable
    # Margin is subtracted inside the sigmoid.
    assert pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), 0.5).item() == pytest.approx(log1p_exp(-0.5))


def test_ranking_pairs_gaps_and_ties():
    # ranks: c0=2, c1=1, c2=3, c3=1 -> c1 and c3 tie (no pair)
    assert ranking_pairs([2, 1, 3, 1]) == [(1, 0, 1), (1, 2, 2), (3, 0, 1), (3, 2, 2), (0, 2, 1)]


def test_kwise_loss_equals_mean_of_pairwise_and_same_gradients():
    # Two rankings: K=3 (ranks 1,2,3) and K=4 (ranks 2,1,4,3), flattened into 7 rewards.
    scores = [0.3, -0.2, 0.9, 1.5, 0.1, -0.7, 0.4]
    r1, r2 = ranking_pairs([1, 2, 3]), ranking_pairs([2, 1, 4, 3])
    assert len(r1) == 3 and len(r2) == 6
    rewards = torch.tensor(scores, requires_grad=True)
    loss, metrics = ranking_loss(rewards, build_pair_index([r1, r2], [3, 4], "ranking"))
    loss.backward()

    # Reference: every pair as a separate (chosen, rejected) example, each ranking's pairs averaged,
    # then the rankings averaged: what a pairwise trainer computes with 1/C(K,2) weights.
    ref = torch.tensor(scores, requires_grad=True)
    per_ranking = []
    for pairs, offset in ((r1, 0), (r2, 3)):
        losses = [-torch.nn.functional.logsigmoid(ref[offset + b] - ref[offset + w]) for b, w, _ in pairs]
        per_ranking.append(torch.stack(losses).mean())
    ref_loss = torch.stack(per_ranking).mean()
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    torch.testing.assert_close(rewards.grad, ref.grad)

    # By hand for the first ranking: pairs (0,1), (0,2), (1,2).
    first = (log1p_exp(-(0.3 + 0.2)) + log1p_exp(-(0.3 - 0.9)) + log1p_exp(-(-0.2 - 0.9))) / 3
    diffs = [0.3 + 0.2, 0.3 - 0.9, -0.2 - 0.9]
    # Second: ranks (2,1,4,3) -> order c1 > c0 > c3 > c2; scores 1.5, 0.1, -0.7, 0.4.
    s = [1.5, 0.1, -0.7, 0.4]
    second_pairs = [(1, 0), (1, 3), (1, 2), (0, 3), (0, 2), (3, 2)]
    second = sum(log1p_exp(-(s[b] - s[w])) for b, w in second_pairs) / 6
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)
    diffs += [s[b] - s[w] for b, w in second_pairs]
    assert metrics["accuracy"].item() == pytest.approx(sum(d > 0 for d in diffs) / 9)
    assert metrics["margin"].item() == pytest.approx(sum(diffs) / 9, abs=1e-6)


def test_pair_weighting_weighs_every_comparison_the_same():
    # A full ranking of 3 (3 pairs) and a ranking of 3 with a tie (ranks 1, 2, 2: 2 pairs).
    rewards = torch.tensor([0.3, -0.2, 0.9, 1.0, 0.0, 0.5])
    r1, r2 = ranking_pairs([1, 2, 3]), ranking_pairs([1, 2, 2])
    assert len(r2) == 2
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5)]
    each = [log1p_exp(-(rewards[b] - rewards[w]).item()) for b, w in pairs]
    loss, _ = ranking_loss(rewards, build_pair_index([r1, r2], [3, 3], "pair"))
    assert loss.item() == pytest.approx(sum(each) / 5, abs=1e-6)
    loss, _ = ranking_loss(rewards, build_pair_index([r1, r2], [3, 3], "ranking"))
    assert loss.item() == pytest.approx((sum(each[:3]) / 3 + sum(each[3:]) / 2) / 2, abs=1e-6)


def test_margin_uses_rank_gap():
    rewards = torch.tensor([1.0, 0.0, -1.0])
    loss, _ = ranking_loss(rewards, build_pair_index([ranking_pairs([1, 2, 3])], [3]), margin=0.5)
    # pairs: (0,1) gap 1, (0,2) gap 2, (1,2) gap 1
    expected = (log1p_exp(-(1 - 0.5)) + log1p_exp(-(2 - 1.0)) + log1p_exp(-(1 - 0.5))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_build_examples_skips_identical_and_counts_empty():
    stats = DataStats()
    same = ranked_task("t1", ("same", "same", ""))
    all_same = ranked_task("t2", ("dup", "dup"))
    pair = Pair("p", "good", "bad")
    examples = build_examples([same, all_same, pair], stats)
    assert [len(e.pairs) for e in examples] == [2, 1]   # (0,1) identical texts dropped
    assert stats.identical_pairs_skipped == 2 and stats.rankings_without_pairs == 1
    assert stats.empty_completions == 1 and stats.rankings == 2 and stats.pairs == 3
    assert examples[1].texts == ("good", "bad") and examples[1].pairs == [(0, 1, 1)]


def test_collate_one_forward_for_all_completions():
    stats = DataStats()
    examples = build_examples([ranked_task("t", ("1", "2", "3")),
                               Pair("q", "4", "5")], stats)
    examples[0].rows = [EncodedSample([5, 6], 1, False), EncodedSample([5, 6, 7], 2, False),
                        EncodedSample([5], 1, False)]
    examples[1].rows = [EncodedSample([8], 1, False), EncodedSample([8, 9], 1, False)]
    (ids, mask, completion), index = collate(examples, pad_id=0, weighting="ranking")
    assert ids.shape == (5, 3)
    assert index.better.tolist() == [0, 0, 1, 3] and index.worse.tolist() == [1, 2, 2, 4]
    assert index.weight.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert mask.sum(1).tolist() == [2, 3, 1, 1, 2]
    assert completion.tolist() == [[0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    _, index = collate(examples, pad_id=0)
    assert index.weight.tolist() == pytest.approx([1 / 4] * 4)


def test_ece():
    assert expected_calibration_error([1.0, 1.0]) == pytest.approx(0.0)
    # p = 0.75 on 4 pairs the chosen side won: bin [0.7, 0.8) predicts 0.75 and observes 1.0, its mirror
    # bin [0.2, 0.3) predicts 0.25 and observes 0: |0.75 - 1| = |0.25 - 0| = 0.25.
    assert expected_calibration_error([0.75] * 4) == pytest.approx(0.25)
    assert expected_calibration_error([0.5]) == pytest.approx(0.0)  # (0.5,1) and (0.5,0) share a bin


def test_prompt_bootstrap_interval_resamples_prompts_not_pairs():
    # prompt a: both pairs right, prompt b: both wrong -> a draw holds aa (1.0), ab/ba (0.5) or bb (0.0); the
    # 95% interval reaches both ends, where resampling the four pairs as independent would be far narrower
    assert prompt_bootstrap_interval(["a", "a", "b", "b"], [1.0, 2.0, -1.0, -0.5]) == (0.0, 1.0)
    # every prompt 1 right, 1 wrong: every draw has accuracy 0.5, however many prompts
    prompts = [p for p in "abcdef" for _ in range(2)]
    assert prompt_bootstrap_interval(prompts, [1.0, -1.0] * 6) == (0.5, 0.5)
    # one prompt: nothing to resample; a reward tie counts half, as in the accuracy
    assert prompt_bootstrap_interval(["a"] * 4, [1.0, 1.0, 0.0, -1.0]) == (0.625, 0.625)
    # 30 prompts, 10 of them wrong: the interval holds 2/3 and lies inside (0, 1)
    prompts = [str(i) for i in range(30) for _ in range(3)]
    low, high = prompt_bootstrap_interval(prompts, [1.0 if int(p) >= 10 else -1.0 for p in prompts])
    assert 0.4 < low < 2 / 3 < high < 0.9


def test_cluster_bootstrap_of_a_mean_and_a_ratio():
    from rlhf.bootstrap import cluster_bootstrap_interval

    assert cluster_bootstrap_interval([0.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)        # a mean: each value one cluster
    assert cluster_bootstrap_interval([2.0] * 5, [1.0] * 5) == (2.0, 2.0)
    assert cluster_bootstrap_interval([3.0, 1.0], [4.0, 4.0]) == (0.25, 0.75)      # the clusters' ratios bound it
    # the same seed gives the same interval; the percentiles of 2000 draws lie inside the values' range
    values = [float(v) for v in range(20)]
    low, high = cluster_bootstrap_interval(values, [1.0] * 20)
    assert (low, high) == cluster_bootstrap_interval(values, [1.0] * 20) and 0 < low < 9.5 < high < 19


def test_human_agreement_leave_one_out():
    # Three annotators judge (a vs b): two prefer a, one prefers b. c vs d judged by one only.
    comps = [("p", "a", "b", "ann1", "t"), ("p", "a", "b", "ann2", "t"), ("p", "b", "a", "ann3", "t"),
             ("p", "c", "d", "ann1", "t")]
    result = human_agreement(comps, {("p", "a", "b"): True, ("p", "c", "d"): True})
    # ann1: others = ann2(+1)+ann3(-1) = 0 -> left out; ann2: others 0 -> left out; ann3: others +2, disagrees.
    assert result["multi_annotated_judgements"] == 1
    assert result["human_agreement"] == 0.0
    assert result["model_agreement_same_judgements"] == 0.0  # model prefers a, ann3 said b
    comps.append(("p", "a", "b", "ann4", "t"))
    result = human_agreement(comps, {("p", "a", "b"): True, ("p", "c", "d"): True})
    # ann1: others +1 agree; ann2: +1 agree; ann3: others +3 disagree; ann4: +1 agree
    assert result["multi_annotated_judgements"] == 4 and result["human_agreement"] == 0.75
    assert result["model_agreement_same_judgements"] == 0.75


def test_find_data_rankings_split_and_pairs_fallback(tmp_path):
    import json

    from reward_model.data import find_data
    from rlhf.errors import UserError

    ranking = {"prompt": "p", "completions": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "rankings.jsonl").write_text(
        json.dumps({**ranking, "split": "train"}) + "\n" + json.dumps({**ranking, "split": "test"}) + "\n")
    (tmp_path / "r" / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    files = find_data(tmp_path / "r")
    assert len(files.train) == 1 and len(files.test) == 1 and isinstance(files.train[0], RankedTask)

    (tmp_path / "p").mkdir()
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "p" / "train.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    (tmp_path / "p" / "test.jsonl").write_text(json.dumps(pair) + "\n")
    files = find_data(tmp_path / "p")
    assert len(files.train) == 2 and len(files.test) == 1 and isinstance(files.train[0], Pair)
    assert files.test_source.endswith("test.jsonl")

    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="no rankings.jsonl or train.jsonl"):
        find_data(tmp_path / "e")
    (tmp_path / "e" / "rankings.jsonl").write_text(json.dumps({**ranking, "split": "dev"}) + "\n")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        find_data(tmp_path / "e")


def test_diagnostics_by_rank_gap_length_and_confidence():
    from reward_model.evaluate import diagnostics

    # (prompt, better, worse, annotator, task, rank gap); diffs = r_better - r_worse
    comparisons = [("p", "a b c", "a", "x", "t", 1), ("p", "a", "a b", "x", "t", 1),
                   ("p", "a b", "c d", "x", "t", 2), ("p", "a b c d", "a", "x", "t", 3)]
    diffs = [0.1, -3.0, 0.0, 5.0]
    d = diagnostics(comparisons, diffs)
    assert d["by_rank_gap"] == {"1 (adjacent)": {"pairs": 2, "accuracy": 0.5}, "2": {"pairs": 1, "accuracy": 0.5},
                                "3+": {"pairs": 1, "accuracy": 1.0}}
    assert d["by_length"] == {"preferred longer": {"pairs": 2, "accuracy": 1.0},
                              "preferred shorter": {"pairs": 1, "accuracy": 0.0},
                              "same length": {"pairs": 1, "accuracy": 0.5}}
    assert d["longer_wins"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # confidences sigmoid(|d|): 0.525, 0.953, 0.5, 0.993
    assert d["reliability"] == [{"confidence": "0.5-0.6", "pairs": 2, "accuracy": 0.75},
                                {"confidence": "0.9-1.0", "pairs": 2, "accuracy": 0.5}]


def test_scale_free_loss_is_the_pair_loss_at_the_best_scale():
    diffs, weights = torch.tensor([2.0, 1.0, -0.5, 3.0, 0.2]), torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5])

    def at(t: float) -> float:
        return float((weights * pairwise_loss(t * diffs, torch.zeros(5))).sum() / weights.sum())

    brute = min(at(10 ** (k / 1000)) for k in range(-3000, 3001))
    assert scale_free_loss(diffs, weights) == pytest.approx(brute, abs=1e-6)
    assert scale_free_loss(diffs, weights) < at(1.0)  # the plain loss is never below it
    # the same for any spread of the rewards: an over-confident model is not penalised for its scale
    assert scale_free_loss(100 * diffs, weights) == pytest.approx(scale_free_loss(diffs, weights), abs=1e-6)
    # no scale helps a symmetric mistake: log 2, as constant rewards give; all pairs right: near 0
    assert scale_free_loss(torch.tensor([1.0, -1.0]), torch.ones(2)) == pytest.approx(math.log(2))
    assert scale_free_loss(torch.tensor([0.5, 2.0]), torch.ones(2)) < 1e-3
