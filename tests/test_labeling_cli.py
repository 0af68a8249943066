import argparse
import io
import json
import re
import sqlite3
import sys

import pytest
from labeling_helpers import make_tasks, write_tasks

from labeling.auth import verify_password
from labeling.store import open_store
from pipeline.cli import build_parser, main


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
        assert verify_password(store, "alice", "s3cret-password")
        assert not verify_password(store, "alice", "not this line")
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
    assert code == 0 and out.splitlines()[1].split() == ["alice", "annotator", "active", "0", "0"]
    assert len(out.splitlines()) == 2


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


def test_simulate_takes_the_queue_order_as_label_does_and_its_old_flag_for_one_release(tmp_path, capsys):
    parser = build_parser()
    common = ["simulate", "--db", "x.db", "--oracle", "length"]
    assert parser.parse_args([*common, "--order", "random"]).order == "random"
    assert parser.parse_args([*common, "--strategy", "uncertainty"]).order == "uncertainty"
    assert parser.parse_args(common).order == parser.parse_args(["label", "--db", "x.db"]).order == "fewest-rankings"
    db = str(tmp_path / "labels.db")
    code, _, err = run(capsys, "simulate", "--db", db, "--oracle", "length", "--order", "information")
    assert code == 2 and err == "rlhf simulate: error: --order information needs a reward model: --rm DIR, or " \
                                "--rm-every N to train one as it goes\n"
    assert run(capsys, "import", "--db", db, str(write_tasks(tmp_path / "t.jsonl", make_tasks(3, k=3))))[0] == 0
    code, _, err = run(capsys, "simulate", "--db", db, "--oracle", "length", "--strategy", "random")
    assert code == 0 and "rlhf simulate: --strategy is deprecated and will be removed in the next release; use " \
                         "--order" in err


def test_the_oracle_help_names_every_oracle_of_the_registry(capsys):
    from rlhf.oracles import BUILTIN

    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in BUILTIN), shown


def test_export_counts_one_prompt_in_the_singular(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    assert run(capsys, "import", "--db", db, str(write_tasks(tmp_path / "t.jsonl", make_tasks(2, k=3))))[0] == 0
    assert run(capsys, "simulate", "--db", db, "--oracle", "length", "--overlap", "1")[0] == 0
    code, out, _ = run(capsys, "export", "--db", db, "--out", str(tmp_path / "out"), "--test-fraction", "0.5")
    assert code == 0 and re.match(r"2 rankings of 2 prompts -> train: \d pairs \(1 prompt\), test: \d pairs "
                                  r"\(1 prompt\);", out), out


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


def test_end_to_end_50_tasks_k4_overlap2_3_annotators_gives_every_untied_pair(tmp_path, capsys):
    """import + simulate --oracle alliteration + export: every task's C(4,2) = 6 pairs per ranking, less
    the pairs of completions with equal oracle scores (ties); a task whose completions all tie is skipped."""
    from rlhf.oracles import alliteration

    tasks = make_tasks(50, k=4, seed=11)
    untied = {t.prompt: sum(alliteration(t.prompt, a.text) != alliteration(t.prompt, b.text)
                            for i, a in enumerate(t.completions) for b in t.completions[i + 1:]) for t in tasks}
    ranked_tasks = sum(1 for n in untied.values() if n)
    assert 0 < sum(untied.values()) < 50 * 6 and ranked_tasks >= 40  # the data has ties, and enough without
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", tasks)
    db, out = str(tmp_path / "labels.db"), tmp_path / "export"
    assert run(capsys, "import", "--db", db, str(tasks_file))[0] == 0
    code, text, _ = run(capsys, "simulate", "--db", db, "--oracle", "alliteration", "--annotators", "3",
                        "--overlap", "2", "--seed", "0")
    assert code == 0 and text.startswith(f"{2 * ranked_tasks} rankings by 3 annotators; "
                                         f"{ranked_tasks}/50 tasks have 2 rankings")
    code, text, _ = run(capsys, "export", "--db", db, "--out", str(out), "--test-fraction", "0.1")
    assert code == 0

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
    train, test, rankings = rows("train.jsonl"), rows("test.jsonl"), rows("rankings.jsonl")
    assert len(train) + len(test) == 2 * sum(untied.values())
    test_prompts = {r["prompt"] for r in rankings if r["split"] == "test"}
    assert len(test) == 2 * sum(untied[p] for p in test_prompts)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in test})
    assert len(rankings) == 2 * ranked_tasks

    code, text, _ = run(capsys, "stats", "--db", db, "--json")
    stats = json.loads(text)
    assert code == 0 and (stats["tasks"], stats["complete"], stats["rankings"]) == (50, ranked_tasks, 2 * ranked_tasks)
    assert stats["agreement"]["shared_tasks"] == ranked_tasks
    assert sum(a["ranked"] for a in stats["annotators"]) == 2 * ranked_tasks
    code, text, _ = run(capsys, "stats", "--db", db)
    assert code == 0 and f"agreement on {ranked_tasks} shared tasks" in text


