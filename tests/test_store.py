import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from labeling_helpers import make_tasks, order_ranks, raw_connection

from labeling.store import (
    ASSIGNMENT_SECONDS,
    PREVIEW_CHARS,
    SCHEMA_VERSION,
    AnnotatorExists,
    ConflictingTask,
    InvalidRanking,
    NotAssigned,
    RequestIdReused,
    StorageUnavailable,
    UnknownAnnotator,
    UnknownTask,
    display_order,
    open_store,
    queue_key,
)
from rlhf.errors import UserError
from rlhf.records import Completion, RankedCompletion, Task


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
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


def test_a_conversation_prompt_is_stored_and_returned_losslessly(store):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9 \U0001F600"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    tasks = [Task.from_dict({"id": "chat", "messages": chat, "completions": ["Red.", "Blue."]}),
             # plain prompts that look like JSON or start with the stored mark stay plain strings
             Task.from_dict({"id": "json-text", "prompt": json.dumps(chat), "completions": ["a", "b"]}),
             Task.from_dict({"id": "marked", "prompt": "\x1e" + json.dumps(chat), "completions": ["a", "b"]})]
    assert store.import_tasks(tasks) == (3, 0)
    assert store.import_tasks(tasks) == (0, 3)  # the same content: skipped, not a conflict
    for task in tasks:
        assert store.get_task(task.id) == task
    assert store.get_task("chat").to_dict()["prompt"] == chat
    assert isinstance(store.get_task("json-text").prompt, str)
    add_users(store, "ann")
    store.submit_ranking("ann", "chat", {"chat-0": 1, "chat-1": 2})
    assert store.history("ann")[0].prompt_preview == "Name a colour."
    [ranked] = store.export_ranked_tasks()
    assert ranked.to_dict()["prompt"] == chat


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
    for ids in served.values():
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


def test_queue_is_deterministic_with_per_annotator_tiebreak(store, db_url):
    store.import_tasks(make_tasks(10))
    add_users(store, "a", "b")
    first = store.next_task("a", 2).id
    assert store.next_task("a", 2).id == first
    assert first == min((f"task-{i}" for i in range(10)), key=lambda tid: queue_key("a", tid))
    assert store.next_task("b", 2).id == min((f"task-{i}" for i in range(10)), key=lambda tid: queue_key("b", tid))
    assert len({min(range(10), key=lambda i: queue_key(name, f"task-{i}")) for name in "abcdefgh"}) > 2
    with open_store(db_url) as again:  # same answer from a fresh connection
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


def test_display_order_is_a_stable_per_annotator_shuffle(store, db_url):
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
    with open_store(db_url) as again:
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


def test_history_and_progress(db_url):
    clock = iter(range(100, 200))
    with open_store(db_url, clock=lambda: float(next(clock))) as store:
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

def test_next_task_records_an_assignment_that_survives_a_restart(db_url):
    now = [1000.0]
    with open_store(db_url, clock=lambda: now[0]) as store:
        tasks = make_tasks(3, k=2)
        store.import_tasks(tasks)
        add_users(store, "a")
        task = store.next_task("a", overlap=2)
        assert store.next_task("a", overlap=2).id == task.id  # asked again: the same task, assignment renewed
        [held] = store.assignments()
        assert (held.annotator, held.task_id, held.overlap, held.expires_at) == ("a", task.id, 2,
                                                                                 1000.0 + ASSIGNMENT_SECONDS)
    with open_store(db_url) as again:  # another process (or server) sees it
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


def test_live_assignments_hold_slots_and_expired_ones_free_them(db_url):
    now = [1000.0]
    store = open_store(db_url, clock=lambda: now[0])
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


