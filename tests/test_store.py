import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from labeling_helpers import make_tasks, order_ranks

from labeling.store import (
    ASSIGNMENT_SECONDS,
    PREVIEW_CHARS,
    AnnotatorExists,
    ConflictingTask,
    InvalidRanking,
    NotAssigned,
    RequestIdReused,
    SQLiteLabelStore,
    UnknownAnnotator,
    UnknownTask,
    display_order,
    open_store,
    queue_key,
)
from rlhf.errors import UserError
from rlhf.records import Completion, RankedCompletion, Task


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "labels.db")
    yield s
    s.close()


def add_users(store, *names):
    for name in names:
        store.add_annotator(name)


def ranking_count(store, task_id):
    return sum(r.task_id == task_id for r in store.export_rankings())


# --------------------------------------------------------------------------------------------- import

def test_import_is_idempotent_and_counts(store):
    tasks = make_tasks(5)
    assert store.import_tasks(tasks) == (5, 0)
    assert store.import_tasks(tasks) == (0, 5)
    assert store.import_tasks(tasks[:2] + make_tasks(3, prefix="more")) == (3, 2)
    assert store.count_tasks() == 8
    assert store.get_task("task-3") == tasks[3]  # completions come back in stored order, all fields kept


def test_import_conflicting_id_names_it_and_stores_nothing(store):
    store.import_tasks(make_tasks(2))
    changed = Task.from_dict({"id": "task-1", "prompt": "a different prompt", "completions": ["x", "y"]})
    with pytest.raises(ConflictingTask, match="'task-1'"):
        store.import_tasks(make_tasks(3, prefix="new") + [changed])
    assert store.count_tasks() == 2  # the three new tasks of the failed call were rolled back
    with pytest.raises(UnknownTask):
        store.get_task("new-0")


# ---------------------------------------------------------------------------------------------- queue

def test_queue_serves_fewest_rankings_first_and_respects_overlap(store):
    tasks = make_tasks(6, k=3)
    store.import_tasks(tasks)
    add_users(store, "a", "b", "c", "d")
    served = {name: [] for name in "abcd"}
    # Interleave annotators; every served task must have the minimum count among the tasks eligible for them.
    for _ in range(30):
        progressed = False
        for name in "abcd":
            task = store.next_task(name, overlap=2)
            if task is None:
                continue
            counts = {t.id: ranking_count(store, t.id) for t in tasks}
            mine = set(served[name])
            eligible = [tid for tid, n in counts.items() if n < 2 and tid not in mine]
            assert task.id in eligible
            assert counts[task.id] == min(counts[tid] for tid in eligible)
            store.submit_ranking(name, task.id, order_ranks(task, [0, 1, 2]))
            served[name].append(task.id)
            progressed = True
        if not progressed:
            break
    assert all(store.next_task(name, 2) is None for name in "abcd")
    assert all(ranking_count(store, t.id) == 2 for t in tasks)  # overlap reached exactly, never exceeded
    assert sum(len(v) for v in served.values()) == 12
    for name, ids in served.items():
        assert len(ids) == len(set(ids))  # never the same task twice to one annotator


def test_queue_never_serves_a_full_task_or_own_task(store):
    store.import_tasks(make_tasks(2, k=2))
    add_users(store, "a", "b", "c")
    store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2})
    store.submit_ranking("b", "task-0", {"task-0-0": 2, "task-0-1": 1})
    assert store.next_task("c", overlap=2).id == "task-1"      # task-0 is full at overlap 2
    assert store.next_task("a", overlap=3).id == "task-1"      # fewer rankings first ...
    store.submit_ranking("c", "task-1", {"task-1-0": 1, "task-1-1": 2})
    assert store.next_task("a", overlap=3).id == "task-1"      # ... and never a's own task-0
    assert store.next_task("c", overlap=3).id == "task-0"
    assert store.remaining("c", overlap=3) == 1
    assert store.open_slots(overlap=3) == 1 + 2


