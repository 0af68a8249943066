"""Comments and flags: each ranking or skip takes an optional comment and flags from the server's set (`rlhf label
--flags`); stored on SQLite and PostgreSQL (schema 8, migrated from 7), replaced by an edit and recorded in the event
log, refused whole when a flag is unknown or a comment too long, brought back when the task is reopened (from the
history, or by undoing the last answer), listed for admins, counted by `rlhf stats`, exported with the rankings,
and `rlhf export --exclude-flags` leaves the flagged rankings out. Also: undoing a submit or a skip (the browser's
"Undo the last answer" reopens the task) makes an edit, or a ranking of the skipped task."""

from __future__ import annotations

import json

import pytest
from labeling_helpers import make_tasks, order_ranks, raw_connection

from labeling import handlers
from labeling.auth import add_annotator
from labeling.commands import flag_names
from labeling.gradio_ui import LabelUI
from labeling.handlers import AppSettings, RequestError
from labeling.stats import compute_stats, format_stats
from labeling.store import MAX_COMMENT_LENGTH, SCHEMA_VERSION, InvalidRanking, open_store
from pipeline.cli import main

PASSWORD = "correct horse"
SETTINGS = AppSettings(overlap=2)
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "task_id", "annotator", "rank_chosen", "rank_rejected"]
"""TRL's preference columns, as the pair files have always had them."""


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    s.import_tasks(make_tasks(4, k=3))
    for name in ("a", "b"):
        s.add_annotator(name)
    yield s
    s.close()


def nothing_stored(store) -> bool:
    return store.export_rankings() == [] and store.events() == [] and store.notes() == []


# ------------------------------------------------------------------------------------------------ storage

def test_comment_and_flags_are_stored_edited_and_logged(store):
    task = store.get_task("task-0")
    first = store.submit_ranking("a", "task-0", order_ranks(task, [0, 1, 2]), comment="<b>looks</b> ünïcode",
                                 flags=["unsafe", "off-topic", "unsafe"])
    assert (first.ranking.comment, first.ranking.flags) == ("<b>looks</b> ünïcode", ("off-topic", "unsafe"))
    own = store.get_own_ranking("a", "task-0")
    assert (own.comment, own.flags) == ("<b>looks</b> ünïcode", ("off-topic", "unsafe"))
    # An edit replaces them; the event log keeps both.
    store.submit_ranking("a", "task-0", order_ranks(task, [2, 1, 0]), comment=None, flags=["duplicate"])
    own = store.get_own_ranking("a", "task-0")
    assert (own.comment, own.flags) == (None, ("duplicate",))
    submit, edit = store.events()
    assert (submit["payload"]["comment"], submit["payload"]["flags"]) == ("<b>looks</b> ünïcode",
                                                                          ["off-topic", "unsafe"])
    assert {k: edit["payload"][k] for k in ("comment", "flags", "previous_comment", "previous_flags")} == {
        "comment": None, "flags": ["duplicate"], "previous_comment": "<b>looks</b> ünïcode",
        "previous_flags": ["off-topic", "unsafe"]}
    # A skip keeps its flags, its reason being its comment; ranking the task later replaces the skip.
    store.skip_task("b", "task-1", reason="cut off", flags=["broken-prompt"])
    assert store.get_own_skip("b", "task-1") == ("cut off", ("broken-prompt",))
    assert store.events()[-1]["payload"] == {"reason": "cut off", "flags": ["broken-prompt"]}
    assert [(n["task_id"], n["annotator"], n["status"], n["flags"], n["comment"]) for n in store.notes()] == [
        ("task-1", "b", "skipped", ["broken-prompt"], "cut off"), ("task-0", "a", "ranked", ["duplicate"], None)]
    store.submit_ranking("b", "task-1", order_ranks(store.get_task("task-1"), [0, 1, 2]))
    assert store.get_own_skip("b", "task-1") is None
    assert [r.flags for r in store.export_rankings()] == [("duplicate",), ()]
    ranked = list(store.export_ranked_tasks())
    assert [(r.comment, r.flags) for r in ranked] == [(None, ("duplicate",)), (None, ())]


