import argparse
import io
import json
import sqlite3
import sys

import pytest

from labeling.store import open_store
from labeling_helpers import make_tasks, write_tasks
from rlhf.cli import build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_reports_counts_and_is_idempotent(tmp_path, capsys):
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", make_tasks(7))
    db = str(tmp_path / "labels.db")
    code, out, _ = run(capsys, "import", "--db", db, str(tasks_file))
    assert code == 0 and "imported 7 tasks (0 already present)" in out
    code, out, _ = run(capsys, "import", "--db", db, str(tasks_file))
    assert code == 0 and "imported 0 tasks (7 already present)" in out and "7 tasks in total" in out


@pytest.mark.parametrize("bad_line, reason", [
    ('{"id": "x", "prompt": "p", "completions": ["only one"]}', "at least 2 completions"),
    ('{"id": "x", "prompt": "p", "completions": ["a", "b"]', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "task-1", "prompt": "changed", "completions": ["a", "b"]}', "repeats with different content"),
])
def test_import_malformed_line_names_it_and_imports_nothing(tmp_path, capsys, bad_line, reason):
    db = str(tmp_path / "labels.db")
    good = write_tasks(tmp_path / "good.jsonl", make_tasks(2, prefix="old"))
    assert run(capsys, "import", "--db", db, str(good))[0] == 0
    lines = [json.dumps(t.to_dict()) for t in make_tasks(3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines + [bad_line]) + "\n", encoding="utf-8")
    other = write_tasks(tmp_path / "other.jsonl", make_tasks(2, prefix="other"))
    code, out, err = run(capsys, "import", "--db", db, str(other), str(bad))
    assert code == 2
    assert err.startswith(f"rlhf import: error: {bad}:4: ") and reason in err
    assert len(err.strip().splitlines()) == 1
    with open_store(db) as store:
        assert store.count_tasks() == 2  # only the earlier import: nothing from this call


def test_users_add_reads_password_from_stdin(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "labels.db")
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-password\nnot this line\n"))
    code, out, _ = run(capsys, "users", "add", "--db", db, "alice")
    assert code == 0 and "added annotator alice" in out
    with open_store(db) as store:
        assert store.verify_password("alice", "s3cret-password")
        assert not store.verify_password("alice", "not this line")
    stored = sqlite3.connect(db).execute("SELECT password_hash FROM annotators").fetchone()[0]
    assert "s3cret-password" not in stored

    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-password\n"))
    code, _, err = run(capsys, "users", "add", "--db", db, "alice")
    assert code == 2 and "already exists" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    code, _, err = run(capsys, "users", "add", "--db", db, "bob")
    assert code == 2 and "password must be" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(capsys, "users", "add", "--db", db, "bob")
    assert code == 2 and "no password given" in err
    code, _, err = run(capsys, "users", "add", "--db", db, "bad name")
    assert code == 2 and "annotator name 'bad name'" in err

    code, out, _ = run(capsys, "users", "list", "--db", db)
    assert code == 0 and out.splitlines()[1].split() == ["alice", "0", "0"] and len(out.splitlines()) == 2


def test_read_only_commands_do_not_create_a_database(tmp_path, capsys):
    db = tmp_path / "missing.db"
    for argv in (["export", "--db", str(db), "--out", str(tmp_path / "out")], ["stats", "--db", str(db)],
                 ["users", "list", "--db", str(db)],
                 ["simulate", "--db", str(db), "--oracle", "alliteration"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "no label database" in err
    assert not db.exists() and not (tmp_path / "out").exists()


def test_simulate_rejects_unknown_oracle_and_empty_store(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    write_tasks(tmp_path / "empty.jsonl", [])
    assert run(capsys, "import", "--db", db, str(tmp_path / "empty.jsonl"))[0] == 0
    code, _, err = run(capsys, "simulate", "--db", db, "--oracle", "nonsense")
    assert code == 2 and "unknown oracle 'nonsense'" in err
    code, _, err = run(capsys, "simulate", "--db", db, "--oracle", "length")
    assert code == 2 and "has no tasks" in err


def test_every_labeling_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    stack = [sub.choices[name] for name in ("import", "users", "simulate", "export", "stats")]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{p.prog} {action.dest} has no help"
                checked += 1
    assert checked >= 15


def test_end_to_end_50_tasks_k4_overlap2_3_annotators_gives_600_pairs(tmp_path, capsys):
    """The issue's acceptance run: import + simulate --oracle alliteration + export -> 50*2*6 = 600 pairs."""
    tasks = make_tasks(50, k=4, seed=11)
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", tasks)
    db, out = str(tmp_path / "labels.db"), tmp_path / "export"
    assert run(capsys, "import", "--db", db, str(tasks_file))[0] == 0
    code, text, _ = run(capsys, "simulate", "--db", db, "--oracle", "alliteration", "--annotators", "3",
                        "--overlap", "2", "--seed", "0")
    assert code == 0 and text.startswith("100 rankings by 3 annotators; 50/50 tasks have 2 rankings")
    code, text, _ = run(capsys, "export", "--db", db, "--out", str(out), "--test-fraction", "0.1")
    assert code == 0

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
    train, test, rankings = rows("train.jsonl"), rows("test.jsonl"), rows("rankings.jsonl")
    assert len(train) + len(test) == 50 * 2 * 6 == 600
    assert len(test) == 5 * 2 * 6  # 10% of 50 prompts held out, 12 pairs each
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in test})
    assert len(rankings) == 100 and sum(r["split"] == "test" for r in rankings) == 10
    assert text.startswith("100 rankings of 50 prompts -> train: 540 pairs (45 prompts), test: 60 pairs (5 prompts)")

    code, text, _ = run(capsys, "stats", "--db", db, "--json")
    stats = json.loads(text)
    assert code == 0 and (stats["tasks"], stats["complete"], stats["rankings"]) == (50, 50, 100)
    assert stats["agreement"]["shared_tasks"] == 50
    assert sum(a["ranked"] for a in stats["annotators"]) == 100
    code, text, _ = run(capsys, "stats", "--db", db)
    assert code == 0 and "agreement on 50 shared tasks" in text