def test_a_schema_1_store_is_migrated_forward_and_a_newer_one_refused(db_url):
    tasks = make_tasks(2, k=2)
    with open_store(db_url) as store:
        store.import_tasks(tasks)
        add_users(store, "a")
        store.submit_ranking("a", "task-0", order_ranks(tasks[0], [0, 1]))
    conn = raw_connection(db_url)  # what a store written by schema 1 looks like
    for statement in ("ALTER TABLE rankings DROP COLUMN comment", "ALTER TABLE rankings DROP COLUMN flags",
                      "ALTER TABLE skips DROP COLUMN flags",
                      "DROP TABLE drafts", "DROP TABLE resolutions", "DROP INDEX tasks_gold",
                      "ALTER TABLE tasks DROP COLUMN gold_from",
                      "ALTER TABLE tasks DROP COLUMN gold", "DROP TABLE login_failures", "DROP TABLE assignments",
                      "DROP TABLE sessions",
                      "ALTER TABLE annotators DROP COLUMN role",
                      "ALTER TABLE annotators DROP COLUMN disabled", "ALTER TABLE tasks DROP COLUMN ranking_count",
                      "UPDATE meta SET value = '1' WHERE key = 'schema_version'"):
        conn.execute(statement)
    with open_store(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION == 8
        assert store.next_task("a", overlap=2).id == "task-1"
        assert [x.task_id for x in store.assignments()] == ["task-1"]
        assert store.get_own_ranking("a", "task-0").ranks == order_ranks(tasks[0], [0, 1])
        assert store.account("a").role == "annotator" and not store.account("a").disabled
        assert store.open_slots(overlap=1) == 1 and store.progress(1).complete == 1  # the counts were filled in
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = conn.execute("SELECT COUNT(*) FROM assignments").fetchone()
    with pytest.raises(UserError, match=r"newer version of rlhf \(schema 99, this one reads up to 8\); upgrade rlhf"):
        open_store(db_url)
    assert conn.execute("SELECT COUNT(*) FROM assignments").fetchone() == before
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "99"
    conn.close()


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
        assert s.count_tasks() == 1 and s.backend == "sqlite"
    with pytest.raises(UserError, match="unsupported label store URL"):
        open_store("mysql://localhost/labels")
    with pytest.raises(UserError, match="no label database"):
        open_store(tmp_path / "missing.db", create=False)
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "no" / "such" / "dir.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable label database"):
        open_store(tmp_path / "junk.db")


def test_postgresql_urls_that_cannot_work_are_one_line_errors(postgres_cluster, tmp_path):
    socket_dir = postgres_cluster.socket_dir
    cases = [
        (f"postgresql://postgres@/labels?host={tmp_path}", "cannot connect to the label database"),  # no server
        (f"postgresql://postgres@/no_such_database?host={socket_dir}", 'database "no_such_database" does not exist'),
        (f"postgresql://nobody:secret-pw@/postgres?host={socket_dir}", 'role "nobody" does not exist'),
        ("postgresql://postgres@127.0.0.1:1/labels?connect_timeout=2", "cannot connect"),
    ]
    for url, reason in cases:
        with pytest.raises(UserError, match=reason) as info:
            open_store(url)
        assert "\n" not in str(info.value) and "secret-pw" not in str(info.value)
    empty = postgres_cluster.new_database()
    with pytest.raises(UserError, match="holds no label store"):
        open_store(empty, create=False)
    conn = raw_connection(empty)
    tables = conn.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()
    assert tables[0] == 0
    conn.close()
    with open_store(empty) as store:  # create=True makes the tables
        assert store.count_tasks() == 0 and store.backend == "postgresql"
    postgres_cluster.drop_database(empty)


def test_wrong_password_is_one_line(postgres_cluster):
    url = postgres_cluster.new_database()
    postgres_cluster.admin("CREATE ROLE labeler LOGIN PASSWORD 'right-password'")  # signs in with a password
    try:
        with pytest.raises(UserError, match='password authentication failed for user "labeler"') as info:
            open_store(url.replace("postgres@", "labeler:wrong-password@"))
        assert "\n" not in str(info.value) and "wrong-password" not in str(info.value) and "***" in str(info.value)
    finally:
        postgres_cluster.drop_database(url)
        postgres_cluster.admin("DROP ROLE labeler")


def test_events_are_append_only(store, db_url):
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2})
    conn = raw_connection(db_url)
    with pytest.raises(Exception, match="append-only"):
        conn.execute("UPDATE events SET kind = 'skip'")
    with pytest.raises(Exception, match="append-only"):
        conn.execute("DELETE FROM events")
    if store.backend == "postgresql":
        with pytest.raises(Exception, match="append-only"):
            conn.execute("TRUNCATE events")
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