@pytest.mark.parametrize("kwargs, message", [
    ({"comment": "x" * (MAX_COMMENT_LENGTH + 1)}, f"comment must be text of at most {MAX_COMMENT_LENGTH}"),
    ({"comment": 5}, "comment must be text"),
    ({"comment": "nul\x00"}, "comment must be text"),
    ({"flags": "unsafe"}, "flags must be a list of flag names"),
    ({"flags": ["Unsafe!"]}, "'Unsafe!' is not a flag name"),
    ({"flags": [7]}, "'7' is not a flag name"),
    ({"flags": [f"f{i}" for i in range(21)]}, "at most 20 flags"),
])
def test_a_bad_comment_or_flag_stores_nothing(store, kwargs, message):
    task = store.get_task("task-0")
    with pytest.raises(InvalidRanking, match=message):
        store.submit_ranking("a", "task-0", order_ranks(task, [0, 1, 2]), **kwargs)
    skip = {"reason": kwargs["comment"]} if "comment" in kwargs else kwargs
    with pytest.raises(InvalidRanking):
        store.skip_task("a", "task-0", **skip)
    assert nothing_stored(store) and not store.has_skipped("a", "task-0")
    store.submit_ranking("a", "task-0", order_ranks(task, [0, 1, 2]), comment="x" * MAX_COMMENT_LENGTH)
    assert len(store.get_own_ranking("a", "task-0").comment) == MAX_COMMENT_LENGTH  # the limit itself is fine


def test_a_schema_7_store_migrates_without_losing_rows(db_url):
    tasks = make_tasks(3, k=3)
    with open_store(db_url) as store:
        store.import_tasks(tasks)
        store.add_annotator("a")
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [1, 0, 2]), request_id="r1", seconds=2.5)
        store.skip_task("a", "task-1", reason="unsure")
        store.save_draft("a", "task-2", {"task-2-0": 1})
        store.resolve("task-0", order_ranks(tasks[0], [0, 1, 2]), "a")
    conn = raw_connection(db_url)  # the store as schema 7 wrote it
    for statement in ("ALTER TABLE rankings DROP COLUMN comment", "ALTER TABLE rankings DROP COLUMN flags",
                      "ALTER TABLE skips DROP COLUMN flags",
                      "UPDATE meta SET value = '7' WHERE key = 'schema_version'"):
        conn.execute(statement)
    rows = {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("rankings", "skips", "drafts", "resolutions", "events")}
    conn.close()
    assert rows == {"rankings": 1, "skips": 1, "drafts": 1, "resolutions": 1, "events": 3}
    with open_store(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION == 8
        assert {t: n for t, n in store.row_counts().items() if t in rows} == rows
        ranking = store.get_own_ranking("a", "task-0")
        assert (ranking.ranks, ranking.seconds, ranking.request_id) == (order_ranks(tasks[0], [1, 0, 2]), 2.5, "r1")
        assert (ranking.comment, ranking.flags) == (None, ())
        assert store.get_own_skip("a", "task-1") == ("unsure", ())
        assert store.draft("a", "task-2") == {"task-2-0": 1} and "task-0" in store.resolutions()
        assert [e["kind"] for e in store.events()] == ["submit", "skip", "resolve"]
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1, 2]), flags=["unsafe"], comment="now")
        assert store.get_own_ranking("a", "task-0").flags == ("unsafe",)


# ------------------------------------------------------------------------------------------------ the app

@pytest.fixture
def app_store(db_url):
    s = open_store(db_url)
    s.import_tasks(make_tasks(3, k=3))
    add_annotator(s, "alice", PASSWORD)
    yield s
    s.close()


def ranks_for(task: dict, order: list[int]) -> dict[str, int]:
    return {c["id"]: r for c, r in zip(task["completions"], order)}


def test_handlers_take_comment_and_flags_and_refuse_unknown_flags(app_store):
    store = app_store
    task = handlers.next_task(store, "alice", SETTINGS)["task"]
    payload = {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3]), "request_id": "r1"}
    for bad, message in ((["unsafe", "nsfw"], r"unknown flag 'nsfw' \(this server's flags: unsafe, broken-prompt, "
                                              r"off-topic, duplicate\)"),
                         ("unsafe", "'flags' must be a list")):
        with pytest.raises(RequestError, match=message):
            handlers.submit_ranking(store, "alice", SETTINGS, {**payload, "flags": bad})
        with pytest.raises(RequestError, match=message):
            handlers.skip_task(store, "alice", SETTINGS, {"task_id": task["id"], "flags": bad})
    with pytest.raises(RequestError, match="'comment' must be a string"):
        handlers.submit_ranking(store, "alice", SETTINGS, {**payload, "comment": ["x"]})
    with pytest.raises(InvalidRanking, match="at most 500 characters"):
        handlers.submit_ranking(store, "alice", SETTINGS, {**payload, "comment": "y" * 501})
    with pytest.raises(RequestError, match=r"unknown flag 'unsafe' \(this server's flags: none\)"):
        handlers.submit_ranking(store, "alice", AppSettings(flags=()), {**payload, "flags": ["unsafe"]})
    assert nothing_stored(store)
    result = handlers.submit_ranking(store, "alice", SETTINGS, {**payload, "comment": "  <i>hm</i>  ",
                                                                "flags": ["unsafe", "duplicate"]})
    assert (result["comment"], result["flags"]) == ("<i>hm</i>", ["duplicate", "unsafe"])
    opened = handlers.open_task(store, "alice", SETTINGS, task["id"])
    assert opened["own"] == {"ranks": ranks_for(task, [1, 2, 3]), "comment": "<i>hm</i>",
                             "flags": ["duplicate", "unsafe"]} and opened["skipped"] is None
    # A skip with a reason and a flag comes back when the task is reopened.
    other = handlers.next_task(store, "alice", SETTINGS)["task"]
    handlers.skip_task(store, "alice", SETTINGS, {"task_id": other["id"], "reason": " ", "flags": ["broken-prompt"]})
    assert handlers.open_task(store, "alice", SETTINGS, other["id"])["skipped"] == {"reason": None,
                                                                                  "flags": ["broken-prompt"]}
    assert handlers.session_info(store, "alice", SETTINGS)["flags"] == list(SETTINGS.flags)