def test_queue_is_deterministic_with_per_annotator_tiebreak(store, tmp_path):
    store.import_tasks(make_tasks(10))
    add_users(store, "a", "b")
    first = store.next_task("a", 2).id
    assert store.next_task("a", 2).id == first
    assert first == min((f"task-{i}" for i in range(10)), key=lambda tid: queue_key("a", tid))
    assert store.next_task("b", 2).id == min((f"task-{i}" for i in range(10)), key=lambda tid: queue_key("b", tid))
    assert len({min(range(10), key=lambda i: queue_key(name, f"task-{i}")) for name in "abcdefgh"}) > 2
    with open_store(tmp_path / "labels.db") as again:  # same answer from a fresh connection
        assert again.next_task("a", 2).id == first


def test_skipped_task_is_not_served_again_but_can_be_ranked_later(store):
    store.import_tasks(make_tasks(3, k=2))
    add_users(store, "a", "b")
    skipped = store.next_task("a", 2)
    assert store.skip_task("a", skipped.id, reason="offensive").action == "skip"
    served = []
    while (task := store.next_task("a", 2)) is not None:
        served.append(task.id)
        store.submit_ranking("a", task.id, order_ranks(task, [0, 1]))
    assert skipped.id not in served and len(served) == 2
    assert store.next_task("b", 2).id == skipped.id  # others still get it (it has the fewest rankings)
    assert [h.status for h in store.history("a") if h.task_id == skipped.id] == ["skipped"]
    result = store.submit_ranking("a", skipped.id, order_ranks(skipped, [1, 0]))  # ranked later from history
    assert result.action == "submit"
    assert [h.status for h in store.history("a") if h.task_id == skipped.id] == ["ranked"]
    assert store.progress(2).skips == 0
    with pytest.raises(InvalidRanking, match="already ranked"):
        store.skip_task("a", skipped.id)
    assert [e["kind"] for e in store.events()] == ["skip", "submit", "submit", "submit"]


def test_display_order_is_a_stable_per_annotator_shuffle(store, tmp_path):
    tasks = make_tasks(20)
    store.import_tasks(tasks)
    add_users(store, "a", "b")
    orders_a = {t.id: [c.id for c in store.task_for("a", t.id).completions] for t in tasks}
    orders_b = {t.id: [c.id for c in store.task_for("b", t.id).completions] for t in tasks}
    for t in tasks:
        assert sorted(orders_a[t.id]) == sorted(c.id for c in t.completions)
        assert orders_a[t.id] == display_order("a", t.id, [c.id for c in t.completions])
    assert sum(orders_a[t.id] != orders_b[t.id] for t in tasks) >= 10  # annotators see different orders
    assert sum(orders_a[t.id] != [c.id for c in t.completions] for t in tasks) >= 10  # not the stored order
    served = store.next_task("a", 2)
    assert [c.id for c in served.completions] == orders_a[served.id]
    with open_store(tmp_path / "labels.db") as again:
        assert [c.id for c in again.task_for("a", "task-7").completions] == orders_a["task-7"]


# ---------------------------------------------------------------------------------------- submissions

@pytest.mark.parametrize("ranks, reason", [
    ({"task-0-0": 1, "task-0-1": 2, "task-0-2": 3}, "missing \\['task-0-3'\\]"),
    ({"task-0-0": 1, "task-0-1": 2, "task-0-2": 3, "task-0-3": 4, "zzz": 5}, "unknown \\['zzz'\\]"),
    ({"task-0-0": 1, "task-0-1": "2", "task-0-2": 3, "task-0-3": 4}, "positive integer"),
    ({"task-0-0": 1, "task-0-1": 2.5, "task-0-2": 3, "task-0-3": 4}, "positive integer"),
    ({"task-0-0": 1, "task-0-1": True, "task-0-2": 3, "task-0-3": 4}, "positive integer"),
    ({"task-0-0": 0, "task-0-1": 2, "task-0-2": 3, "task-0-3": 4}, "positive integer"),
    ({"task-0-0": 2, "task-0-1": 2, "task-0-2": 2, "task-0-3": 2}, "every completion ties"),
    (["task-0-0", "task-0-1"], "must map"),
])
def test_invalid_rankings_are_rejected_and_store_nothing(store, ranks, reason):
    store.import_tasks(make_tasks(1))
    add_users(store, "a")
    with pytest.raises(InvalidRanking, match=reason):
        store.submit_ranking("a", "task-0", ranks, request_id="r1")
    assert store.get_own_ranking("a", "task-0") is None
    assert store.events() == [] and store.export_rankings() == []
    # the request id was not consumed: the corrected submission goes through
    assert store.submit_ranking("a", "task-0", order_ranks(make_tasks(1)[0], [3, 2, 1, 0]),
                                request_id="r1").action == "submit"