def test_kill_9_mid_run_loses_nothing_acknowledged(db_url):
    with open_store(db_url) as store:
        store.import_tasks(make_tasks(3000, k=3))
        store.add_annotator("writer")
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, db_url], stdout=subprocess.PIPE, text=True)
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
    with open_store(db_url) as store:
        assert store.integrity_check() == "ok"
        stored = {e["request_id"] for e in store.events()}
        assert set(acknowledged) <= stored
        assert len(store.export_rankings()) == len(stored)  # every stored event has its ranking, nothing half-done


def test_locked_database_fails_with_one_line_error_and_stores_nothing(db_url):
    with open_store(db_url) as setup:
        setup.import_tasks(make_tasks(1, k=2))
        setup.add_annotator("a")
    other = raw_connection(db_url)
    if db_url.startswith("postgresql://"):
        store = open_store(db_url, lock_timeout=0.1)
        other.execute("BEGIN")
        other.execute("SELECT * FROM tasks FOR UPDATE")  # another server is writing about this task
        locked = "lock timeout.*nothing was stored"
    else:
        store = open_store(db_url, busy_timeout=0.1)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past our busy timeout
        locked = "database is locked.*nothing was stored"
    try:
        with pytest.raises(StorageUnavailable, match=locked) as info:
            store.submit_ranking("a", "task-0", {"task-0-0": 1, "task-0-1": 2})
        assert "\n" not in str(info.value)
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


# ---------------------------------------------------------------------------------- several app servers

def test_servers_sharing_a_database_keep_every_rule(store, db_url):
    """Annotators whose requests land on one of two servers (two stores on one database) at random, each
    submit re-sent at once to the other server: no task ever held or ranked past its overlap, nobody served a
    task they already ranked, every re-sent submit stored once."""
    import random

    overlap, annotators = 2, [f"u{i}" for i in range(6)]
    store.import_tasks(make_tasks(24, k=2))
    add_users(store, *annotators)
    servers = [open_store(db_url), open_store(db_url)]
    over, problems, results = [], [], []
    done = threading.Event()

    def annotate(name: str, seed: int) -> None:
        rng = random.Random(seed)
        ranked: set[str] = set()
        try:
            while (task := rng.choice(servers).next_task(name, overlap)) is not None:
                if task.id in ranked:
                    problems.append(f"{name} was served {task.id} again")
                    return
                ranks, request_id = order_ranks(task, [0, 1]), f"{name}-{task.id}"
                first, second = rng.sample(servers, 2)
                resent = threading.Thread(target=lambda server, *args: results.append(server.submit_ranking(
                    *args, require_assignment=True).action), args=(second, name, task.id, ranks, request_id))
                resent.start()
                results.append(first.submit_ranking(name, task.id, ranks, request_id=request_id,
                                                    require_assignment=True).action)
                resent.join()
                ranked.add(task.id)
        except Exception as exc:  # surfaced by the assert below
            problems.append(repr(exc))

    def watch() -> None:  # the places held or filled, as a third connection sees them, all along
        watcher = raw_connection(db_url)
        while not done.is_set():
            rows = watcher.execute(
                "SELECT task_id, COUNT(*) FROM (SELECT task_id FROM rankings UNION ALL"
                " SELECT task_id FROM assignments) AS held GROUP BY task_id HAVING COUNT(*) > 2").fetchall()
            over.extend(rows)
        watcher.close()

    threads = [threading.Thread(target=annotate, args=(name, i)) for i, name in enumerate(annotators)]
    observer = threading.Thread(target=watch)
    observer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    observer.join()
    for server in servers:
        server.close()
    assert problems == [] and over == []
    assert sorted(set(results)) == ["duplicate", "submit"] and results.count("submit") == 24 * overlap
    assert all(ranking_count(store, f"task-{i}") == overlap for i in range(24))
    assert len(store.events()) == 24 * overlap and store.assignments() == []


def test_text_a_database_cannot_hold_is_refused_cleanly(store):
    store.import_tasks(make_tasks(1, k=2))
    add_users(store, "a")
    good = {"task-0-0": 1, "task-0-1": 2}
    with pytest.raises(InvalidRanking, match="request id"):
        store.submit_ranking("a", "task-0", good, request_id="r\x00")
    with pytest.raises(InvalidRanking, match="reason"):
        store.skip_task("a", "task-0", reason="nul\x00")
    with pytest.raises(UnknownTask):
        store.submit_ranking("a", "task\x00", good)
    with pytest.raises(UnknownAnnotator):
        store.next_task("a\x00", 2)
    with pytest.raises(UserError, match="NUL character"):
        store.import_tasks([Task("nul", "p\x00", (Completion("nul-0", "a"), Completion("nul-1", "b")))])
    assert store.password_hash("a\x00") is None and store.history("a\x00") == []
    assert store.events() == [] and store.count_tasks() == 1


