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
        {"id": "t1-2", "text": "z", "rank": 2}], "comment": None, "flags": []}  # a rankings.jsonl line: public
    assert RankedTask.from_dict(json.loads(json.dumps(ranked.to_dict()))) == ranked
    noted = RankedTask.from_task(task, Ranking("t1", "ann", {"t1-0": 2, "t1-1": 1, "t1-2": 2}, comment="<b>x</b>",
                                               flags=("off-topic", "unsafe")))
    assert (noted.to_dict()["comment"], noted.to_dict()["flags"]) == ("<b>x</b>", ["off-topic", "unsafe"])
    assert RankedTask.from_dict(json.loads(json.dumps(noted.to_dict()))) == noted
    with pytest.raises(ValueError, match="'flags' must be a list of strings"):
        RankedTask.from_dict({**noted.to_dict(), "flags": "unsafe"})


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


# ---- conversations ----

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


def test_a_conversation_prompt_round_trips_and_a_messages_key_is_accepted():
    from rlhf.records import Message, decode_prompt, encode_prompt, last_user_turn

    task = Task.from_dict({"messages": CHAT, "completions": ["Red.", "Blue."]})
    assert task.prompt == (Message("system", "Be brief."), Message("user", "Hi!"), Message("assistant", "Hello."),
                           Message("user", "Name a colour."))
    assert task.to_dict()["prompt"] == CHAT
    assert Task.from_dict(task.to_dict()) == task
    assert task.id == Task.from_dict({"prompt": CHAT, "completions": ["Red.", "Blue."]}).id  # same content, same id
    assert task.id != Task.from_dict({"prompt": "Name a colour.", "completions": ["Red.", "Blue."]}).id
    assert last_user_turn(task.prompt) == "Name a colour."
    for prompt in (task.prompt, "plain", "\x1e[starts with the mark]", '[{"role": "user", "content": "json text"}]'):
        assert decode_prompt(encode_prompt(prompt)) == prompt
    assert encode_prompt("plain") == "plain"  # a plain prompt is stored as itself
    ranked = RankedTask.from_task(task, Ranking(task.id, "ann", {c.id: i + 1 for i, c in enumerate(task.completions)}))
    assert RankedTask.from_dict(ranked.to_dict()) == ranked and ranked.to_dict()["prompt"] == CHAT
    assert RankedTask.from_dict({**ranked.to_dict(), "messages": CHAT, "prompt": None}) == ranked


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends in a assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 2 has the unknown role 'bot'"),
    ([{"role": "user", "content": "  "}], r"message 1 \(user\) is empty"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "a system message may only come first"),
    ([], "must be a non-empty list"),
    (["hello"], "message 1 must be"),
])
def test_a_bad_conversation_is_one_line(messages, reason):
    with pytest.raises(ValueError, match=reason):
        Task.from_dict({"messages": messages, "completions": ["x", "y"]})


def test_a_row_with_both_prompt_and_messages_is_refused():
    with pytest.raises(ValueError, match="either 'prompt' or 'messages'"):
        Task.from_dict({"prompt": "a", "messages": CHAT, "completions": ["x", "y"]})


def test_pair_reads_trl_conversational_forms_and_writes_the_explicit_one():
    from rlhf.records import Message

    prompt = CHAT
    explicit = Pair.from_dict({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Red."}],
                               "rejected": [{"role": "assistant", "content": "Blue."}]})
    implicit = Pair.from_dict({"chosen": prompt + [{"role": "assistant", "content": "Red."}],
                               "rejected": prompt + [{"role": "assistant", "content": "Blue."}]})
    assert explicit == implicit
    assert explicit.prompt[-1] == Message("user", "Name a colour.") and explicit.chosen == "Red."
    row = explicit.to_dict()
    assert row["prompt"] == CHAT and row["chosen"] == [{"role": "assistant", "content": "Red."}]
    assert Pair.from_dict(row) == explicit
    assert Pair.from_dict({"prompt": "p", "chosen": "a", "rejected": "b"}).to_dict()["chosen"] == "a"
    with pytest.raises(ValueError, match="differ before their last assistant turn"):
        Pair.from_dict({"chosen": prompt + [{"role": "assistant", "content": "Red."}],
                        "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "B"}]})
    with pytest.raises(ValueError, match="'chosen' ends in a user turn"):
        Pair.from_dict({"prompt": prompt, "chosen": [{"role": "user", "content": "x"}],
                        "rejected": [{"role": "assistant", "content": "y"}]})
