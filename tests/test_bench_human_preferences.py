"""bench/prepare_human_preferences.py: how the human labels become rankings, and the vendored files."""

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import prepare_human_preferences as hp  # noqa: E402

from rlhf.prompts import split_by_prompt  # noqa: E402
from rlhf.records import RankedTask  # noqa: E402


def qa_record(preference, predictions=("a", "bb", "ccc", "dddd")):
    return {"question": " Who? ", "passages": [["T", "T\n\nFirst sentence.", "Second."]],
            **{f"prediction {k + 1}": text for k, text in enumerate(predictions)}, "preference": preference}


def test_qa_feedback_pairs_follow_the_data_readme_order_and_labels():
    rows = hp.rankings_from_comparisons(hp.qa_feedback_comparisons([qa_record([1, 2, 0, 2, 1, 0])]), 0.0, 0)
    # 1v2: 1 preferred; 1v3: 3; 1v4: none; 2v3: 3; 2v4: 2; 3v4: none
    assert [(r["task_id"], [c["rank"] for c in r["completions"]]) for r in rows] == [
        ("qa-feedback-0-1v2", [1, 2]), ("qa-feedback-0-1v3", [2, 1]), ("qa-feedback-0-2v3", [2, 1]),
        ("qa-feedback-0-2v4", [1, 2])]
    assert [c["text"] for c in rows[1]["completions"]] == ["a", "ccc"]
    assert rows[0]["prompt"].startswith("Wikipedia passages:\n\nT\n\nFirst sentence. Second.")
    assert rows[0]["prompt"].endswith("Answer this question from the passages: Who?")  # last: survives truncation
    assert all(RankedTask.from_dict(r).ranks == tuple(c["rank"] for c in r["completions"]) for r in rows)


def test_qa_feedback_drops_pairs_of_identical_texts_and_refuses_a_short_label_list():
    rows = hp.rankings_from_comparisons(hp.qa_feedback_comparisons([qa_record([1] * 6, ("x", "x", "y", "z"))]),
                                        0.0, 0)
    assert "qa-feedback-0-1v2" not in {r["task_id"] for r in rows} and len(rows) == 5
    with pytest.raises(ValueError, match="5 preferences, expected 6"):
        list(hp.qa_feedback_comparisons([qa_record([1] * 5)]))


@pytest.mark.parametrize("votes, ranks", [((2, 2, 1), [2, 1]), ((1, 0, 1), [1, 2]), ((1, 2, 0), None),
                                          ((0, 0, 2), None)])
def test_pandalm_label_is_the_majority_of_three(votes, ranks):
    record = {"idx": 7, "cmp_key": "llama-7b_opt-7b", "instruction": "Do it.", "input": "", "response1": "one",
              "response2": True, **{f"annotator{k + 1}": v for k, v in enumerate(votes)}}
    rows = hp.rankings_from_comparisons(hp.pandalm_comparisons([record]), 0.0, 0)
    if ranks is None:
        assert rows == []
    else:
        assert rows == [{"task_id": "pandalm-7", "annotator": "pandalm majority of 3", "prompt": "Do it.",
                         "completions": [{"id": "llama-7b", "text": "one", "rank": ranks[0]},
                                         {"id": "opt-7b", "text": "True", "rank": ranks[1]}],
                         "split": "train"}]


def test_split_is_the_export_rule_by_prompt():
    comparisons = [(f"c{i}", f"prompt {i % 7}", "a", "b", 1, "x", "y", "h") for i in range(21)]
    rows = hp.rankings_from_comparisons(comparisons, 0.3, 4)
    test = split_by_prompt({f"prompt {i}" for i in range(7)}, 0.3, 4)
    assert {r["prompt"] for r in rows if r["split"] == "test"} == test and len(test) == 2
    assert len(rows) == 21
    # --limit keeps the first prompts in order of appearance (before the split); a dropped label still counts
    unlabelled = [("u", "prompt 0", "a", "b", 0, "x", "y", "h")]
    limited = hp.rankings_from_comparisons(unlabelled + comparisons, 0.0, 0, limit=2)
    assert {r["prompt"] for r in limited} == {"prompt 0", "prompt 1"} and len(limited) == 6


def test_summary_counts_pairs_prompts_and_lengths():
    def row(prompt, split, first, second, first_rank):
        return {"prompt": prompt, "split": split,
                "completions": [{"text": first, "rank": first_rank}, {"text": second, "rank": 3 - first_rank}]}

    rows = [row("p q", "train", "long one", "s", 1), row("p q", "train", "x", "yy", 1), row("r", "test", "zz", "ww", 2)]
    s = hp.summarise(rows)
    assert (s["train_pairs"], s["test_pairs"], s["train_prompts"], s["test_prompts"]) == (2, 1, 1, 1)
    assert s["longer_chosen"] == 0.5  # the equal-length pair is not counted
    assert s["chosen_words"] == pytest.approx(4 / 3) and s["prompt_words"] == pytest.approx(5 / 3)


def test_vendored_files_give_the_recorded_sets(tmp_path):
    qa, panda = hp.human_rankings("qa-feedback"), hp.human_rankings("pandalm")
    assert (len(qa), len({r["prompt"] for r in qa})) == (2616, 488)
    assert (len(panda), len({r["prompt"] for r in panda})) == (894, 158)
    changed = tmp_path / "testset-v1.json.gz"
    records = json.loads(gzip.decompress((hp.DATA / hp.SETS["pandalm"].file).read_bytes()))
    changed.write_bytes(gzip.compress(json.dumps(records[:-1]).encode()))
    with pytest.raises(SystemExit, match="is not the file set 'pandalm' was prepared from"):
        hp.human_rankings("pandalm", source=changed)