def test_unknown_task_annotator_and_bad_extras_are_rejected(store):
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    good = {"task-0-0": 1, "task-0-1": 2}
    with pytest.raises(UnknownTask, match="'nope'"):
        store.submit_ranking("a", "nope", good)
    with pytest.raises(UnknownAnnotator, match="'ghost'"):
        store.submit_ranking("ghost", "task-0", good)
    with pytest.raises(UnknownAnnotator):
        store.next_task("ghost", 2)
    with pytest.raises(InvalidRanking, match="seconds"):
        store.submit_ranking("a", "task-0", good, seconds=-1)
    with pytest.raises(InvalidRanking, match="seconds"):
        store.submit_ranking("a", "task-0", good, seconds=float("nan"))
    with pytest.raises(InvalidRanking, match="request id"):
        store.submit_ranking("a", "task-0", good, request_id="x" * 129)
    with pytest.raises(UnknownTask):
        store.skip_task("a", "nope")
    assert store.events() == []


def test_ties_are_stored_as_dense_ranks(store):
    task = make_tasks(1, k=3)[0]
    store.import_tasks([task])
    add_users(store, "a")
    result = store.submit_ranking("a", task.id, {"task-0-0": 5, "task-0-1": 5, "task-0-2": 9}, seconds=12.5)
    assert result.ranking.ranks == {"task-0-0": 1, "task-0-1": 1, "task-0-2": 2}
    assert result.ranking.seconds == 12.5
    ranked = list(store.export_ranked_tasks())
    assert len(ranked) == 1 and ranked[0].completions == tuple(
        RankedCompletion(c.id, c.text, rank) for c, rank in zip(task.completions, (1, 1, 2)))


def test_same_request_id_is_idempotent(store):
    task = make_tasks(1)[0]
    store.import_tasks([task])
    add_users(store, "a")
    first = store.submit_ranking("a", task.id, order_ranks(task, [0, 1, 2, 3]), request_id="req-1", seconds=3)
    again = store.submit_ranking("a", task.id, order_ranks(task, [3, 2, 1, 0]), request_id="req-1", seconds=3)
    assert (first.action, again.action) == ("submit", "duplicate")
    assert again.ranking == first.ranking  # the stored result, unchanged
    assert len(store.events()) == 1 and len(store.export_rankings()) == 1
    with pytest.raises(RequestIdReused, match="already used for a submit"):
        store.skip_task("a", task.id, request_id="req-1")


def test_skip_request_id_is_idempotent(store):
    store.import_tasks(make_tasks(2))
    add_users(store, "a")
    assert store.skip_task("a", "task-0", request_id="s-1").action == "skip"
    assert store.skip_task("a", "task-0", request_id="s-1").action == "duplicate"
    assert [e["kind"] for e in store.events()] == ["skip"]


def test_a_request_id_replays_only_its_own_task(store):
    # A request id answers 'duplicate' only for the same (annotator, task): reused for another task, the
    # answer would claim the other task's ranking was saved while storing nothing.
    tasks = make_tasks(3, k=2)
    store.import_tasks(tasks)
    add_users(store, "a", "b")
    store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]), request_id="r1")
    with pytest.raises(RequestIdReused, match="request id 'r1' was already used for a submit of task 'task-0'"):
        store.submit_ranking("a", "task-1", order_ranks(tasks[1], [1, 0]), request_id="r1")
    assert store.get_own_ranking("a", "task-1") is None
    store.skip_task("a", "task-1", request_id="s1")
    with pytest.raises(RequestIdReused, match="already used for a skip of task 'task-1'"):
        store.skip_task("a", "task-2", request_id="s1")
    with pytest.raises(RequestIdReused, match="already used for a skip of task 'task-1'"):
        store.submit_ranking("a", "task-1", order_ranks(tasks[1], [1, 0]), request_id="s1")
    assert not store.has_skipped("a", "task-2") and store.get_own_ranking("a", "task-1") is None
    assert [(e["task_id"], e["kind"]) for e in store.events()] == [("task-0", "submit"), ("task-1", "skip")]
    # the same request again is still a duplicate; another annotator's request ids are their own
    assert store.submit_ranking("a", "task-0", order_ranks(tasks[0], [1, 0]), request_id="r1").action == "duplicate"
    assert store.skip_task("a", "task-1", request_id="s1").action == "duplicate"
    assert store.submit_ranking("b", "task-1", order_ranks(tasks[1], [1, 0]), request_id="r1").action == "submit"