def test_the_api_refuses_an_unknown_flag_or_a_long_comment_in_one_line(app_store):
    from fastapi.testclient import TestClient

    from labeling.app import create_app

    store = app_store
    with TestClient(create_app(store, SETTINGS, ui=False)) as client:
        assert client.post("/api/login", json={"username": "alice", "password": PASSWORD}).status_code == 200
        task = client.get("/api/next").json()["task"]
        body = {"task_id": task["id"], "ranks": ranks_for(task, [2, 1, 3]), "request_id": "r1"}
        response = client.post("/api/rankings", json={**body, "flags": ["unsafe", "<script>"]})
        assert response.status_code == 400 and response.json() == {
            "error": "unknown flag '<script>' (this server's flags: unsafe, broken-prompt, off-topic, duplicate)"}
        response = client.post("/api/rankings", json={**body, "comment": "z" * 501})
        assert response.status_code == 422 and response.json() == {
            "error": "comment must be text of at most 500 characters"}
        response = client.post("/api/skip", json={"task_id": task["id"], "flags": ["nope"]})
        assert response.status_code == 400 and "\n" not in response.json()["error"]
        assert nothing_stored(store)
        response = client.post("/api/rankings", json={**body, "comment": "fine", "flags": ["off-topic"]})
        assert response.status_code == 200 and response.json()["flags"] == ["off-topic"]
        assert client.get(f"/api/task?id={task['id']}").json()["own"]["comment"] == "fine"
    assert [(r.comment, r.flags) for r in store.export_rankings()] == [("fine", ("off-topic",))]


def test_undoing_a_submit_is_an_edit_and_undoing_a_skip_lets_it_be_ranked(app_store):
    """The browser's "Undo the last answer" reopens the task (`LabelUI.open`, as `on_reopen` does); the answer
    sent then is an edit of the ranking, or a ranking of the skipped task."""
    store = app_store
    ui = LabelUI(store, SETTINGS)
    task = json.loads(ui.next_view("alice")[0])["task"]
    ui.submit("alice", {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3]), "request_id": "r1",
                        "comment": "first", "flags": ["unsafe"]})
    reopened = json.loads(ui.open("alice", task["id"]))
    assert reopened["editing"] and reopened["own"] == {"ranks": ranks_for(task, [1, 2, 3])}
    assert reopened["notes"] == {"comment": "first", "flags": ["unsafe"]}
    assert reopened["flags"] == list(SETTINGS.flags)
    value, _ = ui.submit("alice", {"task_id": task["id"], "ranks": ranks_for(task, [3, 2, 1]), "request_id": "r2",
                                   "comment": "second", "flags": []})
    assert json.loads(value)["notice"] == "Ranking updated."
    other = json.loads(value)["task"]
    ui.skip("alice", {"task_id": other["id"], "reason": "cut off", "flags": ["broken-prompt"], "request_id": "s1"})
    reopened = json.loads(ui.open("alice", other["id"]))
    assert reopened["own"] is None and reopened["notes"] == {"comment": "cut off", "flags": ["broken-prompt"]}
    value, _ = ui.submit("alice", {"task_id": other["id"], "ranks": ranks_for(other, [2, 1, 3]), "request_id": "r3"})
    assert json.loads(value)["notice"] == "Ranking saved."
    assert [(e["kind"], e["task_id"]) for e in store.events()] == [
        ("submit", task["id"]), ("edit", task["id"]), ("skip", other["id"]), ("submit", other["id"])]
    assert store.events()[1]["payload"]["previous_comment"] == "first"
    assert store.get_own_ranking("alice", other["id"]).ranks == ranks_for(other, [2, 1, 3])
    assert not store.has_skipped("alice", other["id"]) and store.progress(2).rankings == 2


