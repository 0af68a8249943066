"""Gold questions and annotator metrics: tasks with a known answer served blind at a rate, kept out of the
training data, scored per annotator (labeling.stats.gold_agreement); `rlhf stats --by annotator` and the admin
API's /api/admin/annotators and /api/admin/gold; a store written before gold questions migrates."""

from __future__ import annotations

import json
import math

import pytest
from labeling_helpers import make_tasks, order_ranks, raw_connection, write_tasks

from labeling.auth import add_annotator
from labeling.handlers import AppSettings
from labeling.stats import annotator_table, compute_stats, format_stats, gold_agreement, leave_one_out_agreement
from labeling.store import SCHEMA_VERSION, InvalidRanking, UnknownTask, display_order, open_store
from pipeline.cli import main

PASSWORD = "correct horse"


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


def gold_of(task, order):
    """A gold answer putting task.completions[order[0]] first, ..."""
    return order_ranks(task, order)


# ------------------------------------------------------------------------------------------- scoring

def test_gold_agreement_counts_pairs_the_answer_orders_and_ties_half():
    assert gold_agreement([1, 2, 3], [1, 2, 3]) == (3.0, 3)
    assert gold_agreement([3, 2, 1], [1, 2, 3]) == (0.0, 3)
    assert gold_agreement([1, 1, 2], [1, 2, 3]) == (2.5, 3)  # the tie of the first two: half a pair
    assert gold_agreement([2, 1, 3], [1, 1, 2]) == (2.0, 2)  # a pair the answer ties is not scored


def test_leave_one_out_agreement_uses_the_majority_of_the_others():
    own = {"a": 1, "b": 2, "c": 3}
    others = [{"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 1, "c": 3}, {"a": 1, "b": 3, "c": 2}]
    # a<b: others 2 of 3 agree -> agree; a<c: 3 of 3 -> agree; b<c: 2 for, 1 against -> agree
    assert leave_one_out_agreement(own, others) == (3, 3)
    assert leave_one_out_agreement(own, [{"a": 2, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 2}]) == (0, 0)  # no majority
    assert leave_one_out_agreement({"a": 1, "b": 1, "c": 2}, [{"a": 3, "b": 2, "c": 1}]) == (0, 2)


# ------------------------------------------------------------------------------------------- the store

def test_gold_questions_are_served_blind_at_the_rate_and_never_exported(store):
    tasks = make_tasks(4, k=3)
    store.import_tasks(tasks, gold={"task-3": gold_of(tasks[3], [2, 1, 0])})
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    assert store.gold_answers() == {"task-3": ({"task-3-0": 3, "task-3-1": 2, "task-3-2": 1}, None)}
    assert store.open_slots(overlap=1) == 3 and store.remaining("a", overlap=1) == 3  # not in the ordinary queue
    store.gold_draw = lambda: 0.99
    first = store.next_task("a", 1, gold_rate=0.5)
    assert first.id != "task-3"  # the draw was over the rate
    store.submit_ranking("a", first.id, order_ranks(first, [0, 1, 2]), require_assignment=True)
    store.gold_draw = lambda: 0.2
    gold = store.next_task("a", 1, gold_rate=0.5)
    assert gold.id == "task-3" and set(c.id for c in gold.completions) == {"task-3-0", "task-3-1", "task-3-2"}
    assert store.next_task("a", 1, gold_rate=0.0).id == "task-3"  # held until answered, like any task
    store.submit_ranking("a", "task-3", {"task-3-0": 3, "task-3-1": 1, "task-3-2": 2}, require_assignment=True)
    # every annotator answers it, whatever the overlap (a's ranking filled overlap 1 long ago)
    assert store.next_task("b", 1, gold_rate=1.0).id == "task-3"
    store.submit_ranking("b", "task-3", {"task-3-0": 3, "task-3-1": 2, "task-3-2": 1}, require_assignment=True)
    assert store.next_task("a", 1, gold_rate=1.0).id not in ("task-3", first.id)  # answered: ordinary tasks only
    assert [r.task_id for r in store.export_ranked_tasks()] == [first.id]  # never training data
    assert len(store.export_rankings()) == 3 and len(store.export_rankings(gold=False)) == 1
    assert store.progress(1).complete == 1 and store.progress(1).tasks == 4
    table = annotator_table(store).set_index("annotator")
    assert table.loc["a", "gold_tasks"] == 1 and table.loc["a", "gold_accuracy"] == pytest.approx(2 / 3)
    assert table.loc["b", "gold_accuracy"] == 1.0 and not table.loc["b", "flagged"]
    assert table.loc["a", "flagged"]  # 0.667 < 0.7
    assert math.isnan(table.loc["c", "gold_accuracy"]) and not table.loc["c", "flagged"]  # no answers: no flag


def test_no_gold_question_when_no_ordinary_task_is_left(store):
    tasks = make_tasks(2, k=2)
    store.import_tasks(tasks, gold={"task-1": gold_of(tasks[1], [0, 1])})
    store.add_annotator("a")
    task = store.next_task("a", 1, gold_rate=0.0)
    store.submit_ranking("a", task.id, order_ranks(task, [0, 1]), require_assignment=True)
    assert store.next_task("a", 1, gold_rate=1.0) is None  # a gold question alone would not be blind


def test_an_admin_marks_a_ranking_as_gold_and_its_author_is_not_scored(store):
    tasks = make_tasks(2, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b"):
        store.add_annotator(name)
    store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1, 2]))
    store.submit_ranking("b", "task-0", order_ranks(tasks[0], [2, 1, 0]))
    store.set_gold("task-0", store.get_own_ranking("a", "task-0").ranks, source="a")
    table = annotator_table(store).set_index("annotator")
    assert table.loc["a", "gold_tasks"] == 0 and table.loc["b", "gold_tasks"] == 1
    assert table.loc["b", "gold_accuracy"] == 0.0 and table.loc["b", "flagged"]
    assert list(store.export_ranked_tasks()) == []
    stats = compute_stats(store, overlap=1)
    assert [(a["name"], a["flagged"]) for a in stats["annotators"]] == [("a", False), ("b", True)]
    assert "FLAGGED" in format_stats(stats).splitlines()[3]  # b's line, after a's
    with pytest.raises(InvalidRanking, match="gold answer of task 'task-1'"):
        store.set_gold("task-1", {"task-1-0": 1})
    with pytest.raises(UnknownTask):
        store.set_gold("nope", {"x": 1})
    store.set_gold("task-0", None)  # an ordinary task again: its rankings are training data
    assert len(list(store.export_ranked_tasks())) == 2 and store.gold_answers() == {}