def test_second_submit_is_an_edit_that_replaces_and_logs(store):
    task = make_tasks(1)[0]
    store.import_tasks([task])
    add_users(store, "a", "b")
    store.submit_ranking("b", task.id, order_ranks(task, [0, 1, 2, 3]))
    store.submit_ranking("a", task.id, order_ranks(task, [0, 1, 2, 3]), request_id="r1", seconds=10)
    edited = store.submit_ranking("a", task.id, order_ranks(task, [3, 2, 1, 0]), request_id="r2", seconds=5)
    assert edited.action == "edit"
    assert edited.ranking.ranks == order_ranks(task, [3, 2, 1, 0])
    assert edited.ranking.seconds == 15  # time accumulates over edits
    assert edited.ranking.request_id == "r2"
    assert len(store.export_rankings()) == 2  # still one ranking per (annotator, task)
    events = store.events()
    assert [(e["annotator"], e["kind"], e["request_id"]) for e in events] == [
        ("b", "submit", None), ("a", "submit", "r1"), ("a", "edit", "r2")]
    assert events[2]["payload"]["previous"] == order_ranks(task, [0, 1, 2, 3])
    assert events[2]["payload"]["ranks"] == order_ranks(task, [3, 2, 1, 0])


def test_annotators_only_see_their_own_work(store):
    task = make_tasks(1)[0]
    store.import_tasks([task])
    add_users(store, "alice", "bob")
    store.submit_ranking("alice", task.id, order_ranks(task, [0, 1, 2, 3]))
    assert store.get_own_ranking("bob", task.id) is None
    assert store.history("bob") == []
    assert store.get_own_ranking("alice", task.id).annotator == "alice"
    assert [h.task_id for h in store.history("alice")] == [task.id]
    # bob ranking the same task does not touch alice's ranking
    store.submit_ranking("bob", task.id, order_ranks(task, [3, 2, 1, 0]))
    assert store.get_own_ranking("alice", task.id).ranks == order_ranks(task, [0, 1, 2, 3])
    assert store.get_own_ranking("bob", task.id).ranks == order_ranks(task, [3, 2, 1, 0])


def test_history_and_progress(tmp_path):
    clock = iter(range(100, 200))
    from labeling.store import SQLiteLabelStore
    with SQLiteLabelStore(tmp_path / "h.db", clock=lambda: float(next(clock))) as store:
        tasks = make_tasks(4, k=2)
        store.import_tasks(tasks)
        add_users(store, "a", "b")
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]))
        store.skip_task("a", "task-1")
        store.submit_ranking("a", "task-2", order_ranks(tasks[2], [1, 0]))
        store.submit_ranking("b", "task-0", order_ranks(tasks[0], [1, 0]))
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [1, 0]))  # edit moves it to the top
        history = store.history("a")
        assert [(h.task_id, h.status) for h in history] == [("task-0", "ranked"), ("task-2", "ranked"),
                                                            ("task-1", "skipped")]
        assert history[0].prompt_preview == "Prompt 0: describe thing 0."
        assert [h.task_id for h in store.history("a", limit=1)] == ["task-0"]
        progress = store.progress(2)
        assert (progress.tasks, progress.complete, progress.rankings, progress.skips) == (4, 1, 3, 1)
        assert [(p.annotator, p.ranked, p.skipped) for p in progress.annotators] == [("a", 2, 1), ("b", 1, 0)]
        store.import_tasks([Task.from_dict({"id": "long", "prompt": "line\none\t two" + " x" * 200,
                                            "completions": ["a", "b"]})])
        store.submit_ranking("b", "long", {"long-0": 1, "long-1": 2})
        preview = store.history("b")[0].prompt_preview  # one line, at most PREVIEW_CHARS
        assert preview.startswith("line one two x x") and preview.endswith("…") and len(preview) == PREVIEW_CHARS


