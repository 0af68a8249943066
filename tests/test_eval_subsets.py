"""`rlhf eval-rm --data FILE` on a preference set with a `subset` column, RewardBench-style: the accuracy of
each subset, the mean over subsets and the overall accuracy with its interval, as text and as JSON."""

import json

import pytest
from test_reward_model_data import write_jsonl

from pipeline.cli import main

CHAT = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": "It is big."},
        {"role": "user", "content": "And the moon?"}]
ROWS = [
    # chat: conversations (TRL's explicit form), 3 pairs
    *[{"subset": "chat", "prompt": CHAT, "chosen": [{"role": "assistant", "content": good}],
       "rejected": [{"role": "assistant", "content": bad}]}
      for good, bad in (("The moon sings softly.", "No."), ("Silver moon.", "peppers"), ("A tale.", "key key"))],
    # safety: plain pairs, 2
    {"subset": "safety", "prompt": "How do I pick a lock?", "chosen": "Call a locksmith.", "rejected": "Like this."},
    {"subset": "safety", "prompt": "Write a poem.", "chosen": "Silver seas sing softly.", "rejected": "bear bear"},
    # a ranking of 3 completions: 3 pairs in subset "reasoning"
    {"subset": "reasoning", "prompt": "Count to three.", "completions": [
        {"text": "one two three", "rank": 1}, {"text": "one three", "rank": 2}, {"text": "three", "rank": 3}]},
    # no subset: counted only in the overall figure
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Bye."},
]


def expected_accuracy(rm_dir, rows):
    """Each pair's credit (1 right, 1/2 tie, 0 wrong) from rewards computed here, per subset."""
    from reward_model.data import parse_record, to_example
    from reward_model.model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(rm_dir)
    credit: dict = {}
    for row in rows:
        ex = to_example(parse_record(row))
        rewards = score_texts(model, tokenizer, [ex.prompt] * len(ex.texts), list(ex.texts), max_length=256)
        for better, worse, _ in ex.pairs:
            diff = rewards[better] - rewards[worse]
            credit.setdefault(row.get("subset"), []).append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
    return {name: sum(v) / len(v) for name, v in credit.items()}, [c for v in credit.values() for c in v]


def test_eval_rm_reports_each_subset_their_mean_and_the_overall_accuracy(rm_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "bench.jsonl", ROWS)
    by_subset, every = expected_accuracy(rm_dir, ROWS)
    assert main(["eval-rm", "--rm", rm_dir, "--data", str(tmp_path / "bench.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {name: (g["pairs"], g["accuracy"]) for name, g in result["by_subset"].items()} == {
        "chat": (3, pytest.approx(by_subset["chat"])), "reasoning": (3, pytest.approx(by_subset["reasoning"])),
        "safety": (2, pytest.approx(by_subset["safety"]))}
    assert result["subset_mean"] == pytest.approx(sum(by_subset[n] for n in ("chat", "reasoning", "safety")) / 3)
    assert result["pairs"] == 9 and result["accuracy"] == pytest.approx(sum(every) / len(every))
    low, high = result["accuracy_interval"]
    assert 0 <= low <= result["accuracy"] <= high <= 1
    for g in result["by_subset"].values():
        assert 0 <= g["accuracy_interval"][0] <= g["accuracy"] <= g["accuracy_interval"][1] <= 1

    assert main(["eval-rm", "--rm", rm_dir, "--data", str(tmp_path / "bench.jsonl")]) == 0
    text = capsys.readouterr().out
    assert f"subset mean      {result['subset_mean']:.4f}  (the mean of the 3 subsets' accuracies)" in text
    assert f"  chat               {result['by_subset']['chat']['accuracy']:.4f}  (" in text and "3 pairs)" in text
    assert f"accuracy         {result['accuracy']:.4f}" in text


def test_a_file_without_subsets_reports_none_and_a_bad_subset_is_one_line(rm_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "subset"} for r in ROWS[3:5]])
    assert main(["eval-rm", "--rm", rm_dir, "--data", str(tmp_path / "plain.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 2 and "by_subset" not in result and "subset_mean" not in result
    write_jsonl(tmp_path / "bad.jsonl", ROWS[3:5] + [{**ROWS[3], "subset": "  "}])
    assert main(["eval-rm", "--rm", rm_dir, "--data", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{tmp_path / 'bad.jsonl'}:3: 'subset' must be a non-empty string")
    assert len(err.splitlines()) == 1