def test_annotator_table_on_hand_made_rankings(store):
    tasks = make_tasks(3, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    for task in tasks:
        first = display_order("a", task.id, [c.id for c in task.completions])[0]
        rest = [c.id for c in task.completions if c.id != first]
        store.submit_ranking("a", task.id, {first: 1, rest[0]: 2, rest[1]: 2}, seconds=10.0)  # always first shown
        store.submit_ranking("b", task.id, {first: 1, rest[0]: 2, rest[1]: 3}, seconds=30.0)
    store.skip_task("c", "task-0")
    table = annotator_table(store).set_index("annotator")
    assert table.loc["a", "ranked"] == 3 and table.loc["c", "skipped"] == 1
    assert table.loc["a", "first_shown_first_share"] == 1.0 and table.loc["a", "tie_share"] == 1.0
    assert table.loc["b", "tie_share"] == 0.0 and table.loc["b", "median_seconds"] == 30.0
    # b orders all 3 pairs per task; a (the only other) agrees on 2 and ties the third: no majority there
    assert table.loc["b", "loo_tasks"] == 3 and table.loc["b", "loo_agreement"] == 1.0
    assert table.loc["a", "loo_agreement"] == 1.0  # a's 2 strict pairs per task match b
    assert math.isnan(table.loc["c", "loo_agreement"])


def test_a_store_written_before_gold_questions_migrates_and_keeps_everything(db_url):
    tasks = make_tasks(3, k=2)
    with open_store(db_url) as store:
        store.import_tasks(tasks)
        store.add_annotator("a")
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [1, 0]), request_id="r1")
        store.skip_task("a", "task-1", reason="unsure")
        before = (store.export_rankings(), store.events(), store.history("a"))
    conn = raw_connection(db_url)  # the schema-3 store of the previous release
    for statement in ("ALTER TABLE rankings DROP COLUMN comment", "ALTER TABLE rankings DROP COLUMN flags",
                      "ALTER TABLE skips DROP COLUMN flags",
                      "DROP TABLE drafts", "DROP TABLE resolutions", "DROP INDEX tasks_gold",
                      "ALTER TABLE tasks DROP COLUMN gold_from",
                      "ALTER TABLE tasks DROP COLUMN gold", "DROP TABLE login_failures",
                      "UPDATE meta SET value = '3' WHERE key = 'schema_version'"):
        conn.execute(statement)
    conn.close()
    with open_store(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION == 8
        assert (store.export_rankings(), store.events(), store.history("a")) == before
        assert store.gold_answers() == {} and store.next_task("a", overlap=1).id == "task-2"
        store.set_gold("task-2", order_ranks(tasks[2], [0, 1]))
        assert "task-2" in store.gold_answers()
        store.resolve("task-0", order_ranks(tasks[0], [0, 1]), "a")  # the new event kind is accepted
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]), request_id="r2")
        events = store.events()
        assert events[:2] == before[1] and [e["kind"] for e in events[2:]] == ["resolve", "edit"]
        assert events[-1]["id"] > events[-2]["id"] > before[1][-1]["id"]  # ids go on after the copied ones