def test_concurrent_submissions_from_threads(store):
    tasks = make_tasks(20, k=2)
    store.import_tasks(tasks)
    names = [f"user{i}" for i in range(4)]
    add_users(store, *names)
    errors = []

    def work(name):
        try:
            for task in tasks:
                store.submit_ranking(name, task.id, order_ranks(task, [0, 1]), request_id=f"{name}-{task.id}")
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.export_rankings()) == 80 and len(store.events()) == 80


# ---------------------------------------------------------------------------------------- assignments

def test_next_task_records_an_assignment_that_survives_a_restart(tmp_path):
    now = [1000.0]
    with SQLiteLabelStore(tmp_path / "labels.db", clock=lambda: now[0]) as store:
        tasks = make_tasks(3, k=2)
        store.import_tasks(tasks)
        add_users(store, "a")
        task = store.next_task("a", overlap=2)
        assert store.next_task("a", overlap=2).id == task.id  # asked again: the same task, assignment renewed
        [held] = store.assignments()
        assert (held.annotator, held.task_id, held.overlap, held.expires_at) == ("a", task.id, 2,
                                                                                 1000.0 + ASSIGNMENT_SECONDS)
    with open_store(tmp_path / "labels.db") as again:  # another process (or server) sees it
        assert [(x.annotator, x.task_id) for x in again.assignments()] == [("a", task.id)]
        result = again.submit_ranking("a", task.id, order_ranks(task, [1, 0]), require_assignment=True)
        assert result.action == "submit"
        assert again.assignments() == []  # the ranking ends the assignment


def test_required_assignment_refuses_tasks_not_handed_out(store):
    tasks = make_tasks(2, k=2)
    store.import_tasks(tasks)
    add_users(store, "a", "b")
    task = store.next_task("a", overlap=1)
    other = next(t for t in tasks if t.id != task.id)
    ranks = order_ranks(task, [0, 1])
    with pytest.raises(NotAssigned, match=f"task '{task.id}' was not handed to you"):
        store.submit_ranking("b", task.id, ranks, require_assignment=True)
    with pytest.raises(NotAssigned):
        store.skip_task("b", task.id, require_assignment=True)
    store.submit_ranking("a", task.id, ranks, require_assignment=True)
    assert store.next_task("b", overlap=1).id == other.id  # task is full at overlap 1
    with pytest.raises(NotAssigned):
        store.submit_ranking("b", task.id, order_ranks(task, [1, 0]), require_assignment=True)
    # editing one's own ranking needs no assignment
    assert store.submit_ranking("a", task.id, order_ranks(task, [1, 0]), require_assignment=True).action == "edit"
    assert [(r.annotator, r.task_id) for r in store.export_rankings()] == [("a", task.id)]
    assert [e["kind"] for e in store.events()] == ["submit", "edit"]


def test_live_assignments_hold_slots_and_expired_ones_free_them(tmp_path):
    now = [1000.0]
    store = SQLiteLabelStore(tmp_path / "labels.db", clock=lambda: now[0])
    try:
        tasks = make_tasks(2, k=2)
        store.import_tasks(tasks)
        add_users(store, "a", "b", "c")
        first = store.next_task("a", overlap=1)
        second = store.next_task("b", overlap=1)
        assert second.id != first.id  # a's live assignment holds the only slot of the first task
        assert store.next_task("c", overlap=1) is None and store.remaining("c", overlap=1) == 0
        now[0] += ASSIGNMENT_SECONDS + 1
        assert store.next_task("c", overlap=1).id == first.id  # a's assignment expired: c may take the slot
        with pytest.raises(NotAssigned, match="expired"):  # ... and did, so a's late answer is refused
            store.submit_ranking("a", first.id, order_ranks(first, [0, 1]), require_assignment=True)
        store.submit_ranking("c", first.id, order_ranks(first, [0, 1]), require_assignment=True)
        # b's assignment expired too, but nobody took its place: a late answer is still welcome
        assert store.submit_ranking("b", second.id, order_ranks(second, [0, 1]),
                                    require_assignment=True).action == "submit"
        assert sorted((r.annotator, r.task_id) for r in store.export_rankings()) == sorted(
            [("c", first.id), ("b", second.id)])
    finally:
        store.close()


