"""The labeling app's handlers, called directly (no browser), and its HTTP layer through a test client."""

from __future__ import annotations

import argparse
import json
import socket

import pytest
from app_helpers import asgi_request

from labeling import handlers
from labeling.app import MAX_BODY_BYTES, create_app
from labeling.auth import NotSignedIn, Sessions, add_annotator
from labeling.commands import run_label
from labeling.gradio_ui import LabelUI
from labeling.handlers import AppSettings, Forbidden, RequestError
from labeling.serve import bind_socket
from labeling.store import InvalidRanking, UnknownTask, display_order, open_store
from rlhf.errors import UserError
from rlhf.records import Task

HOSTILE = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=1</script></div></pre>",
    "**bold** [link](javascript:alert(1)) {{7*7}} ${7*7} &lt;b&gt; &amp;",
    "\u202eevil bidi override\u202c and a very long line " + "x" * 3000,
]
PASSWORD = "correct horse"


def make_task(task_id: str, texts: list[str], prompt: str | None = None) -> Task:
    return Task.from_dict({"id": task_id, "prompt": prompt or f"prompt of {task_id}",
                           "completions": [{"id": f"{task_id}-c{i}", "text": t} for i, t in enumerate(texts)]})


@pytest.fixture()
def store(db_url):
    store = open_store(db_url)
    store.import_tasks([make_task(f"t{i}", [f"answer {i}.{j}" for j in range(3)]) for i in range(3)]
                       + [make_task("evil", HOSTILE, prompt="<script>window.__pwned=1</script> {{7*7}}")])
    add_annotator(store, "alice", PASSWORD)
    add_annotator(store, "bob", PASSWORD)
    yield store
    store.close()


SETTINGS = AppSettings(overlap=2, guidelines_html="<p>be kind</p>", admins=frozenset({"alice"}))


def ranks_for(task: dict, order: list[int]) -> dict[str, int]:
    """Ranks {completion id: rank} giving the shown completion i the rank order[i]."""
    return {c["id"]: r for c, r in zip(task["completions"], order)}


def nothing_stored(store) -> bool:
    return store.export_rankings() == [] and store.events() == []


def hand_out(store, annotator: str, *task_ids: str) -> None:
    """Assign these tasks to the annotator, as the queue would (submits need an assignment)."""
    for task_id in task_ids:
        assert store.assign_task(annotator, task_id, SETTINGS.overlap)


# ------------------------------------------------------------------------------------------ login

def test_login_checks_the_password_and_gives_a_session(store):
    sessions = Sessions(store)
    for payload in ({"username": "alice", "password": "wrong password"},
                    {"username": "mallory", "password": PASSWORD},
                    {"username": "alice"},
                    {"username": ["alice"], "password": PASSWORD}):
        with pytest.raises(NotSignedIn):
            handlers.login(store, sessions, SETTINGS, payload)
    with pytest.raises(RequestError):
        handlers.login(store, sessions, SETTINGS, ["alice", PASSWORD])
    token, info = handlers.login(store, sessions, SETTINGS, {"username": "alice", "password": PASSWORD})
    assert sessions.annotator(token) == "alice"
    assert info == {"annotator": "alice", "progress": {"ranked": 0, "skipped": 0, "total_tasks": 4},
                    "guidelines_html": "<p>be kind</p>", "flags": list(SETTINGS.flags), "can_view_stats": True}
    sessions.end(token)
    assert sessions.annotator(token) is None


@pytest.mark.parametrize("call", [
    lambda s: handlers.session_info(s, None, SETTINGS),
    lambda s: handlers.next_task(s, None, SETTINGS),
    lambda s: handlers.open_task(s, None, SETTINGS, "t0"),
    lambda s: handlers.submit_ranking(s, None, SETTINGS, {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2,
                                                                                     "t0-c2": 3}}),
    lambda s: handlers.skip_task(s, None, SETTINGS, {"task_id": "t0"}),
    lambda s: handlers.history(s, None, SETTINGS),
    lambda s: handlers.stats(s, None, SETTINGS),
])
def test_every_handler_requires_login(store, call):
    with pytest.raises(NotSignedIn):
        call(store)
    assert nothing_stored(store)


# ------------------------------------------------------------------------------------------ queue

def test_next_task_shows_the_annotators_order_with_stable_labels(store):
    first = handlers.next_task(store, "alice", SETTINGS)
    again = handlers.next_task(store, "alice", SETTINGS)
    assert first == again  # nothing changed: same task, same order
    task = first["task"]
    stored = store.get_task(task["id"])
    assert [c["label"] for c in task["completions"]] == ["A", "B", "C", "D"][: len(stored.completions)]
    assert [c["id"] for c in task["completions"]] == display_order("alice", task["id"],
                                                                   [c.id for c in stored.completions])
    assert {c["id"]: c["text"] for c in task["completions"]} == {c.id: c.text for c in stored.completions}
    assert first["progress"] == {"ranked": 0, "skipped": 0, "total_tasks": 4, "left": 4}  # the served one included


