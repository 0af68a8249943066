"""The Gradio UI's event logic (labeling.gradio_ui.LabelUI, no browser) and how the UI is served: one session
for the sign-in page, the API and Gradio; Gradio refuses every request without one."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from labeling import gradio_ui
from labeling.app import SESSION_COOKIE, create_app
from labeling.auth import add_annotator
from labeling.gradio_ui import LabelUI, history_choices, ranker_value, refused_value, topbar_html
from labeling.guards import RequestBudget
from labeling.handlers import AppSettings
from labeling.store import MAX_COMMENT_LENGTH, open_store
from rlhf.records import Task

PASSWORD = "correct horse"
HOSTILE = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
           "**b** [x](javascript:alert(1)) {{7*7}} ${7*7} &amp;"]
SETTINGS = AppSettings(overlap=2, guidelines_html="<p>be kind</p>", admins=frozenset({"alice"}))


@pytest.fixture()
def store(db_url):
    store = open_store(db_url)
    store.import_tasks([
        Task.from_dict({"id": "evil", "prompt": "<b>hi</b>\u202e {{7*7}}",
                        "completions": [{"id": f"e{i}", "text": t} for i, t in enumerate(HOSTILE)]}),
        Task.from_dict({"id": "t1", "prompt": "plain", "completions": [{"id": "a", "text": "x"},
                                                                        {"id": "b", "text": "y"}]}),
    ])
    add_annotator(store, "alice", PASSWORD)
    add_annotator(store, "bob", PASSWORD)
    yield store
    store.close()


def view(value: str) -> dict:
    return json.loads(value)


def ranks_for(task: dict, order: list[int]) -> dict[str, int]:
    return {c["id"]: r for c, r in zip(task["completions"], order)}


# ------------------------------------------------------------------------------------------ the widget's value

def test_ranker_value_carries_hostile_text_exactly_and_no_markup():
    task = {"id": "evil", "prompt": "</script><b>x</b>", "completions": [
        {"id": "e0", "label": "A", "text": HOSTILE[0]}, {"id": "e1", "label": "B", "text": HOSTILE[1]}]}
    value = ranker_value(task, notice="Ranking saved.")
    assert "<" not in value and ">" not in value and "&" not in value
    assert view(value)["task"] == task and view(value)["notice"] == "Ranking saved."
    assert ranker_value(task) != ranker_value(task)  # every answer is new to the widget, even an equal one
    refused = view(refused_value("rank every completion <C>", "evil"))
    assert refused == {"n": refused["n"], "keep": True, "error": "rank every completion <C>", "task_id": "evil"}


def test_topbar_and_history_labels_are_escaped_text():
    html = topbar_html("a<b>", {"ranked": 2, "skipped": 1, "total_tasks": 9})
    assert "a&lt;b&gt;" in html and "<b>a<b>" not in html
    assert ">2 ranked, 1 skipped · 9 tasks in all<" in html and "left for you" not in html
    assert '<span class="left" id="left">3 left for you</span>' in topbar_html(
        "a", {"ranked": 2, "skipped": 1, "total_tasks": 9, "left": 3})
    items = [{"task_id": "t<1>", "prompt": "line one \u202eevil x x…", "status": "ranked", "at": 0}]
    assert history_choices(items) == [("ranked · t<1> · line one U+202Eevil x x…", "t<1>")]  # shown as text


# ------------------------------------------------------------------------------------------ events

def test_submit_stores_once_and_serves_the_next_task(store):
    ui = LabelUI(store, SETTINGS)
    value, progress = ui.next_view("alice")
    assert view(value)["task"]["id"] in ("evil", "t1") and progress == {"ranked": 0, "skipped": 0, "total_tasks": 2,
                                                                       "left": 2}
    assert store.assign_task("alice", "evil", SETTINGS.overlap)  # as if the queue had served it
    task = view(ui.open("alice", "evil"))["task"]
    assert sorted(c["text"] for c in task["completions"]) == sorted(HOSTILE)
    payload = {"task_id": "evil", "ranks": ranks_for(task, [1, 2, 2]), "request_id": "r1", "seconds": 3.5}
    value, progress = ui.submit("alice", payload)
    assert view(value)["notice"] == "Ranking saved." and view(value)["task"]["id"] == "t1"
    assert progress == {"ranked": 1, "skipped": 0, "total_tasks": 2, "left": 1}
    value, progress = ui.submit("alice", payload)  # the same request again (a double Enter)
    assert view(value)["notice"] == "Ranking already saved." and progress["ranked"] == 1
    assert len(store.events()) == 1
    assert store.get_own_ranking("alice", "evil").ranks == payload["ranks"]


@pytest.mark.parametrize("payload, error", [
    ({"task_id": "evil", "ranks": {"e0": 1, "e1": 2}}, "e2"),                    # a completion left out
    ({"task_id": "evil", "ranks": {"e0": 1, "e1": 1, "e2": 1}}, "tie"),          # all tied
    ({"task_id": "evil", "ranks": {"e0": 1, "e1": 2, "e2": 3, "zz": 4}}, "zz"),  # a foreign id
    ({"task_id": "evil", "ranks": ["e0", "e1", "e2"]}, "ranks"),
    ({"task_id": "nope", "ranks": {"e0": 1}}, "nope"),
    (None, "JSON object"),
])
def test_refused_rankings_keep_the_widgets_work_and_store_nothing(store, payload, error):
    value, progress = LabelUI(store, SETTINGS).submit("alice", payload)
    refused = view(value)
    assert progress is None and refused["keep"] is True and error in refused["error"]
    assert refused["task_id"] == (payload or {}).get("task_id")
    assert store.events() == [] and store.export_rankings() == []


def test_skip_then_edit_from_the_history(store):
    ui = LabelUI(store, SETTINGS)
    assert store.assign_task("alice", "evil", SETTINGS.overlap)  # as if the queue had served it
    value, progress = ui.skip("alice", {"task_id": "evil", "reason": " unclear ", "request_id": "s1"})
    assert view(value)["notice"] == "Task skipped." and progress["skipped"] == 1
    assert [v for _, v in ui.history("alice")] == ["evil"] and ui.history("bob") == []
    task = view(ui.next_view("alice")[0])["task"]
    ui.submit("alice", {"task_id": task["id"], "ranks": ranks_for(task, [2, 1]), "request_id": "r1"})
    assert view(ui.next_view("alice")[0])["task"] is None  # queue finished
    assert [label.split(" · ")[:2] for label, _ in ui.history("alice")] == [["ranked", "t1"], ["skipped", "evil"]]
    opened = view(ui.open("alice", "t1"))
    assert opened["editing"] is True and opened["own"] == {"ranks": ranks_for(task, [2, 1])}
    assert view(ui.open("bob", "t1"))["own"] is None  # bob never sees alice's answers
    value, _ = ui.submit("alice", {"task_id": "t1", "ranks": ranks_for(task, [1, 2]), "request_id": "r2"})
    assert view(value)["notice"] == "Ranking updated."
    assert [e["kind"] for e in store.events()] == ["skip", "submit", "edit"]
    missing = view(ui.open("alice", "no-such-task"))
    assert missing["keep"] is True and "no-such-task" in missing["error"]


def test_statistics_text_only_for_admins(store):
    ui = LabelUI(store, SETTINGS)
    assert "--admin" in ui.stats_text("bob")
    assert "rankings" in ui.stats_text("alice")


# ------------------------------------------------------------------------------------------ serving

@pytest.fixture()
def client(store):
    from fastapi.testclient import TestClient

    with TestClient(create_app(store, SETTINGS), follow_redirects=False) as client:
        yield client


def test_the_ui_needs_the_same_session_as_the_api(client):
    first = client.get("/")
    assert first.status_code == 303 and first.headers["location"] == "login"
    assert client.get("/config").status_code == 401          # Gradio itself refuses too
    assert client.post("/gradio_api/queue/join", json={}).status_code == 401
    client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
    page = client.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "http" not in policy
    config = client.get("/config").json()
    assert config["username"] == "alice"
    assert client.get("/gradio_api/runs").status_code == 404  # no run history kept in the browser
    ranker = next(c for c in config["components"] if c["props"].get("elem_id") == "ranker")
    # The widget's template holds no data: the value is never interpolated as HTML.
    assert "${value}" not in ranker["props"]["html_template"] and "textContent" in ranker["props"]["js_on_load"]
    assert not any(sink in ranker["props"]["js_on_load"] for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML",
                                                                      "document.write"))
    out = client.get("/logout")
    assert out.status_code == 303 and out.headers["location"] == "login?signed_out=1"
    assert client.get("/").status_code == 303 and client.get("/config").status_code == 401


GRADIO_ROUTES = [  # (method, path, JSON body)
    ("POST", "/login", {"username": "alice", "password": PASSWORD}),  # Gradio's form sign-in
    ("POST", "/login/", {"username": "alice", "password": PASSWORD}),
    ("POST", "/logout", {}),
    ("GET", "/openapi.json", None),
    ("GET", "/gradio_api/openapi.json", None),
    ("GET", "/gradio_api/startup-events", None),
    ("GET", "/gradio_api/info", None),
    ("GET", "/theme.css", None),
    ("POST", "/gradio_api/cancel", {"session_hash": "h", "fn_index": 0, "event_id": "e"}),
    ("POST", "/gradio_api/reset", {"session_hash": "h", "fn_index": 0, "event_id": "e"}),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "h"}),
]


@pytest.mark.parametrize("method, path, body", GRADIO_ROUTES)
def test_every_gradio_route_needs_a_session(client, method, path, body):
    response = client.request(method, path, json=body)
    # the API descriptions are closed to everyone; the sign-in page's own paths take only GET
    expected = 404 if path.endswith("openapi.json") else 405 if path.startswith(("/login", "/logout")) else 401
    assert response.status_code == expected and "\n" not in response.json()["error"]


def test_api_descriptions_are_closed_even_when_signed_in(client):
    client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
    assert client.get("/openapi.json").status_code == 404
    assert client.get("/gradio_api/openapi.json").status_code == 404
    assert client.get("/gradio_api/startup-events").status_code == 200  # signed in: Gradio's own routes work


def test_a_gradio_session_hash_belongs_to_the_annotator_who_used_it_first(client):
    client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
    body = {"session_hash": "alice-page", "fn_index": 0, "event_id": "nothing"}
    assert client.post("/gradio_api/cancel", json=body).status_code == 200
    client.cookies.clear()
    client.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
    refused = client.post("/gradio_api/cancel", json=body)
    assert refused.status_code == 403 and "another sign-in" in refused.json()["error"]
    assert client.post("/gradio_api/reset", json=body).status_code == 403
    assert client.post("/gradio_api/cancel", json={**body, "session_hash": "bob-page"}).status_code == 200
    nested = client.post("/gradio_api/queue/join", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert nested.status_code == 400  # not a RecursionError inside Gradio


def test_gradio_routes_refuse_oversized_bodies_unread(store):
    from app_helpers import asgi_request

    from labeling.app import MAX_BODY_BYTES

    app = create_app(store, SETTINGS)
    headers = {"content-type": "application/json", "content-length": str(100 * 2**20)}
    for path in ("/gradio_api/queue/join", "/gradio_api/upload", "/"):
        assert asgi_request(app, path, headers, b"x" * 65536, max_chunks=160) == (413, 0)
    sessions = app.state.sessions
    token = sessions.create("alice")  # signed in, with a chunked body: cut off at the limit
    status, read = asgi_request(app, "/gradio_api/queue/join", {"content-type": "application/json",
                                                                "cookie": f"{SESSION_COOKIE}={token}"},
                                b"x" * 65536, max_chunks=160)
    assert status == 413 and read <= MAX_BODY_BYTES + 65536


def test_no_cross_origin_calls_even_from_localhost(client):
    client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
    for origin in ("http://localhost:8888", "http://evil.example", "null"):
        preflight = client.options("/gradio_api/queue/join", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in client.get("/config", headers={"Origin": origin}).headers


def test_a_forged_cookie_is_no_session(client):
    client.cookies.set(SESSION_COOKIE, "forged-token")
    assert client.get("/").status_code == 303
    assert client.get("/config").status_code == 401


def test_a_request_budget_refills_at_its_rate_and_refusals_spend_nothing():
    now = [0.0]
    budget = RequestBudget(rate=2.0, burst=3, max_entries=2, clock=lambda: now[0])
    assert [budget.spend("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.spend("alice") == pytest.approx(0.5)
    assert budget.spend("alice") == pytest.approx(0.5)  # a refused request spends nothing
    now[0] = 0.5
    assert budget.spend("alice") == 0.0 and budget.spend("alice") == pytest.approx(0.5)
    now[0] = 100.0
    assert [budget.spend("alice") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]  # full at the burst
    assert budget.spend("bob") == 0.0  # each key its own
    assert budget.spend("carol") == 0.0  # a third key: the least recently used (alice) is forgotten
    assert [budget.spend("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.spend("alice", take=False) == pytest.approx(0.5)  # asking: nothing taken
    now[0] += 0.5
    assert [budget.spend("alice", take=False) for _ in range(3)] == [0.0, 0.0, 0.0] and budget.spend("alice") == 0.0
    assert budget.spend("dave" * 1000, take=False) == 0.0 and "dave" * 1000 not in budget._buckets  # kept nothing


def test_each_annotator_has_a_request_budget_and_static_files_are_free(store, monkeypatch):
    from fastapi.testclient import TestClient

    import labeling.app
    import labeling.guards

    monkeypatch.setattr(labeling.app, "REQUEST_BURST", 4)
    monkeypatch.setattr(labeling.guards, "REFUSAL_PAUSE_SECONDS", 0.05)
    app = create_app(store, dataclasses.replace(SETTINGS, request_rate=0.01))  # a request each 100 s after 4
    with TestClient(app) as alice, TestClient(app) as bob:
        for client, name in ((alice, "alice"), (bob, "bob")):  # signing in without a session spends nothing
            client.post("/api/login", json={"username": name, "password": PASSWORD}).raise_for_status()
        task = alice.get("/api/next").json()["task"]
        assert [alice.get("/api/session").status_code for _ in range(2)] == [200, 200]
        assert alice.get("/config").status_code == 200  # Gradio's routes spend from the same budget
        refused = alice.post("/api/rankings", json={"task_id": task["id"], "ranks": ranks_for(task, [1, 2] + [3] * 9)})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "100"
        assert "too many requests" in refused.json()["error"] and "\n" not in refused.json()["error"]
        assert store.get_own_ranking("alice", task["id"]) is None  # refused before the handler: nothing stored
        assert alice.get("/config").status_code == 429
        assert alice.get("/theme.css").status_code == 200 and alice.get("/auth/login.js").status_code == 200
        assert bob.get("/api/next").status_code == 200  # another annotator's budget is their own
        assert alice.get("/login").status_code == 200  # over the budget, one can still open the sign-in page
        signed_out = alice.get("/logout", follow_redirects=False)  # ... and sign out
        assert signed_out.status_code == 303 and alice.get("/config").status_code == 401
        alice.cookies.clear()
        assert alice.get("/config").status_code == 401  # without a session: the sign-in check, not the budget


def test_an_ended_session_spends_no_one_s_budget(store, monkeypatch):
    from fastapi.testclient import TestClient

    import labeling.app
    import labeling.guards

    monkeypatch.setattr(labeling.app, "REQUEST_BURST", 4)
    monkeypatch.setattr(labeling.guards, "REFUSAL_PAUSE_SECONDS", 0.05)
    app = create_app(store, dataclasses.replace(SETTINGS, request_rate=0.01))  # a request each 100 s after 4
    with TestClient(app) as old, TestClient(app) as holder, TestClient(app) as alice:
        old.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        assert old.get("/api/session").status_code == 200  # 1 of alice's 4
        ended = old.cookies.get(SESSION_COOKIE)
        assert old.post("/api/logout", json={}).status_code == 200  # 2 of 4
        # Whoever still holds the ended token (a copied cookie, a shared computer) is signed out, and cannot
        # keep alice's new sessions at 429 by spending her budget with it.
        holder.cookies.set(SESSION_COOKIE, ended)
        assert {holder.get("/api/session").status_code for _ in range(6)} == {401}
        assert {holder.get("/config").status_code for _ in range(6)} == {401}
        alice.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        assert alice.get("/api/session").status_code == 200
        assert alice.get("/api/session").status_code == 429  # her budget still counts her own requests


def test_the_stream_of_an_event_let_in_is_never_refused(store, monkeypatch):
    import httpx
    from app_helpers import serving

    import labeling.app
    import labeling.guards

    # A page's event is a queue/join (spends) and then its answer's stream: refusing the stream after the join
    # was let in would store the ranking and lose the page's answer (Gradio then reloads the page).
    monkeypatch.setattr(labeling.app, "REQUEST_BURST", 2)
    monkeypatch.setattr(labeling.guards, "REFUSAL_PAUSE_SECONDS", 0.05)
    with serving(store, dataclasses.replace(SETTINGS, request_rate=0.01)) as (host, port), \
            httpx.Client(base_url=f"http://{host}:{port}") as client:
        client.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        assert [client.get("/api/session").status_code for _ in range(3)] == [200, 200, 429]
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": "page-1"}) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert client.post("/gradio_api/queue/join", json={"session_hash": "page-1"}).status_code == 429


def test_ui_assets_exist():
    for name in ("ranker.html", "ranker.js", "ranker.css", "login.html", "login.js", "login.css"):
        assert (gradio_ui.STATIC_DIR / name).stat().st_size > 0
    template = gradio_ui.ranker_template()
    # Gradio evaluates the template as Handlebars and then as a JS template literal: keep it inert.
    assert not any(token in template for token in ("{{", "${", "`", "\\"))
    # The comment box takes what the store accepts, no more.
    assert re.findall(r'maxlength="([^"]*)"', template) == [str(MAX_COMMENT_LENGTH)]


def test_the_ui_under_a_root_path(store):
    from fastapi.testclient import TestClient

    # `rlhf label --root-path /label` behind a proxy that strips /label (uvicorn puts it back into the path).
    with TestClient(create_app(store, SETTINGS), root_path="/label", follow_redirects=False) as client:
        first = client.get("/label/")
        assert first.status_code == 303 and first.headers["location"] == "login"  # relative: /label/login
        assert client.get("/label/login").status_code == 200
        assert client.get("/label/config").status_code == 401
        client.post("/label/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        assert client.get("/label/").status_code == 200
        config = client.get("/label/config").json()
        assert config["username"] == "alice" and config["root"].endswith("/label")


# ------------------------------------------------------------------------------------------ the admin view

def test_admin_view_lists_the_most_disagreed_tasks_first(store):
    from labeling.gradio_ui import admin_tables, ranking_text, review_table

    assert ranking_text({"x": 2, "y": 1, "z": 2}, {"x": "A", "y": "B", "z": "C"}) == "B > A = C"
    store.add_annotator("carl")
    for name, evil, plain in [("alice", {"e0": 1, "e1": 2, "e2": 3}, {"a": 1, "b": 2}),
                              ("bob", {"e0": 3, "e1": 2, "e2": 1}, {"a": 1, "b": 2}),
                              ("carl", None, {"a": 2, "b": 1})]:
        if evil:
            store.submit_ranking(name, "evil", evil, seconds=10.0,
                                 **({"comment": HOSTILE[0], "flags": ["unsafe", "off-topic"]} if name == "bob" else {}))
        store.submit_ranking(name, "t1", plain, seconds=4.0)
    store.skip_task("carl", "evil", reason=None, flags=["broken-prompt"])
    tables = admin_tables(store, SETTINGS)
    annotators = tables["annotators"].set_index("annotator")
    assert annotators.loc["alice", "ranked"] == 2 and annotators.loc["carl", "ranked"] == 1
    assert annotators.loc["alice", "median_seconds"] == 7.0
    # evil: alice and bob reversed (0 of 3 pairs agree); t1: 1 of 3 annotator pairs agree.
    disagreed = tables["disagreed"]
    assert list(disagreed["task_id"]) == ["evil", "t1"]
    assert list(disagreed["agreement"]) == [0.0, round(1 / 3, 3)]
    assert list(disagreed["annotators"]) == ["alice, bob", "alice, bob, carl"]
    legend, rankings, gold = review_table(store, "evil")
    assert list(legend["label"]) == ["A", "B", "C"] and list(legend["completion"]) == ["e0", "e1", "e2"]
    assert legend["text"][0] == HOSTILE[0]  # as text, exactly
    assert rankings.to_dict("records") == [
        {"annotator": "alice", "ranking": "A > B > C", "flags": "", "comment": ""},
        {"annotator": "bob", "ranking": "C > B > A", "flags": "off-topic, unsafe", "comment": HOSTILE[0]}]
    # Every ranking or skip with a comment or flags, newest first, the comment as text, exactly.
    assert tables["notes"].to_dict("records") == [
        {"task_id": "evil", "annotator": "carl", "status": "skipped", "flags": "broken-prompt", "comment": ""},
        {"task_id": "evil", "annotator": "bob", "status": "ranked", "flags": "off-topic, unsafe",
         "comment": HOSTILE[0]}]
    assert gold == "Not a gold question. Not resolved."
    store.resolve("evil", {"e0": 2, "e1": 1, "e2": 2}, "alice")  # an admin's resolution
    assert review_table(store, "evil")[2] == "Not a gold question. Resolved: B > A = C (by alice)."
    assert list(admin_tables(store, SETTINGS)["disagreed"]["resolved_by"]) == ["alice", ""]
    # alice's ranking becomes the gold answer: bob, who reversed it, has gold accuracy 0 and is flagged.
    store.set_gold("evil", {"e0": 1, "e1": 2, "e2": 3}, source="alice")
    assert review_table(store, "evil")[2] == ("Gold question: A > B > C (the ranking of alice). "
                                              "Resolved: B > A = C (by alice).")
    annotators = admin_tables(store, SETTINGS)["annotators"].set_index("annotator")
    assert annotators.loc["bob", "gold_tasks"] == 1 and annotators.loc["bob", "gold_accuracy"] == 0.0
    assert bool(annotators.loc["bob", "flagged"]) and annotators.loc["alice", "gold_tasks"] == 0


def test_an_admin_types_a_ranking_as_labels():
    from labeling.gradio_ui import parse_ranking_text
    from labeling.handlers import RequestError

    labels = {"x": "A", "y": "B", "z": "C"}
    assert parse_ranking_text("B > a = C", labels) == {"y": 1, "x": 2, "z": 2}
    assert parse_ranking_text(" C>B>A ", labels) == {"z": 1, "y": 2, "x": 3}
    for text, error in [("", "type the ranking as labels"), (None, "type the ranking as labels"),
                        ("A > B", "rank every completion (C missing)"), ("A > B > C > A", "A appears twice"),
                        ("A > B > D", "no completion is labelled 'D' (the labels: A, B, C)"),
                        ("A >> B > C", "no completion is labelled ''")]:
        with pytest.raises(RequestError, match=re.escape(error)):
            parse_ranking_text(text, labels)