# ---------------------------------------------------------------------------------------- copies

def filled_store(url):
    now = [1000.0]
    store = open_store(url, clock=lambda: now.__setitem__(0, now[0] + 0.25) or now[0])
    tasks = make_tasks(5, k=3)
    store.import_tasks(tasks)
    store.add_annotator("alice", password_hash="scrypt$x", role="admin")
    add_users(store, "bob", "sim-1")
    store.set_disabled("bob", True)
    store.submit_ranking("alice", "task-0", order_ranks(tasks[0], [2, 0, 1]), request_id="r1", seconds=3.5)
    store.submit_ranking("alice", "task-0", order_ranks(tasks[0], [0, 1, 2]), request_id="r2", seconds=1,
                         comment="<i>why</i> ünï", flags=["unsafe", "off-topic"])
    store.skip_task("sim-1", "task-1", reason="ünïcode <b>", flags=["broken-prompt"])
    store.set_gold("task-4", order_ranks(tasks[4], [1, 0, 2]), source=None)
    store.resolve("task-0", order_ranks(tasks[0], [1, 2, 0]), "alice")
    store.save_draft("sim-1", "task-2", {"task-2-1": 1})
    store.next_task("sim-1", 2)
    store.add_session("hash", "alice", now[0], now[0] + 60)
    return store


def test_copy_carries_everything_both_ways_and_verifies_it(store, db_url, tmp_path, request):
    """SQLite -> PostgreSQL -> SQLite, and PostgreSQL -> SQLite -> SQLite."""
    from labeling.store.copy import copy_store

    store.close()
    source = filled_store(db_url)
    there = (str(tmp_path / "copy.db") if source.backend == "postgresql"
             else request.getfixturevalue("postgres_cluster").new_database())
    with open_store(there) as target:
        report = copy_store(source, target)
        assert report.counts == {"tasks": 5, "completions": 15, "annotators": 3, "rankings": 1, "skips": 1,
                                 "assignments": 1, "drafts": 1, "resolutions": 1, "events": 4}
        assert target.draft("sim-1", "task-2") == {"task-2-1": 1}
        assert target.gold_answers() == source.gold_answers() and target.resolutions() == source.resolutions()
        assert target.export_rankings() == source.export_rankings() and target.events() == source.events()
        assert target.notes() == source.notes() and [n["flags"] for n in target.notes()] == [
            ["broken-prompt"], ["off-topic", "unsafe"]]
        assert target.accounts() == source.accounts() and target.assignments() == source.assignments()
        assert target.history("sim-1") == source.history("sim-1")
        assert target.row_counts()["sessions"] == 0  # everyone signs in again
        # ids go on after the copied ones
        target.submit_ranking("sim-1", "task-2", order_ranks(source.get_task("task-2"), [0, 1, 2]))
        assert [e["id"] for e in target.events()] == [1, 2, 3, 4, 5]
        target.import_tasks(make_tasks(1, prefix="new"))
        assert target.history("sim-1")[0].task_id == "task-2"
    back = tmp_path / "back.db"
    with open_store(there) as middle, open_store(back) as again:
        again_report = copy_store(middle, again)
        assert again_report.counts["events"] == 5 and again.export_rankings() == middle.export_rankings()
    source.close()


def test_copy_refuses_a_target_that_holds_anything(store, db_url, tmp_path):
    from labeling.store.copy import copy_store

    store.close()
    with filled_store(db_url) as source, open_store(tmp_path / "other.db") as target:
        target.add_annotator("someone")
        with pytest.raises(UserError, match=r"is not empty \(1 annotators\); nothing was written"):
            copy_store(source, target)
        assert target.row_counts() == {**dict.fromkeys(target.row_counts(), 0), "annotators": 1}
        with pytest.raises(UserError, match="is the store being copied"):
            copy_store(source, source)