def test_completion_labels():
    assert [handlers.completion_label(i) for i in (0, 1, 25, 26, 27, 51, 52)] == \
        ["A", "B", "Z", "AA", "AB", "AZ", "BA"]


# ------------------------------------------------------------------------------------------ submit

def test_valid_ranking_is_stored_and_the_queue_moves_on(store):
    task = handlers.next_task(store, "alice", SETTINGS)["task"]
    ranks = ranks_for(task, [2, 1, 3, 3][: len(task["completions"])])
    result = handlers.submit_ranking(store, "alice", SETTINGS,
                                     {"task_id": task["id"], "ranks": ranks, "request_id": "r1", "seconds": 4.5})
    assert result["action"] == "submit"
    assert result["progress"] == {"ranked": 1, "skipped": 0, "total_tasks": 4}
    stored = store.get_own_ranking("alice", task["id"])
    assert stored.ranks == ranks and stored.seconds == 4.5 and stored.request_id == "r1"
    following = handlers.next_task(store, "alice", SETTINGS)
    assert following["task"]["id"] != task["id"]
    assert following["progress"] == {"ranked": 1, "skipped": 0, "total_tasks": 4, "left": 3}


@pytest.mark.parametrize("ranks, error", [
    ({"t0-c0": 1, "t0-c1": 2}, InvalidRanking),                                  # a completion missing
    ({"t0-c0": 1, "t0-c1": 2, "t0-c2": 3, "t1-c0": 4}, InvalidRanking),          # a foreign completion
    ({"t0-c0": 1, "t0-c1": 1, "t0-c2": 1}, InvalidRanking),                      # all tie: says nothing
    ({"t0-c0": 0, "t0-c1": 1, "t0-c2": 2}, InvalidRanking),                      # rank 0
    ({"t0-c0": True, "t0-c1": 2, "t0-c2": 3}, InvalidRanking),                   # a bool is not a rank
    ({"t0-c0": "1", "t0-c1": 2, "t0-c2": 3}, InvalidRanking),                    # nor a string
    ({"t0-c0": 1.5, "t0-c1": 2, "t0-c2": 3}, InvalidRanking),                    # nor a float
    ([1, 2, 3], RequestError),                                                   # not a mapping
])
def test_invalid_rankings_are_refused_and_store_nothing(store, ranks, error):
    with pytest.raises(error):
        handlers.submit_ranking(store, "alice", SETTINGS, {"task_id": "t0", "ranks": ranks, "request_id": "r"})
    assert nothing_stored(store)