# ------------------------------------------------------------------------------------------- API and CLI

def test_admin_routes_for_gold_and_metrics(store):
    from fastapi.testclient import TestClient

    from labeling.app import create_app

    tasks = make_tasks(2, k=3)
    store.import_tasks(tasks)
    add_annotator(store, "alice", PASSWORD, role="admin")
    add_annotator(store, "bob", PASSWORD)
    store.submit_ranking("bob", "task-0", order_ranks(tasks[0], [0, 1, 2]))
    with TestClient(create_app(store, AppSettings(overlap=1), ui=False), client=("10.0.0.5", 1)) as client:
        client.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
        assert client.get("/api/admin/annotators").status_code == 403
        assert client.post("/api/admin/gold", json={"task_id": "task-0", "from": "bob"}).status_code == 403
        client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        answer = client.post("/api/admin/gold", json={"task_id": "task-0", "from": "bob"})
        assert answer.status_code == 200 and answer.json() == {
            "task_id": "task-0", "gold": {"task-0-0": 1, "task-0-1": 2, "task-0-2": 3}, "from": "bob"}
        assert client.post("/api/admin/gold", json={"task_id": "task-1", "from": "bob"}).status_code == 404
        assert client.post("/api/admin/gold", json={"task_id": "task-1", "ranks": {"task-1-0": 1}}).status_code == 422
        assert client.post("/api/admin/gold", json={"task_id": "task-1"}).status_code == 400
        metrics = client.get("/api/admin/annotators").json()
        assert metrics["gold_threshold"] == 0.7
        assert [(a["annotator"], a["ranked"], a["gold_tasks"]) for a in metrics["annotators"]] == [
            ("alice", 0, 0), ("bob", 1, 0)]  # bob's is the answer: not scored