# ------------------------------------------------------------------------------------- bad input files

def task_line(task_id="x", prompt="p", completions=("a", "b")) -> str:
    return json.dumps({"id": task_id, "prompt": prompt, "completions": list(completions)})


@pytest.mark.parametrize("bad_line, reason", [
    (task_line(completions=("a", "   \n")), "completion 'x-1' is blank"),
    (task_line(completions=("", "b")), "completion 'x-0' is blank"),
    (json.dumps({"id": "x", "prompt": "p", "completions": [{"text": "a", "num_tokens": True}, "b"]}),
     "'num_tokens' must be a non-negative integer"),
    (task_line(prompt="\ud800"), "'prompt' is not valid Unicode"),
    (task_line(completions=("a", "b\udfff")), "'text' is not valid Unicode"),
    (task_line(task_id="x\ud800"), "'id' is not valid Unicode"),
    ('{"id": "x", "prompt": "p", "completions": ["a", "b"], "n": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
])
def test_import_refuses_bad_tasks_into_a_new_path_and_leaves_no_file(tmp_path, capsys, bad_line, reason):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(task_line("ok") + "\n" + bad_line + "\n", encoding="utf-8", errors="surrogatepass")
    db = tmp_path / "new.db"
    code, _, err = run(capsys, "import", "--db", str(db), str(bad))
    assert code == 2 and err.startswith(f"rlhf import: error: {bad}:2: ") and reason in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [bad]  # no database file made


def test_a_failed_import_into_a_new_path_removes_the_database_it_made(tmp_path, capsys, monkeypatch):
    from labeling.store import SQLiteLabelStore, StorageUnavailable

    def disk_full(self, tasks, gold=None):
        raise StorageUnavailable(f"{self.path}: cannot write the label database (disk full); nothing was stored")

    good = write_tasks(tmp_path / "tasks.jsonl", make_tasks(2))
    monkeypatch.setattr(SQLiteLabelStore, "import_tasks", disk_full)
    code, _, err = run(capsys, "import", "--db", str(tmp_path / "new.db"), str(good))
    assert code == 2 and "disk full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.jsonl"]
    # into an existing database, a failure leaves the database as it was
    monkeypatch.undo()
    db = str(tmp_path / "old.db")
    assert run(capsys, "import", "--db", db, str(good))[0] == 0
    monkeypatch.setattr(SQLiteLabelStore, "import_tasks", disk_full)
    assert run(capsys, "import", "--db", db, str(good))[0] == 2
    monkeypatch.undo()
    with open_store(db, create=False) as store:
        assert store.count_tasks() == 2


def test_import_names_the_line_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((task_line("a") + "\n" + task_line("b") + "\n").encode()
                    + b'{"id": "caf\xe9", "prompt": "p", "completions": ["a", "b"]}\n')
    code, _, err = run(capsys, "import", "--db", str(tmp_path / "labels.db"), str(bad))
    assert code == 2 and err == f"rlhf import: error: {bad}:3: not UTF-8 text (byte 0xe9 at column 12)\n"
    assert not (tmp_path / "labels.db").exists()


def test_import_accepts_a_utf8_byte_order_mark(tmp_path, capsys):
    tasks = make_tasks(3)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(t.to_dict()) + "\r\n" for t in tasks).encode("utf-8"))
    db = str(tmp_path / "labels.db")
    code, out, err = run(capsys, "import", "--db", db, str(path))
    assert (code, err) == (0, "") and "imported 3 tasks" in out
    with open_store(db, create=False) as store:
        assert [store.get_task(t.id) for t in tasks] == tasks