@pytest.mark.parametrize("payload, error", [
    ({"task_id": "nope", "ranks": {"a": 1, "b": 2}}, UnknownTask),
    ({"task_id": "", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}}, RequestError),
    ({"task_id": 7, "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}}, RequestError),
    ({"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "request_id": 5}, InvalidRanking),
    ({"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "request_id": "x" * 500}, InvalidRanking),
    ({"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "seconds": -1}, InvalidRanking),
    ("not an object", RequestError),
])
def test_malformed_submissions_are_refused(store, payload, error):
    with pytest.raises(error):
        handlers.submit_ranking(store, "alice", SETTINGS, payload)
    assert nothing_stored(store)


def test_resent_request_stores_one_ranking(store):
    hand_out(store, "alice", "t0")
    payload = {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "request_id": "same"}
    first = handlers.submit_ranking(store, "alice", SETTINGS, payload)
    second = handlers.submit_ranking(store, "alice", SETTINGS, payload)
    assert (first["action"], second["action"]) == ("submit", "duplicate")
    assert second["progress"]["ranked"] == 1
    assert len(store.export_rankings()) == 1
    assert [e["kind"] for e in store.events()] == ["submit"]


def test_editing_an_earlier_ranking_replaces_it(store):
    hand_out(store, "alice", "t0")
    handlers.submit_ranking(store, "alice", SETTINGS,
                            {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "request_id": "a"})
    opened = handlers.open_task(store, "alice", SETTINGS, "t0")
    assert opened["own"] == {"ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "comment": None, "flags": []}
    assert opened["task"]["id"] == "t0" and len(opened["task"]["completions"]) == 3
    result = handlers.submit_ranking(store, "alice", SETTINGS,
                                     {"task_id": "t0", "ranks": {"t0-c0": 3, "t0-c1": 1, "t0-c2": 1},
                                      "request_id": "b"})
    assert result["action"] == "edit"
    assert result["ranks"] == {"t0-c0": 2, "t0-c1": 1, "t0-c2": 1}  # dense ranks, ties kept
    assert store.get_own_ranking("alice", "t0").ranks == {"t0-c0": 2, "t0-c1": 1, "t0-c2": 1}
    assert len(store.export_rankings()) == 1
    assert [e["kind"] for e in store.events()] == ["submit", "edit"]
    assert result["progress"]["ranked"] == 1
    [item] = handlers.history(store, "alice", SETTINGS)["items"]
    assert (item["task_id"], item["status"]) == ("t0", "ranked")


def test_open_task_of_unknown_id(store):
    with pytest.raises(UnknownTask):
        handlers.open_task(store, "alice", SETTINGS, "no-such-task")
    with pytest.raises(RequestError):
        handlers.open_task(store, "alice", SETTINGS, "")


def test_a_conversation_task_comes_back_as_its_messages(store):
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi <b>there</b>"},
            {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "**Thanks**?"}]
    store.import_tasks([Task.from_dict({"id": "chat", "messages": chat, "completions": ["Merci.", "De rien."]})])
    view = handlers.open_task(store, "alice", SETTINGS, "chat")["task"]
    assert view["prompt"] == chat  # the JSON contract: a string, or the list of {role, content} messages
    assert json.loads(json.dumps(view))["prompt"] == chat
    assert handlers.open_task(store, "alice", SETTINGS, "t0")["task"]["prompt"] == "prompt of t0"


# ------------------------------------------------------------------------------------------ skip

def test_skip_with_reason_leaves_the_queue_and_shows_in_history(store):
    task_id = handlers.next_task(store, "alice", SETTINGS)["task"]["id"]
    result = handlers.skip_task(store, "alice", SETTINGS,
                                {"task_id": task_id, "reason": "  off-topic  ", "request_id": "s1"})
    assert result["action"] == "skip" and result["progress"] == {"ranked": 0, "skipped": 1, "total_tasks": 4}
    again = handlers.skip_task(store, "alice", SETTINGS, {"task_id": task_id, "reason": "x", "request_id": "s1"})
    assert again["action"] == "duplicate"
    assert [(e["kind"], e["payload"]) for e in store.events()] == [("skip", {"reason": "off-topic", "flags": []})]
    assert handlers.next_task(store, "alice", SETTINGS)["task"]["id"] != task_id
    assert [(h["task_id"], h["status"]) for h in handlers.history(store, "alice", SETTINGS)["items"]] == \
        [(task_id, "skipped")]
    with pytest.raises(InvalidRanking):
        handlers.skip_task(store, "alice", SETTINGS, {"task_id": task_id, "reason": "r" * 501})
    # A skipped task can still be ranked later from the history; that replaces the skip.
    task = handlers.open_task(store, "alice", SETTINGS, task_id)["task"]
    handlers.submit_ranking(store, "alice", SETTINGS, {"task_id": task_id, "ranks": ranks_for(task, [1, 2, 3, 4])})
    assert [(h["task_id"], h["status"]) for h in handlers.history(store, "alice", SETTINGS)["items"]] == \
        [(task_id, "ranked")]


def test_a_ranked_task_cannot_be_skipped(store):
    hand_out(store, "alice", "t0")
    handlers.submit_ranking(store, "alice", SETTINGS, {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}})
    with pytest.raises(InvalidRanking):
        handlers.skip_task(store, "alice", SETTINGS, {"task_id": "t0"})
    assert store.get_own_ranking("alice", "t0") is not None


# ------------------------------------------------------------------------------------------ isolation

def test_annotators_only_see_and_change_their_own_work(store):
    hand_out(store, "alice", "t0")
    hand_out(store, "bob", "t0")
    handlers.submit_ranking(store, "alice", SETTINGS,
                            {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "request_id": "r"})
    # Bob sees the task to rank it himself, but not Alice's ranking, and not in his history.
    assert handlers.open_task(store, "bob", SETTINGS, "t0")["own"] is None
    assert handlers.history(store, "bob", SETTINGS)["items"] == []
    # A body naming another annotator changes nothing: the session decides who acts. Bob reusing
    # Alice's request id is his own, new request.
    result = handlers.submit_ranking(store, "bob", SETTINGS,
                                     {"task_id": "t0", "annotator": "alice", "request_id": "r",
                                      "ranks": {"t0-c0": 3, "t0-c1": 2, "t0-c2": 1}})
    assert result["action"] == "submit"
    assert store.get_own_ranking("alice", "t0").ranks == {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}
    assert store.get_own_ranking("bob", "t0").ranks == {"t0-c0": 3, "t0-c1": 2, "t0-c2": 1}
    assert handlers.session_info(store, "bob", SETTINGS)["progress"]["ranked"] == 1
    assert handlers.session_info(store, "alice", SETTINGS)["progress"]["ranked"] == 1
    # Bob's shuffled order differs from Alice's for some task (position bias is spread out).
    orders = {name: [[c["id"] for c in handlers.open_task(store, name, SETTINGS, t)["task"]["completions"]]
                     for t in ("t0", "t1", "t2", "evil")] for name in ("alice", "bob")}
    assert orders["alice"] != orders["bob"]


def test_statistics_only_for_admins(store):
    hand_out(store, "alice", "t0")
    hand_out(store, "bob", "t0")
    handlers.submit_ranking(store, "alice", SETTINGS, {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}})
    handlers.submit_ranking(store, "bob", SETTINGS, {"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 3, "t0-c2": 2}})
    with pytest.raises(Forbidden):
        handlers.stats(store, "bob", SETTINGS)
    result = handlers.stats(store, "alice", SETTINGS)
    assert result["stats"]["rankings"] == 2 and result["stats"]["complete"] == 1
    assert result["stats"]["agreement"]["pairwise_agreement"] == pytest.approx(2 / 3)
    assert "alice vs bob" in result["text"]


# ------------------------------------------------------------------------------------------ hostile text

def test_hostile_text_round_trips_unchanged(store):
    hand_out(store, "alice", "evil")
    opened = handlers.open_task(store, "alice", SETTINGS, "evil")
    assert opened["task"]["prompt"] == "<script>window.__pwned=1</script> {{7*7}}"
    assert sorted(c["text"] for c in opened["task"]["completions"]) == sorted(HOSTILE)
    ranks = ranks_for(opened["task"], [1, 2, 3, 4])
    handlers.submit_ranking(store, "alice", SETTINGS, {"task_id": "evil", "ranks": ranks})
    [ranked] = list(store.export_ranked_tasks())
    assert ranked.prompt == "<script>window.__pwned=1</script> {{7*7}}"
    assert {c.text for c in ranked.completions} == set(HOSTILE)
    shown = {c["id"]: c["text"] for c in opened["task"]["completions"]}
    assert {shown[i]: r for i, r in ranks.items()} == {c.text: c.rank for c in ranked.completions}


# ------------------------------------------------------------------------------------------ HTTP layer

@pytest.fixture()
def client(store):
    from fastapi.testclient import TestClient

    with TestClient(create_app(store, SETTINGS, ui=False)) as client:  # the API alone (the UI: test_app_gradio.py)
        yield client


def login(client, name="alice"):
    response = client.post("/api/login", json={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return response


def test_http_requires_login_and_sets_a_strict_cookie(client, store):
    assert client.get("/api/health").text == "ok"  # the one route that needs no session besides sign-in
    assert client.get("/api/next").status_code == 401 and client.get("/api/session").status_code == 401
    assert client.post("/api/rankings", json={"task_id": "t0", "ranks": {}}).status_code == 401
    assert client.post("/api/login", json={"username": "alice", "password": "nope-nope"}).status_code == 401
    cookie = login(client).headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/session").json()["annotator"] == "alice"
    assert client.get("/api/next").json()["task"] is not None
    client.post("/api/logout", json={})
    assert client.get("/api/next").status_code == 401
    assert nothing_stored(store)


def test_http_submit_and_errors_map_to_status_codes(client, store):
    login(client)
    task = client.get("/api/next").json()["task"]
    body = {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3, 4]), "request_id": "q1"}
    assert client.post("/api/rankings", json=body).json()["action"] == "submit"
    assert client.post("/api/rankings", json=body).json()["action"] == "duplicate"
    assert client.post("/api/rankings", json={**body, "request_id": "q2", "ranks": {}}).status_code == 422
    assert client.get("/api/task", params={"id": "missing"}).status_code == 404
    assert client.get("/api/task", params={"id": task["id"]}).json()["own"]["ranks"] == body["ranks"]
    # A cross-site form post (not JSON) is refused before anything happens.
    form = client.post("/api/skip", data={"task_id": "t1"})
    assert form.status_code == 400 and "application/json" in form.json()["error"]
    bad = client.post("/api/skip", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    history = client.get("/api/history").json()["items"]
    assert [(item["task_id"], item["status"]) for item in history] == [(task["id"], "ranked")]
    assert len(store.export_rankings()) == 1 and len(store.events()) == 1


def test_http_request_id_of_another_task_is_a_409_and_stores_nothing(client, store):
    login(client)
    first = client.get("/api/next").json()["task"]
    body = {"task_id": first["id"], "ranks": ranks_for(first, [1, 2, 3, 4]), "request_id": "q1"}
    assert client.post("/api/rankings", json=body).json()["action"] == "submit"
    second = client.get("/api/next").json()["task"]
    reused = {"task_id": second["id"], "ranks": ranks_for(second, [2, 1, 3, 4]), "request_id": "q1"}
    response = client.post("/api/rankings", json=reused)
    assert response.status_code == 409
    error = response.json()["error"]
    assert f"already used for a submit of task '{first['id']}'" in error and "\n" not in error
    skip = client.post("/api/skip", json={"task_id": second["id"], "request_id": "q1"})
    assert skip.status_code == 409
    assert store.get_own_ranking("alice", second["id"]) is None and not store.has_skipped("alice", second["id"])
    value, progress = LabelUI(store, SETTINGS).submit("alice", reused)  # the UI says so, and keeps the work
    assert progress is None and json.loads(value)["keep"] is True and "already used" in json.loads(value)["error"]
    assert [e["task_id"] for e in store.events()] == [first["id"]]


def test_http_submits_only_assigned_tasks_and_never_past_the_overlap(store):
    from fastapi.testclient import TestClient

    settings = AppSettings(overlap=1)
    with TestClient(create_app(store, settings, ui=False)) as client:
        login(client, "alice")
        task = client.get("/api/next").json()["task"]
        ranks = ranks_for(task, [1, 2, 3, 4])
        assert client.post("/api/rankings", json={"task_id": task["id"], "ranks": ranks}).status_code == 200
        client.cookies.clear()
        login(client, "bob")
        # bob was never handed alice's task, which is full at overlap 1
        response = client.post("/api/rankings", json={"task_id": task["id"], "ranks": ranks, "request_id": "b1"})
        assert response.status_code == 409 and "was not handed to you" in response.json()["error"]
        assert client.post("/api/skip", json={"task_id": task["id"]}).status_code == 409
        mine = client.get("/api/next").json()["task"]
        assert mine["id"] != task["id"]
        other = next(t for t in ("t0", "t1", "t2", "evil") if t not in (task["id"], mine["id"]))
        other_task = client.get("/api/task", params={"id": other}).json()["task"]  # reading is fine ...
        response = client.post("/api/rankings", json={"task_id": other, "ranks": ranks_for(other_task, [1, 2, 3, 4])})
        assert response.status_code == 409  # ... ranking a task not handed out is not
        assert client.post("/api/rankings", json={"task_id": mine["id"],
                                                  "ranks": ranks_for(mine, [3, 2, 1, 4])}).status_code == 200
        # alice may still edit her own ranking
        client.cookies.clear()
        login(client, "alice")
        edit = client.post("/api/rankings", json={"task_id": task["id"], "ranks": ranks_for(task, [3, 2, 1, 4])})
        assert edit.status_code == 200 and edit.json()["action"] == "edit"
    assert sorted((r.annotator, r.task_id) for r in store.export_rankings()) == sorted(
        [("alice", task["id"]), ("bob", mine["id"])])
    value, progress = LabelUI(store, settings).submit("bob", {"task_id": task["id"], "ranks": ranks})
    assert progress is None and "was not handed to you" in json.loads(value)["error"]


def test_reopening_a_skipped_task_takes_no_place_but_can_be_ranked_while_it_has_room(store):
    settings = AppSettings(overlap=1)
    task = handlers.next_task(store, "alice", settings)["task"]
    handlers.skip_task(store, "alice", settings, {"task_id": task["id"]})
    handlers.open_task(store, "alice", settings, task["id"])
    assert store.assignments() == []  # opening from the history holds nothing
    assert handlers.next_task(store, "bob", settings)["task"]["id"] == task["id"]  # the skip freed the slot
    with pytest.raises(handlers.UserError, match="no free place"):  # bob holds the only slot
        handlers.submit_ranking(store, "alice", settings,
                                {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3, 4])})
    wider = AppSettings(overlap=2)
    result = handlers.submit_ranking(store, "alice", wider, {"task_id": task["id"],
                                                             "ranks": ranks_for(task, [1, 2, 3, 4])})
    assert result["action"] == "submit" and not store.has_skipped("alice", task["id"])


def test_a_hoarder_who_skips_and_reopens_everything_leaves_the_queue_to_others(store):
    """Skipping every task and reopening each from the history once emptied everyone else's queue."""
    settings = AppSettings(overlap=1)
    while (task := handlers.next_task(store, "alice", settings)["task"]) is not None:
        handlers.skip_task(store, "alice", settings, {"task_id": task["id"]})
    skipped = [item["task_id"] for item in handlers.history(store, "alice", settings)["items"]]
    assert len(skipped) == 4
    for _ in range(3):
        for task_id in skipped:
            handlers.open_task(store, "alice", settings, task_id)
    assert store.assignments() == []
    served = []
    while (task := handlers.next_task(store, "bob", settings)["task"]) is not None:
        handlers.submit_ranking(store, "bob", settings, {"task_id": task["id"], "ranks": ranks_for(
            task, list(range(1, len(task["completions"]) + 1)))})
        served.append(task["id"])
    assert sorted(served) == sorted(skipped)  # bob ranked every task


def test_an_annotator_holds_at_most_max_held_tasks(store):
    settings = AppSettings(overlap=2, max_held=2)
    assert store.assign_task("alice", "t0", 2, max_held=2) and store.assign_task("alice", "t1", 2, max_held=2)
    assert store.assign_task("alice", "t2", 2, max_held=2) is False  # a third hold is refused
    assert store.assign_task("alice", "t1", 2, max_held=2)  # renewing one of the two is not a new hold
    first = handlers.next_task(store, "alice", settings)["task"]["id"]
    assert first in ("t0", "t1")  # a held task comes first
    assert sorted(a.task_id for a in store.assignments() if a.annotator == "alice") == ["t0", "t1"]
    handlers.skip_task(store, "alice", settings, {"task_id": first})
    assert store.assign_task("alice", "t2", 2, max_held=2)  # a place of hers came free


# ------------------------------------------------------------------------------------------ hostile requests

@pytest.mark.parametrize("body, key", [
    ('{"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3, "t0-c0": 3}}', "t0-c0"),
    ('{"task_id": "t1", "task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}}', "task_id"),
])
def test_a_repeated_key_is_refused_not_read_as_its_last_value(client, store, body, key):
    login(client, "bob")
    client.get("/api/next")
    store.assign_task("bob", "t0", SETTINGS.overlap)
    response = client.post("/api/rankings", content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": f"the request body repeats the key {key!r} in one object"}
    assert store.export_rankings() == []


@pytest.mark.parametrize("path, body, status", [
    ("/api/login", "[" * 100_000 + "]" * 100_000, 400),                          # RecursionError in json.loads
    ("/api/rankings", '{"task_id": "t0", "ranks": ' + '{"a":' * 40_000 + "1" + "}" * 40_000 + "}", 400),
    ("/api/rankings", '{"task_id": "t0", "ranks": {"t0-c0": 1, "t0-c1": 2, "t0-c2": 3}, "seconds": 1'
     + "0" * 400 + "}", 422),                                                   # OverflowError in math.isfinite
    ("/api/rankings", '{"task_id": "t0", "ranks": {"t0-c0": 1e400, "t0-c1": 2, "t0-c2": 3}}', 422),
    ("/api/rankings", r'{"task_id": "t0", "ranks": {"t0-c0": 1}, "request_id": "\udfff"}', 422),
    ("/api/rankings", r'{"task_id": "t\ud800", "ranks": {"t0-c0": 1}}', 404),
    ("/api/skip", r'{"task_id": "t0", "reason": "\ud800"}', 422),
    ("/api/login", r'{"username": "\ud800", "password": "correct horse"}', 401),  # UnicodeEncodeError before
    ("/api/login", r'{"username": "alice\udfff", "password": "\ud800\ud800\ud800\ud800"}', 401),
])
def test_hostile_json_gets_a_4xx_and_stores_nothing(client, store, path, body, status):
    if path != "/api/login":
        login(client, "bob")
    response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert "\n" not in response.json()["error"]
    assert store.export_rankings() == []
    assert nothing_stored(store)


@pytest.mark.parametrize("path", ["/api/login", "/api/rankings", "/api/skip", "/api/logout"])
def test_oversized_bodies_are_refused_before_they_are_read(store, path):
    app = create_app(store, SETTINGS, ui=False)
    chunk = b"x" * 65536
    # A declared 100 MB body: refused on the header alone, before any sign-in check and before one byte is read.
    status, read = asgi_request(app, path, {"content-type": "application/json", "content-length": str(100 * 2**20)},
                                chunk, max_chunks=160)
    assert (status, read) == (413, 0)
    # A chunked body (no length): reading stops just past the limit.
    status, read = asgi_request(app, path, {"content-type": "application/json"}, chunk, max_chunks=160)
    assert status == 413 and read <= MAX_BODY_BYTES + len(chunk)
    # Within the limit, the request goes through as before.
    status, _ = asgi_request(app, "/api/login", {"content-type": "application/json"}, b"{}", max_chunks=1)
    assert status == 401
    # Any other path without a session is refused without reading the body at all.
    status, read = asgi_request(app, "/gradio_api/queue/join", {"content-type": "application/json"}, chunk, 160)
    assert (status, read) == (401, 0)


# ------------------------------------------------------------------------------------------ sign-in throttling

def test_http_failed_sign_ins_are_throttled(store):
    from fastapi.testclient import TestClient

    from labeling.auth import LoginThrottle

    throttle = LoginThrottle(store, clock=lambda: 1000.0)  # no time passes: a slow machine waits out no delay
    with TestClient(create_app(store, SETTINGS, ui=False, throttle=throttle)) as client:
        check_throttled(client)


def check_throttled(client):
    statuses = []
    for _ in range(20):
        response = client.post("/api/login", json={"username": "alice", "password": "wrong password"})
        statuses.append(response.status_code)
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert response.json()["error"].startswith("too many failed sign-ins; try again in ")
    assert int(response.headers["retry-after"]) >= 1
    assert client.post("/api/login", json={"username": "alice", "password": PASSWORD}).status_code == 429
    assert client.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200


def test_successful_sign_ins_to_one_account_have_a_budget(store):
    from fastapi.testclient import TestClient

    from labeling.auth import SIGN_IN_BURST

    # Each sign-in costs a scrypt hash: a script looping over a right password must not keep the server busy.
    with TestClient(create_app(store, SETTINGS, ui=False)) as client:
        statuses = [client.post("/api/login", json={"username": "alice", "password": PASSWORD}).status_code
                    for _ in range(SIGN_IN_BURST + 1)]
        assert statuses == [200] * SIGN_IN_BURST + [429]
        refused = client.post("/api/login", json={"username": "alice", "password": "wrong password"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1  # no password checked
        assert refused.json() == {"error": f"too many sign-ins to this account; try again in "
                                           f"{refused.headers['retry-after']} s"}
        assert client.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200


def test_sign_in_page_and_api_get_a_strict_content_security_policy(client):
    page = client.get("/login")
    assert page.status_code == 200 and 'id="login-form"' in page.text
    for response in (page, client.get("/api/next")):
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    script = client.get("/auth/login.js")
    assert script.status_code == 200 and 'fetch("api/login"' in script.text and "innerHTML" not in script.text


def test_writes_from_another_site_are_refused(client, store):
    login(client)
    task = client.get("/api/next").json()["task"]
    body = {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3, 4]), "request_id": "q1"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "https://testserver"},
                    {"Origin": "http://testserver.evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        for path, payload in (("/api/rankings", body), ("/api/skip", {"task_id": task["id"]}),
                              ("/api/logout", {}), ("/api/login", {"username": "bob", "password": PASSWORD}),
                              ("/gradio_api/queue/join", {"fn_index": 0, "session_hash": "h"})):
            response = client.post(path, json=payload, headers=headers)
            assert response.status_code == 403, (path, headers)
            assert response.json() == {"error": "request from another site refused"}
    assert nothing_stored(store) and client.get("/api/session").json()["annotator"] == "alice"
    same_site = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/rankings", json=body, headers=same_site).json()["action"] == "submit"
    assert client.get("/api/next", headers={"Origin": "http://evil.example"}).status_code == 200  # reads are fine


def test_admins_manage_accounts_and_the_role_is_checked_on_the_server(client, store):
    from fastapi.testclient import TestClient

    login(client, "bob")
    assert client.get("/api/admin/users").status_code == 403
    refused = client.post("/api/admin/users", json={"name": "alice", "action": "disable"})
    assert refused.status_code == 403 and "only admins" in refused.json()["error"]
    with TestClient(client.app) as admin:
        login(admin, "alice")  # an admin by `rlhf label --admin alice` (SETTINGS)
        users = admin.get("/api/admin/users").json()["users"]
        assert [(u["name"], u["role"], u["disabled"]) for u in users] == [("alice", "annotator", False),
                                                                           ("bob", "annotator", False)]
        answer = admin.post("/api/admin/users", json={"name": "bob", "action": "disable"}).json()
        assert answer == {"name": "bob", "action": "disable", "sessions_ended": 1}
        assert client.get("/api/session").status_code == 401  # signed out everywhere, at once
        assert client.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 401
        admin.post("/api/admin/users", json={"name": "bob", "action": "enable"}).raise_for_status()
        admin.post("/api/admin/users", json={"name": "bob", "action": "make-admin"}).raise_for_status()
        for payload, status, error in (({"name": "nobody", "action": "disable"}, 404, "unknown annotator"),
                                       ({"name": "bob", "action": "delete"}, 400, "'action' must be one of"),
                                       ({"name": "alice", "action": "disable"}, 400, "your own account"),
                                       ({"action": "disable"}, 400, "'name'")):
            response = admin.post("/api/admin/users", json=payload)
            assert response.status_code == status and error in response.json()["error"]
    login(client, "bob")  # now an admin by his role in the store
    assert client.get("/api/session").json()["can_view_stats"] is True
    assert client.post("/api/admin/users", json={"name": "alice", "action": "end-sessions"}).json()[
        "sessions_ended"] == 1
    assert nothing_stored(store)


def test_a_session_works_on_every_server_of_the_database(store, db_url):
    from fastapi.testclient import TestClient

    from labeling.app import SESSION_COOKIE

    with open_store(db_url) as other, TestClient(create_app(store, SETTINGS, ui=False)) as one, \
            TestClient(create_app(other, SETTINGS, ui=False)) as two:
        login(one)
        two.cookies.set(SESSION_COOKIE, one.cookies[SESSION_COOKIE])
        task = two.get("/api/next").json()["task"]
        assert one.get("/api/next").json()["task"]["id"] == task["id"]  # the same assignment on both
        body = {"task_id": task["id"], "ranks": ranks_for(task, [1, 2, 3, 4]), "request_id": "q1"}
        assert one.post("/api/rankings", json=body).json()["action"] == "submit"
        assert two.post("/api/rankings", json=body).json()["action"] == "duplicate"  # re-sent to the other one
        two.post("/api/logout", json={})
        assert one.get("/api/session").status_code == 401
    assert len(store.export_rankings()) == 1 and len(store.events()) == 1


def test_behind_a_tls_proxy_under_a_root_path(store):
    from fastapi.testclient import TestClient

    # What uvicorn makes of a request the proxy forwarded (X-Forwarded-Proto: https, prefix /label stripped).
    with TestClient(create_app(store, SETTINGS, ui=False), base_url="https://labels.example",
                    root_path="/label") as client:
        response = client.post("/label/api/login", json={"username": "alice", "password": PASSWORD})
        cookie = response.headers["set-cookie"].lower()
        assert all(flag in cookie for flag in ("httponly", "samesite=strict", "secure", "path=/label/"))
        assert response.headers["strict-transport-security"].startswith("max-age=")
        assert client.get("/label/api/next").json()["task"] is not None
        refused = client.post("/label/api/logout", json={}, headers={"Origin": "http://labels.example"})
        assert refused.status_code == 403  # plain http is another origin
        own_origin = {"Origin": "https://labels.example"}
        assert client.post("/label/api/logout", json={}, headers=own_origin).status_code == 200
        assert client.get("/label/api/next").status_code == 401


def test_no_stats_over_http(client):
    # The statistics are the admins' panel in the UI and `rlhf stats`: the API serves them to nobody.
    for name in ("bob", "alice"):  # alice is an admin
        login(client, name)
        assert client.get("/api/stats").status_code == 404


# ------------------------------------------------------------------------------------------ command

def label_args(db, **kw):
    return argparse.Namespace(**{"db": str(db), "host": "127.0.0.1", "port": 0, "overlap": 2, "guidelines": None,
                                 "admin": [], "root_path": "", "order": "fewest-rankings", "rm": None,
                                 "pre_rank": None, "seed": 0, "max_held": 3, "gold_rate": 0.1,
                                 "gold_threshold": 0.7, "flags": ("unsafe",), "rate_limit": 5.0, **kw})


def test_label_command_refuses_missing_or_empty_databases(tmp_path):
    with pytest.raises(UserError, match="no label database"):
        run_label(label_args(tmp_path / "missing.db"))
    open_store(tmp_path / "empty.db").close()
    with pytest.raises(UserError, match="holds no tasks"):
        run_label(label_args(tmp_path / "empty.db"))
    with open_store(tmp_path / "empty.db") as store:
        store.import_tasks([make_task("t0", ["a", "b"])])
        store.add_annotator("sim-1")  # a scripted account: it cannot sign in
    with pytest.raises(UserError, match="has no annotator who can sign in; add one first with `rlhf users add"):
        run_label(label_args(tmp_path / "empty.db"))
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError):
        run_label(label_args(tmp_path / "junk.db"))


def test_label_command_refuses_bad_options(store, db_url):
    with pytest.raises(UserError, match="--guidelines"):
        run_label(label_args(db_url, guidelines="/no/such/guidelines.md"))
    with pytest.raises(UserError, match="unknown annotators"):
        run_label(label_args(db_url, admin=["carol"]))
    with pytest.raises(UserError, match="--overlap"):
        run_label(label_args(db_url, overlap=0))
    with pytest.raises(UserError, match="--root-path must start with '/'"):
        run_label(label_args(db_url, root_path="label"))
    for rate in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--rate-limit must be 0"):
            run_label(label_args(db_url, rate_limit=rate))


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use") as info:
            bind_socket("127.0.0.1", port)
        assert "\n" not in str(info.value)


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    # asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; with proto 0 every response waited 40 ms
    # for the client's delayed ACK.
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_guidelines_markdown_is_rendered_without_raw_html(tmp_path):
    from labeling.app import render_guidelines

    path = tmp_path / "guide.md"
    path.write_text("# Rank by *helpfulness*\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1))\n")
    html = render_guidelines(str(path))
    assert "<h1>Rank by <em>helpfulness</em></h1>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html