# ------------------------------------------------------------------------------------------------ stats, export, CLI

def flagged_store(url):
    store = open_store(url)
    tasks = make_tasks(4, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b"):
        store.add_annotator(name)
    store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1, 2]), flags=["unsafe"], comment="<b>no</b>")
    store.submit_ranking("b", "task-0", order_ranks(tasks[0], [0, 2, 1]))
    store.submit_ranking("a", "task-1", order_ranks(tasks[1], [2, 1, 0]), flags=["unsafe", "off-topic"])
    store.submit_ranking("a", "task-2", order_ranks(tasks[2], [1, 0, 2]), comment="fine")
    store.skip_task("b", "task-3", flags=["broken-prompt", "unsafe"])
    return store


def test_stats_count_each_flag(db_url):
    from labeling.stats import review_queue, stats_tables

    with flagged_store(db_url) as store:
        stats = compute_stats(store, overlap=2)
        review = review_queue(store)  # what an admin reviews (GET /api/admin/review) carries them too
        flags = stats_tables(store)["flags"]  # `rlhf stats --format csv|json`
    assert flags.to_dict("records") == [{"flag": "unsafe", "rankings": 2, "skips": 1},
                                        {"flag": "broken-prompt", "rankings": 0, "skips": 1},
                                        {"flag": "off-topic", "rankings": 1, "skips": 0}]
    assert [(r["annotator"], r["comment"], r["flags"]) for r in review[0]["rankings"]] == [
        ("a", "<b>no</b>", ["unsafe"]), ("b", None, [])]
    assert stats["flags"] == {"unsafe": {"rankings": 2, "skips": 1}, "broken-prompt": {"rankings": 0, "skips": 1},
                              "off-topic": {"rankings": 1, "skips": 0}}
    assert ("flags: unsafe 3 (2 ranked, 1 skipped), broken-prompt 1 (0 ranked, 1 skipped), off-topic 1 (1 ranked, "
            "0 skipped)") in format_stats(stats).splitlines()


def test_export_carries_comment_and_flags_and_excludes_flagged_rankings(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    flagged_store(db).close()
    out = tmp_path / "all"
    assert main(["export", "--db", db, "--out", str(out), "--test-fraction", "0"]) == 0
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["annotator"], r["comment"], r["flags"]) for r in rows] == [
        ("task-0", "a", "<b>no</b>", ["unsafe"]), ("task-0", "b", None, []),
        ("task-1", "a", None, ["off-topic", "unsafe"]), ("task-2", "a", "fine", [])]
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 * 3 and all(list(p) == PAIR_COLUMNS for p in pairs)  # TRL's columns, nothing added

    import pyarrow.parquet as pq
    from datasets import load_from_disk

    assert pq.read_table(out / "rankings.parquet").column("flags").to_pylist()[2] == ["off-topic", "unsafe"]
    assert pq.read_table(out / "train.parquet").column_names == PAIR_COLUMNS
    assert load_from_disk(str(out / "rankings_dataset"))["train"][0]["comment"] == "<b>no</b>"

    kept = tmp_path / "kept"
    assert main(["export", "--db", db, "--out", str(kept), "--test-fraction", "0", "--exclude-flags",
                 "unsafe,duplicate"]) == 0
    assert "2 rankings flagged unsafe,duplicate left out" in capsys.readouterr().out
    rows = [json.loads(line) for line in (kept / "rankings.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["annotator"]) for r in rows] == [("task-0", "b"), ("task-2", "a")]
    pairs = [json.loads(line) for line in (kept / "train.jsonl").read_text().splitlines()]
    assert sorted({(p["task_id"], p["annotator"]) for p in pairs}) == [("task-0", "b"), ("task-2", "a")]
    assert len(pairs) == 6
    meta = json.loads((kept / "export.json").read_text())
    assert (meta["excluded_flags"], meta["excluded_rankings"]) == (["duplicate", "unsafe"], 2)
    with pytest.raises(SystemExit):
        main(["export", "--db", db, "--out", str(tmp_path / "x"), "--exclude-flags", "Unsafe"])
    assert "'Unsafe' is not a flag name" in capsys.readouterr().err


def test_the_flags_option_is_a_list_of_names():
    assert flag_names("unsafe, broken-prompt,,unsafe") == ("unsafe", "broken-prompt")
    assert flag_names("") == ()
    with pytest.raises(Exception, match="'No Way' is not a flag name"):
        flag_names("ok,No Way")