def test_cli_imports_gold_answers_and_prints_annotator_metrics(tmp_path, capsys):
    tasks = make_tasks(3, k=2)
    rows = [t.to_dict() for t in tasks]
    rows[2]["gold"] = {"task-2-0": 2, "task-2-1": 1}
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "labels.db")
    assert main(["import", "--db", db, str(path)]) == 0
    assert "imported 3 tasks (0 already present, 1 of them gold questions)" in capsys.readouterr().out
    with open_store(db) as store:
        assert store.gold_answers() == {"task-2": ({"task-2-0": 2, "task-2-1": 1}, None)}
        store.add_annotator("a")
        store.submit_ranking("a", "task-2", {"task-2-0": 1, "task-2-1": 2})
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]))
    assert main(["stats", "--db", db, "--by", "annotator", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["by_annotator"]
    assert (row["annotator"], row["ranked"], row["gold_tasks"], row["gold_accuracy"], row["flagged"]) == (
        "a", 2, 1, 0.0, True)
    assert main(["stats", "--db", db, "--by", "annotator", "--format", "csv", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "by_annotator.csv").read_text().splitlines()[0].startswith(
        "annotator,ranked,skipped,median_seconds,gold_tasks,gold_accuracy,flagged,loo_tasks")
    assert main(["stats", "--db", db, "--by", "annotator"]) == 0
    assert "gold_accuracy" in capsys.readouterr().out
    bad = write_tasks(tmp_path / "bad.jsonl", make_tasks(1, k=2, prefix="bad"))
    bad.write_text(bad.read_text().replace('"completions"', '"gold": {"bad-0-0": 1}, "completions"'))
    assert main(["import", "--db", db, str(bad)]) == 2
    assert f"{bad}:1: " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- review

def test_review_lists_the_most_disagreeing_tasks_and_a_resolution_becomes_the_pairs(store, tmp_path):
    from labeling.export import export
    from labeling.stats import review_queue

    tasks = make_tasks(3, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b", "c", "boss"):
        store.add_annotator(name)
    for name, order in (("a", [0, 1, 2]), ("b", [2, 1, 0])):  # task-0: reversed, agreement 0
        store.submit_ranking(name, "task-0", order_ranks(tasks[0], order))
    for name, order in (("a", [0, 1, 2]), ("b", [0, 1, 2]), ("c", [0, 2, 1])):  # task-1: 7 of 9 pairs alike
        store.submit_ranking(name, "task-1", order_ranks(tasks[1], order))
    store.submit_ranking("a", "task-2", order_ranks(tasks[2], [0, 1, 2]))  # one ranking: nothing to review
    queue = review_queue(store)
    assert [(t["task_id"], t["agreement"]) for t in queue] == [("task-0", 0.0), ("task-1", pytest.approx(7 / 9))]
    assert [r["annotator"] for r in queue[0]["rankings"]] == ["a", "b"] and queue[0]["resolved"] is None
    resolved = order_ranks(tasks[0], [1, 0, 2])
    assert store.resolve("task-0", resolved, "boss") == resolved
    with pytest.raises(InvalidRanking):
        store.resolve("task-0", {"task-0-0": 1}, "boss")
    assert {k: review_queue(store)[0]["resolved"][k] for k in ("ranks", "by")} == {"ranks": resolved, "by": "boss"}
    (event,) = [e for e in store.events() if e["kind"] == "resolve"]
    assert (event["annotator"], event["task_id"], event["payload"]) == ("boss", "task-0",
                                                                       {"ranks": resolved, "previous": None})
    summary = export(store, tmp_path / "review", test_fraction=0.0, aggregate="review")
    rows = [json.loads(line) for line in (tmp_path / "review" / "train.jsonl").read_text().splitlines()]
    task0 = [r for r in rows if r["task_id"] == "task-0"]
    assert {r["annotator"] for r in task0} == {"review"} and len(task0) == 3  # the resolution's 3 pairs only
    assert sum(r["task_id"] == "task-1" for r in rows) == 9 and summary["train_pairs"] == 3 + 9 + 3
    assert export(store, tmp_path / "none", test_fraction=0.0)["train_pairs"] == 6 + 9 + 3  # every annotator's
    store.resolve("task-0", None, "boss")
    assert store.resolutions() == {} and [e["payload"]["previous"] for e in store.events()
                                          if e["kind"] == "resolve"] == [None, resolved]


def test_review_routes_are_for_admins(store):
    from fastapi.testclient import TestClient

    from labeling.app import create_app

    tasks = make_tasks(1, k=2)
    store.import_tasks(tasks)
    add_annotator(store, "alice", PASSWORD, role="admin")
    add_annotator(store, "bob", PASSWORD)
    store.submit_ranking("alice", "task-0", order_ranks(tasks[0], [0, 1]))
    store.submit_ranking("bob", "task-0", order_ranks(tasks[0], [1, 0]))
    with TestClient(create_app(store, AppSettings(overlap=2), ui=False), client=("10.0.0.6", 1)) as client:
        client.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
        assert client.get("/api/admin/review").status_code == 403
        assert client.post("/api/admin/review", json={"task_id": "task-0", "ranks": None}).status_code == 403
        client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        listed = client.get("/api/admin/review?limit=5").json()["tasks"]
        assert [(t["task_id"], t["agreement"]) for t in listed] == [("task-0", 0.0)]
        assert client.get("/api/admin/review?limit=0").status_code == 400
        answer = client.post("/api/admin/review", json={"task_id": "task-0", "ranks": {"task-0-0": 2, "task-0-1": 1}})
        assert answer.json() == {"task_id": "task-0", "ranks": {"task-0-0": 2, "task-0-1": 1}, "by": "alice"}
        assert client.post("/api/admin/review", json={"task_id": "task-0"}).status_code == 400
        assert client.post("/api/admin/review", json={"task_id": "nope", "ranks": None}).status_code == 404
    assert store.resolutions()["task-0"][:2] == ({"task-0-0": 2, "task-0-1": 1}, "alice")


def test_an_active_order_serves_gold_questions_only_at_the_rate(store):
    from labeling.active import ActiveQueue

    tasks = make_tasks(4, k=2)
    store.import_tasks(tasks, gold={"task-0": gold_of(tasks[0], [1, 0])})
    store.add_annotator("a")
    queue = ActiveQueue("random", seed=0, task_ids=store.task_ids())
    served = []
    while (task := queue.next_task(store, "a", 1, gold_rate=0.0)) is not None:
        store.submit_ranking("a", task.id, order_ranks(task, [0, 1]), require_assignment=True)
        served.append(task.id)
    assert sorted(served) == ["task-1", "task-2", "task-3"]  # the gold question is not in the order
    store.add_annotator("b")
    store.gold_draw = lambda: 0.0
    assert queue.next_task(store, "b", 2, gold_rate=0.5).id == "task-0"  # at the draw: the gold question


# ------------------------------------------------------------------------------------------- drafts

def test_a_draft_comes_back_with_the_task_until_it_is_submitted_or_skipped(store):
    from labeling import handlers

    tasks = make_tasks(2, k=3)
    store.import_tasks(tasks)
    add_annotator(store, "alice", PASSWORD)
    add_annotator(store, "bob", PASSWORD)
    settings = AppSettings(overlap=2)
    task = handlers.next_task(store, "alice", settings)["task"]
    first, second = task["completions"][0]["id"], task["completions"][1]["id"]
    saved = handlers.save_draft(store, "alice", settings, {"task_id": task["id"], "ranks": {first: 1}})
    assert saved == {"task_id": task["id"], "draft": {first: 1}}
    handlers.save_draft(store, "alice", settings, {"task_id": task["id"], "ranks": {first: 2, second: 1}})
    again = handlers.next_task(store, "alice", settings)  # a reload, or a new sign-in: the same task and draft
    assert again["task"]["id"] == task["id"] and again["draft"] == {first: 2, second: 1}
    assert handlers.open_task(store, "alice", settings, task["id"])["draft"] == {first: 2, second: 1}
    assert handlers.open_task(store, "bob", settings, task["id"])["draft"] is None  # one's own only
    assert store.export_rankings() == [] and store.progress(2).rankings == 0  # not a ranking
    for bad in ({"nope": 1}, {first: 0}, {first: 4}, {first: "1"}, {first: True}):
        with pytest.raises(InvalidRanking):
            store.save_draft("alice", task["id"], bad)
    with pytest.raises(handlers.RequestError):
        handlers.save_draft(store, "alice", settings, {"task_id": task["id"], "ranks": [1]})
    handlers.submit_ranking(store, "alice", settings, {"task_id": task["id"], "ranks": {
        c["id"]: r for c, r in zip(task["completions"], (1, 2, 3))}})
    assert store.draft("alice", task["id"]) is None  # submitted: the draft is done with
    other = handlers.next_task(store, "alice", settings)["task"]
    store.save_draft("alice", other["id"], {other["completions"][0]["id"]: 1})
    handlers.skip_task(store, "alice", settings, {"task_id": other["id"]})
    assert store.draft("alice", other["id"]) is None
    store.save_draft("bob", other["id"], {other["completions"][0]["id"]: 1})
    assert store.save_draft("bob", other["id"], {}) is None and store.draft("bob", other["id"]) is None