def test_a_skip_frees_the_slot_and_a_reopened_skip_needs_one(store):
    tasks = make_tasks(1, k=2)
    store.import_tasks(tasks)
    add_users(store, "a", "b")
    task = store.next_task("a", overlap=1)
    assert store.next_task("b", overlap=1) is None
    store.skip_task("a", task.id, reason="unsure", require_assignment=True)
    assert store.has_skipped("a", task.id) and store.assignments() == []
    assert store.skip_task("a", task.id, reason="still unsure", require_assignment=True).action == "skip"
    assert store.next_task("b", overlap=1).id == task.id  # the skip gave the slot to b
    assert store.assign_task("a", task.id, overlap=1) is False  # b holds it: a cannot rank it after all
    with pytest.raises(NotAssigned):
        store.submit_ranking("a", task.id, order_ranks(task, [0, 1]), require_assignment=True)
    assert store.assign_task("a", task.id, overlap=2) is True  # at overlap 2 there is room for both
    store.submit_ranking("a", task.id, order_ranks(task, [0, 1]), require_assignment=True)
    assert not store.has_skipped("a", task.id)
    assert store.assign_task("a", task.id, overlap=1) is True  # a ranking can always be edited
    with pytest.raises(UnknownTask):
        store.assign_task("a", "nope", overlap=1)


def test_a_schema_1_database_gains_the_assignments_table(tmp_path):
    path = tmp_path / "old.db"
    tasks = make_tasks(2, k=2)
    with open_store(path) as store:
        store.import_tasks(tasks)
        add_users(store, "a")
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]))
    conn = sqlite3.connect(path)  # what a store written by schema 1 looks like
    conn.execute("DROP TABLE assignments")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with open_store(path) as store:
        assert store.next_task("a", overlap=2).id == "task-1"
        assert [x.task_id for x in store.assignments()] == ["task-1"]
        assert store.get_own_ranking("a", "task-0").ranks == order_ranks(tasks[0], [0, 1])
    version = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert version == "2"
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(UserError, match="newer version"):
        open_store(path)


def test_queue_serves_concurrent_annotators_without_passing_the_overlap(store):
    # Everyone opens a task before anyone submits (a busy start): the overlap holds all the same.
    store.import_tasks(make_tasks(3, k=2))
    names = [f"u{i}" for i in range(8)]
    add_users(store, *names)
    served = {name: store.next_task(name, overlap=2) for name in names}
    held = [task.id for task in served.values() if task is not None]
    assert len(held) == 6 and all(held.count(t) == 2 for t in set(held))
    for name, task in served.items():
        if task is not None:
            store.submit_ranking(name, task.id, order_ranks(task, [0, 1]), require_assignment=True)
    assert all(ranking_count(store, f"task-{i}") == 2 for i in range(3))


# ---------------------------------------------------------------------------------------- annotators

def test_annotator_rows(store):
    store.add_annotator("sim-1")
    store.add_annotator("alice", password_hash="scrypt$hash")
    assert store.list_annotators() == ["alice", "sim-1"] and store.has_annotator("sim-1")
    assert store.password_hash("alice") == "scrypt$hash"
    assert store.password_hash("sim-1") is None and store.password_hash("nobody") is None
    assert store.password_hash("\ud800") is None
    with pytest.raises(AnnotatorExists):
        store.add_annotator("alice")


# ------------------------------------------------------------------------------------- opening, durability

def test_open_store_urls_and_errors(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'u.db'}") as s:
        s.import_tasks(make_tasks(1))
    with open_store(tmp_path / "u.db", create=False) as s:
        assert s.count_tasks() == 1
    with pytest.raises(UserError, match="PostgreSQL .* not implemented"):
        open_store("postgresql://localhost/labels")
    with pytest.raises(UserError, match="no label database"):
        open_store(tmp_path / "missing.db", create=False)
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "no" / "such" / "dir.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable label database"):
        open_store(tmp_path / "junk.db")


