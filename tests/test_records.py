import json

import pytest

from rlhf.errors import UserError
from rlhf.jsonl import atomic_write, read_jsonl, write_jsonl
from rlhf.records import Pair, RankedCompletion, RankedTask, Ranking, Task


def test_task_round_trip_and_generated_ids():
    task = Task.from_dict({"prompt": "Say hi", "completions": ["hi", {"text": "hello", "model": "m"}]})
    assert task.id.startswith("t-")
    assert [c.id for c in task.completions] == [f"{task.id}-0", f"{task.id}-1"]
    again = Task.from_dict(task.to_dict())
    assert again == task
    # the same content gives the same id, so re-importing a file adds nothing twice
    assert Task.from_dict({"prompt": "Say hi", "completions": ["hi", "hello"]}).id == task.id


@pytest.mark.parametrize("obj, reason", [
    ({"prompt": "", "completions": ["a", "b"]}, "'prompt' is empty"),
    ({"prompt": "p", "completions": ["a"]}, "at least 2 completions"),
    ({"prompt": "p", "completions": "ab"}, "must be a list"),
    ({"prompt": "p", "completions": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, "unique"),
    ({"prompt": "p", "completions": [{"text": 3}, "b"]}, "'text' must be a string"),
])
def test_task_rejects_bad_input(obj, reason):
    with pytest.raises(ValueError, match=reason):
        Task.from_dict(obj)


def test_ranking_normalization_dense_and_checked():
    assert Ranking.normalized({"a": 1, "b": 1, "c": 5}, ["a", "b", "c"]) == {"a": 1, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="missing \\['c'\\]"):
        Ranking.normalized({"a": 1, "b": 2}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown \\['z'\\]"):
        Ranking.normalized({"a": 1, "b": 2, "z": 3}, ["a", "b"])
    with pytest.raises(ValueError, match="positive integer"):
        Ranking.normalized({"a": 1, "b": 0}, ["a", "b"])
    with pytest.raises(ValueError, match="positive integer"):
        Ranking.normalized({"a": 1, "b": True}, ["a", "b"])
    with pytest.raises(ValueError, match="every completion ties"):
        Ranking.normalized({"a": 2, "b": 2}, ["a", "b"])


def test_ranked_task_round_trip():
    task = Task.from_dict({"id": "t1", "prompt": "p", "completions": ["x", "y", "z"]})
    ranked = RankedTask.from_task(task, Ranking("t1", "ann", {"t1-0": 3, "t1-1": 1, "t1-2": 2}))
    assert ranked.completions == (RankedCompletion("t1-0", "x", 3), RankedCompletion("t1-1", "y", 1),
                                  RankedCompletion("t1-2", "z", 2))
    assert ranked.to_dict() == {"task_id": "t1", "annotator": "ann", "prompt": "p", "completions": [
        {"id": "t1-0", "text": "x", "rank": 3}, {"id": "t1-1", "text": "y", "rank": 1},
        {"id": "t1-2", "text": "z", "rank": 2}]}  # the rankings.jsonl line, a public format
    assert RankedTask.from_dict(json.loads(json.dumps(ranked.to_dict()))) == ranked


def test_pair_from_dict_checks_types():
    pair = Pair.from_dict({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert pair.to_dict()["chosen"] == "a"
    with pytest.raises(ValueError, match="rank_chosen"):
        Pair.from_dict({"prompt": "p", "chosen": "a", "rejected": "b", "rank_chosen": "1"})


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(UserError, match=r"x.jsonl:3: not valid JSON"):
        list(read_jsonl(path))
    path.write_text('[1, 2]\n')
    with pytest.raises(UserError, match=r"x.jsonl:1: expected a JSON object"):
        list(read_jsonl(path))
    with pytest.raises(UserError, match="no such file"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_jsonl(path))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"n": 1}])

    def rows():
        yield {"n": 2}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text() == '{"n": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind
    with atomic_write(path) as handle:
        handle.write("new\n")
    assert path.read_text() == "new\n"
