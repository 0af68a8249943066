"""`rlhf import` on the chat data users have: our tasks with messages, TRL's conversational preference rows
(explicit and implicit prompt) and HH-RLHF transcripts (.jsonl and .jsonl.gz), each on a small hand-made file;
a bad row is one line naming its file and line, and nothing is stored."""

import gzip
import json

import pytest

from labeling.store import open_store
from pipeline.cli import main
from rlhf.records import Message


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_rows(path, rows):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a terse librarian."}
CHAT = [SYSTEM, user("Do you have books on knots?"), assistant("Yes, shelf 4."), user("Any for sailors?")]
PROMPT = tuple(Message(m["role"], m["content"]) for m in CHAT)
HH_CHOSEN = ("\n\nHuman: Do you have books on knots?\n\nAssistant: Yes, shelf 4.\n\nHuman: Any for sailors?"
             "\n\nAssistant: The Ashley Book of Knots.")
HH_REJECTED = ("\n\nHuman: Do you have books on knots?\n\nAssistant: Yes, shelf 4.\n\nHuman: Any for sailors?"
               "\n\nAssistant: No.")


def stored(db):
    with open_store(db) as store:
        return [store.get_task(task_id) for task_id in store.task_ids()]


def test_every_chat_form_imports_as_a_conversation_task(tmp_path, capsys):
    files = [
        write_rows(tmp_path / "ours.jsonl", [{"id": "ours", "messages": CHAT,
                                              "completions": ["The Ashley Book of Knots.", "No.", "Try shelf 9."]}]),
        write_rows(tmp_path / "explicit.jsonl", [{"prompt": CHAT, "chosen": [assistant("The Ashley Book of Knots.")],
                                                  "rejected": [assistant("No.")]}]),
        write_rows(tmp_path / "implicit.jsonl", [{"chosen": CHAT + [assistant("The Ashley Book of Knots.")],
                                                  "rejected": CHAT + [assistant("No.")]}]),
        write_rows(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]),
        write_rows(tmp_path / "hh.jsonl.gz", [{"chosen": HH_CHOSEN.replace("knots", "ropes"),
                                               "rejected": HH_REJECTED.replace("knots", "ropes")}]),
        write_rows(tmp_path / "texts.jsonl", [{"prompt": "Name a knot.", "chosen": "Bowline.", "rejected": "Rope."}]),
    ]
    db = str(tmp_path / "labels.db")
    code, out, err = run(capsys, "import", "--db", db, *map(str, files))
    # explicit and implicit rows are the same task (same content, same id): stored once
    assert code == 0 and "imported 5 tasks (0 already present)" in out, err
    tasks = stored(db)
    assert tasks[0].prompt == PROMPT and [c.text for c in tasks[0].completions] == [
        "The Ashley Book of Knots.", "No.", "Try shelf 9."]
    assert tasks[1].prompt == PROMPT and [c.text for c in tasks[1].completions] == ["The Ashley Book of Knots.", "No."]
    # HH transcripts have no system message: the same turns after it
    assert tasks[2].prompt == PROMPT[1:] and [c.text for c in tasks[2].completions] == [
        "The Ashley Book of Knots.", "No."]
    assert tasks[3].prompt[0] == Message("user", "Do you have books on ropes?") and len(tasks[3].prompt) == 3
    assert tasks[4].prompt == "Name a knot." and [c.text for c in tasks[4].completions] == ["Bowline.", "Rope."]
    code, out, _ = run(capsys, "import", "--db", db, *map(str, files))
    assert code == 0 and "imported 0 tasks (5 already present)" in out


@pytest.mark.parametrize("bad_row, reason", [
    ({"messages": CHAT[:3], "completions": ["a", "b"]}, "'messages' ends in a assistant turn"),
    ({"messages": [user("Hi"), {"role": "narrator", "content": "x"}, user("Yo")], "completions": ["a", "b"]},
     "'messages' message 2 has the unknown role 'narrator'"),
    ({"messages": [user("Hi"), assistant(" "), user("Yo")], "completions": ["a", "b"]},
     "'messages' message 2 (assistant) is empty"),
    ({"prompt": CHAT, "chosen": [assistant("Same.")], "rejected": [assistant("Same.")]},
     "'chosen' and 'rejected' are the same reply"),
    ({"chosen": CHAT + [assistant("a")], "rejected": CHAT[:2] + [assistant("b")]},
     "'chosen' and 'rejected' differ before their last assistant turn"),
    ({"chosen": HH_CHOSEN + "\n\nHuman: and?", "rejected": HH_REJECTED}, "'chosen' ends in a user turn"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant:   ", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
     "'chosen' turn 2 (Assistant) is empty"),
    ({"chosen": "Hi there", "rejected": "Hello"}, "'prompt' must be a string or a list"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "Hello"}, "'rejected' is not a transcript"),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "'chosen' and 'rejected' are the same reply"),
])
def test_a_bad_chat_row_names_its_file_and_line_and_stores_nothing(tmp_path, capsys, bad_row, reason):
    good = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"messages": CHAT, "completions": ["x", "y"]}]
    for name in ("bad.jsonl", "bad.jsonl.gz"):
        path = write_rows(tmp_path / name, good + [bad_row])
        db = str(tmp_path / f"{name}.db")
        code, _, err = run(capsys, "import", "--db", db, str(path))
        assert code == 2 and err.startswith(f"rlhf import: error: {path}:3: ") and reason in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.db").exists()  # nothing stored, not even an empty database


def test_a_broken_gzip_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(b'{"chosen": "x"}\n')  # named .gz, not compressed
    code, _, err = run(capsys, "import", "--db", str(tmp_path / "l.db"), str(path))
    assert code == 2 and err.startswith(f"rlhf import: error: {path}: cannot read as gzip") and len(
        err.strip().splitlines()) == 1


def test_train_rm_data_reads_hh_transcripts_from_a_gzip_file(tmp_path):
    from reward_model.data import find_data

    write_rows(tmp_path / "hh.jsonl.gz", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "subset": "library"},
                                          {"chosen": HH_CHOSEN.replace("knots", "ropes"),
                                           "rejected": HH_REJECTED.replace("knots", "ropes")}])
    [first, second] = find_data(tmp_path / "hh.jsonl.gz").train
    assert (first.prompt, first.chosen, first.rejected) == (PROMPT[1:], "The Ashley Book of Knots.", "No.")
    assert second.prompt[0].content == "Do you have books on ropes?"
    write_rows(tmp_path / "bad.jsonl.gz", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                           {"chosen": HH_CHOSEN + "\n\nHuman: and?", "rejected": HH_REJECTED}])
    with pytest.raises(Exception, match=r"bad\.jsonl\.gz:2: 'chosen' ends in a user turn"):
        find_data(tmp_path / "bad.jsonl.gz")