def test_export_without_rankings_is_an_error_and_writes_nothing(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    assert run(capsys, "import", "--db", db, str(write_tasks(tmp_path / "tasks.jsonl", make_tasks(3))))[0] == 0
    out = tmp_path / "pairs"
    code, text, err = run(capsys, "export", "--db", db, "--out", str(out))
    assert code == 2 and text == ""
    assert err == ("rlhf export: error: the label store holds no rankings yet; nothing was written "
                   "(rank tasks with `rlhf label` or `rlhf simulate` first)\n")
    assert not out.exists()
    out.mkdir()
    (out / "train.jsonl").write_text("earlier export\n")
    assert run(capsys, "export", "--db", db, "--out", str(out))[0] == 2
    assert [p.name for p in out.iterdir()] == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == "earlier export\n"


def test_users_commands_manage_accounts_on_either_backend(db_url, capsys, monkeypatch):
    from labeling.auth import Sessions

    def with_stdin(text, *argv):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        return run(capsys, *argv)

    assert with_stdin("first password\n", "users", "add", "--db", db_url, "alice")[0] == 0
    code, out, _ = with_stdin("admin password\n", "users", "add", "--db", db_url, "--admin", "root")
    assert code == 0 and out == "added admin root\n"
    with open_store(db_url) as store:
        token = Sessions(store).create("alice")
    code, out, _ = run(capsys, "users", "disable", "--db", db_url, "alice")
    assert code == 0 and out == "disabled alice; 1 session ended\n"
    code, out, _ = run(capsys, "users", "list", "--db", db_url)
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [["alice", "annotator", "disabled"],
                                                                  ["root", "admin", "active"]]
    assert run(capsys, "users", "enable", "--db", db_url, "alice")[1] == "enabled alice\n"
    with open_store(db_url) as store:
        assert Sessions(store).annotator(token) is None  # disabling ended it for good
        token = Sessions(store).create("alice")
    code, out, _ = with_stdin("second password\n", "users", "reset-password", "--db", db_url, "alice")
    assert code == 0 and out == "gave a new password to alice; 1 session ended\n"
    with open_store(db_url) as store:
        assert verify_password(store, "alice", "second password") and not verify_password(store, "alice",
                                                                                            "first password")
        Sessions(store).create("alice")
    assert run(capsys, "users", "end-sessions", "--db", db_url, "alice")[1] == "signed out alice; 1 session ended\n"
    assert run(capsys, "users", "role", "--db", db_url, "alice", "admin")[1] == "alice is now an admin\n"
    for argv, error in ((["users", "disable", "--db", db_url, "nobody"], "unknown annotator 'nobody'"),
                        (["users", "role", "--db", db_url, "nobody", "admin"], "unknown annotator 'nobody'")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and error in err and len(err.splitlines()) == 1
    code, _, err = with_stdin("short\n", "users", "reset-password", "--db", db_url, "alice")
    assert code == 2 and "password must be" in err


def test_db_copy_between_backends(db_url, tmp_path, capsys, request):
    other = (str(tmp_path / "copy.db") if db_url.startswith("postgresql://")
             else request.getfixturevalue("postgres_cluster").new_database())
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", make_tasks(6))
    assert run(capsys, "import", "--db", db_url, str(tasks_file))[0] == 0
    assert run(capsys, "simulate", "--db", db_url, "--oracle", "length", "--annotators", "2")[0] == 0
    code, out, err = run(capsys, "db", "copy", "--from", db_url, "--to", other)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("copied ") and "events" in out and "checksum" in lines[-1]
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}
    assert counts["tasks"] == 6 and counts["rankings"] == 12 and counts["events"] >= 12
    with open_store(db_url) as source, open_store(other) as copy:
        assert copy.export_rankings() == source.export_rankings() and copy.events() == source.events()
    code, _, err = run(capsys, "db", "copy", "--from", db_url, "--to", other)  # again: the target holds data
    assert code == 2 and "is not empty (6 tasks, 24 completions" in err and len(err.splitlines()) == 1
    missing = tmp_path / "nothing-here.db"
    code, _, err = run(capsys, "db", "copy", "--from", str(missing), "--to", str(tmp_path / "new.db"))
    assert code == 2 and "no label database" in err and not (tmp_path / "new.db").exists()


def test_unreachable_postgresql_is_one_line_for_every_command(tmp_path, capsys):
    url = f"postgresql://postgres@/labels?host={tmp_path}"  # no server listens there
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", make_tasks(1))
    for argv in (["import", "--db", url, str(tasks_file)], ["users", "list", "--db", url], ["stats", "--db", url],
                 ["export", "--db", url, "--out", str(tmp_path / "out")], ["label", "--db", url, "--port", "0"],
                 ["simulate", "--db", url, "--oracle", "length"], ["db", "copy", "--from", url, "--to", url + "x"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "cannot connect to the label database" in err and len(err.splitlines()) == 1, argv
    assert not (tmp_path / "out").exists()