def test_events_are_append_only(store, tmp_path):
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2})
    conn = sqlite3.connect(tmp_path / "labels.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET kind = 'skip'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")
    conn.close()
    assert len(store.events()) == 1


CRASH_CHILD = textwrap.dedent("""
    import sys
    from labeling.store import open_store
    store = open_store(sys.argv[1])
    i = 0
    while True:
        task = store.next_task("writer", overlap=1)
        if task is None:
            break
        ranks = {c.id: k + 1 for k, c in enumerate(task.completions)}
        request_id = f"req-{i}"
        store.submit_ranking("writer", task.id, ranks, request_id=request_id, seconds=1.0)
        print(request_id, flush=True)   # acknowledged: submit_ranking returned after COMMIT
        i += 1
""")


def test_kill_9_mid_run_loses_nothing_acknowledged(tmp_path):
    db = tmp_path / "crash.db"
    with open_store(db) as store:
        store.import_tasks(make_tasks(3000, k=3))
        store.add_annotator("writer")
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(db)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in child.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 40:
                break
        os.kill(child.pid, signal.SIGKILL)
        acknowledged += [line.strip() for line in child.stdout]  # printed before the kill landed
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 40 and len(acknowledged) < 3000  # it really died mid-run
    with open_store(db) as store:
        assert store.integrity_check() == "ok"
        stored = {e["request_id"] for e in store.events()}
        assert set(acknowledged) <= stored
        assert len(store.export_rankings()) == len(stored)  # every stored event has its ranking, nothing half-done


def test_locked_database_fails_with_one_line_error_and_stores_nothing(tmp_path):
    from labeling.store import SQLiteLabelStore, StorageUnavailable

    with open_store(tmp_path / "labels.db") as setup:
        setup.import_tasks(make_tasks(1, k=2))
        setup.add_annotator("a")
    store = SQLiteLabelStore(tmp_path / "labels.db", busy_timeout=0.1)
    other = sqlite3.connect(tmp_path / "labels.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past our busy timeout
    try:
        with pytest.raises(StorageUnavailable, match="database is locked.*nothing was stored"):
            store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.export_rankings() == [] and store.events() == []
    assert store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2}).action == "submit"  # usable again
    store.close()


def test_client_strings_that_are_not_unicode_are_rejected_cleanly(store):
    # JSON from a client can carry lone surrogates, which SQLite cannot store: one-line errors, not crashes
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    good = {"task-0-0": 1, "task-0-1": 2}
    with pytest.raises(UnknownTask):
        store.submit_ranking("a", "task-\ud800", good)
    with pytest.raises(InvalidRanking, match="request id"):
        store.submit_ranking("a", "task-0", good, request_id="\ud800")
    with pytest.raises(InvalidRanking, match="unknown"):
        store.submit_ranking("a", "task-0", {**good, "\ud800": 3})
    with pytest.raises(InvalidRanking, match="reason"):
        store.skip_task("a", "task-0", reason="\ud800")
    with pytest.raises(UnknownAnnotator):
        store.next_task("\ud800", 2)
    assert store.get_own_ranking("a", "\ud800") is None and store.history("\ud800") == []
    with pytest.raises(ValueError, match="not valid Unicode"):  # refused when read from a file ...
        Task.from_dict({"id": "bad", "prompt": "p", "completions": ["\ud800", "b"]})
    with pytest.raises(UserError, match="not valid Unicode"):  # ... and by the store itself
        store.import_tasks([Task("bad", "p", (Completion("bad-0", "\ud800"), Completion("bad-1", "b")))])
    assert store.events() == [] and store.count_tasks() == 1


@pytest.mark.parametrize("seconds", [10 ** 400, -(10 ** 400), float("inf"), float("-inf"), 10 ** 12],
                         ids=["10**400", "-10**400", "inf", "-inf", "10**12"])
def test_absurd_seconds_are_refused_cleanly(store, seconds):
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    with pytest.raises(InvalidRanking, match="seconds must be a number from 0 to"):
        store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2}, seconds=seconds)
    assert store.events() == []
