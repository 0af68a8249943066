"""Property-based test of the labeling server: generated bodies (valid-looking, malformed, hostile) sent to
every JSON route, the API's and Gradio's, signed in and not. No answer may be a 5xx, every error is one line,
and afterwards the store is intact: every ranking valid, no task past its overlap, no ranking of a task
the annotator was not handed, and nothing stored before the run changed."""

from __future__ import annotations

import json
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from labeling.app import create_app
from labeling.auth import add_annotator
from labeling.handlers import AppSettings
from labeling.store import open_store
from rlhf.records import Ranking, Task

PASSWORD = "correct horse"
TASK_IDS = [f"t{i}" for i in range(8)]
COMPLETION_IDS = [f"{t}-c{i}" for t in TASK_IDS for i in range(3)]
OVERLAP = 1
EXAMPLES = 300

# Any JSON value: huge integers (OverflowError bait), NaN and infinities, lone surrogates, nesting.
text = st.text(st.characters(codec=None), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 300, max_value=10 ** 400)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=8)


def maybe(strategy):
    return st.none() | strategy | values


ranks = (st.dictionaries(st.sampled_from(COMPLETION_IDS) | text, st.integers(-2, 5) | values, max_size=5)
         | st.builds(lambda t, order: {f"{t}-c{i}": r for i, r in enumerate(order)}, st.sampled_from(TASK_IDS),
                     st.permutations([1, 2, 3]) | st.lists(st.integers(1, 3), min_size=3, max_size=3))
         | values)
request_ids = maybe(st.sampled_from(["r1", "r2", "r3"]) | st.text(min_size=100, max_size=200))
task_ids = maybe(st.sampled_from(TASK_IDS))
seconds = maybe(st.floats(0, 1e6) | st.integers(10 ** 300, 10 ** 400) | st.sampled_from([-1, 1e400, "5"]))


def task_ranks(task_id: str):
    """Ranks of this task's completions: mostly valid, sometimes all tied or out of range."""
    return (st.permutations([1, 2, 3]) | st.lists(st.integers(0, 4), min_size=3, max_size=3)).map(
        lambda order: {f"{task_id}-c{i}": r for i, r in enumerate(order)})


# Well-formed submits and skips of real tasks (the assignment and request-id rules get exercised).
answers = st.sampled_from(TASK_IDS).flatmap(lambda t: st.one_of(
    *[st.tuples(st.just("/api/rankings"), st.fixed_dictionaries(
        {"task_id": st.just(t), "ranks": task_ranks(t)},
        optional={"request_id": st.sampled_from(["r1", "r2", "r3", "r4", "r5"]) | request_ids,
                  "seconds": st.floats(0, 1e5) | seconds}))] * 3,  # mostly rankings: skips empty the queue
    st.tuples(st.just("/api/skip"), st.fixed_dictionaries(
        {"task_id": st.just(t)}, optional={"request_id": st.sampled_from(["r1", "r2", "r3", "r4", "r5"]) | request_ids,
                                           "reason": maybe(text)})))).map(
    lambda pair: ("POST", pair[0], json.dumps(pair[1]).encode(), "application/json"))
bodies = {
    "/api/login": st.fixed_dictionaries({}, optional={"username": maybe(st.sampled_from(["alice", "bob", "nobody"])),
                                                     "password": maybe(st.just(PASSWORD))}),
    "/api/logout": values,
    "/api/rankings": st.fixed_dictionaries({}, optional={"task_id": task_ids, "ranks": ranks,
                                                         "request_id": request_ids, "seconds": seconds,
                                                         "annotator": st.just("alice")}),
    "/api/skip": st.fixed_dictionaries({}, optional={"task_id": task_ids, "reason": maybe(text),
                                                     "request_id": request_ids}),
    "/gradio_api/queue/join": st.fixed_dictionaries({}, optional={
        "data": maybe(st.lists(values, max_size=2)), "fn_index": maybe(st.integers(-1, 8)),
        "session_hash": maybe(st.sampled_from(["page-1", "page-2"])), "event_data": values,
        "trigger_id": maybe(st.integers(-1, 20))}),
    "/login": values,  # Gradio's own form sign-in would answer here if ours did not
    "/logout": values,
    "/gradio_api/cancel": st.fixed_dictionaries({}, optional={"session_hash": maybe(st.just("page-1")),
                                                              "fn_index": values, "event_id": values}),
    "/gradio_api/reset": st.fixed_dictionaries({}, optional={"session_hash": maybe(st.just("page-1")),
                                                             "fn_index": values, "event_id": values}),
}
raw_bodies = (st.binary(max_size=64) | st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe{}", b"",
                                                         b"nul\x00l", b'{"task_id": "t0"' + b"0" * 5000 + b"}"]))
json_requests = st.sampled_from(sorted(bodies)).flatmap(
    lambda path: st.tuples(st.just("POST"), st.just(path), bodies[path].map(
        lambda body: json.dumps(body).encode()), st.just("application/json")))
raw_requests = st.tuples(st.just("POST"), st.sampled_from(sorted(bodies)), raw_bodies,
                         st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain",
                                          "multipart/form-data"]))
queries = st.text(string.printable + "\u00e9\u202e%", max_size=12).map(lambda s: quote(s, safe="%&=").encode())
reads = (st.tuples(st.just("GET"), st.sampled_from(["/api/next", "/api/session", "/api/history"]),
                   st.just(b""), st.just(""))
         | st.tuples(st.just("GET"), st.sampled_from(["/api/task?id=", "/gradio_api/queue/data?session_hash=page-2&x=",
                                                      "/config?"]), queries, st.just("")))
next_task = st.just(("GET", "/api/next", b"", ""))  # keeps tasks coming, so that answers can succeed
requests = st.tuples(st.sampled_from([True, True, True, False]),  # mostly as bob, signed in
                     answers | answers | next_task | reads | json_requests | raw_requests)


@pytest.fixture()
def store(db_url):
    store = open_store(db_url)
    store.import_tasks([Task.from_dict({"id": t, "prompt": f"prompt {t} <script>", "completions": [
        {"id": f"{t}-c{i}", "text": f"answer {i} of {t}"} for i in range(3)]}) for t in TASK_IDS])
    for name in ("alice", "bob"):
        add_annotator(store, name, PASSWORD)
    task = store.next_task("alice", OVERLAP)
    store.submit_ranking("alice", task.id, {f"{task.id}-c{i}": i + 1 for i in range(3)}, request_id="r1",
                         require_assignment=True)
    yield store
    store.close()


def test_generated_requests_never_get_a_5xx_and_leave_the_store_intact(store):
    from fastapi.testclient import TestClient

    before = store.export_rankings()
    handed: set[str] = set()  # tasks the store handed to bob, whichever route asked (the API's or Gradio's)
    next_task, assign_task = store.next_task, store.assign_task

    def recording_next_task(annotator, overlap, **options):
        task = next_task(annotator, overlap, **options)
        if task is not None and annotator == "bob":
            handed.add(task.id)
        return task

    def recording_assign_task(annotator, task_id, overlap, **options):
        assigned = assign_task(annotator, task_id, overlap, **options)
        if assigned and annotator == "bob":
            handed.add(task_id)
        return assigned

    store.next_task, store.assign_task = recording_next_task, recording_assign_task
    # No request budget: this one client sends hundreds of requests in a few seconds.
    app = create_app(store, AppSettings(overlap=OVERLAP, admins=frozenset({"alice"}), request_rate=0))
    # Separate client addresses: the anonymous client's failed sign-ins must not throttle bob's.
    with TestClient(app, client=("10.0.0.1", 1000)) as bob, TestClient(app, client=("10.0.0.2", 1000)) as anonymous:
        bob.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
        bob.get("/api/next").raise_for_status()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(requests)
        def check(request):
            signed_in, (method, path, body, content_type) = request
            client = bob if signed_in else anonymous
            if method == "GET":
                if path.startswith("/gradio_api/queue/data"):
                    client = anonymous  # a stream: only its refusal answers at once
                response = client.get(path + body.decode())
            else:
                response = client.post(path, content=body, headers={"content-type": content_type})
            assert response.status_code < 500, (method, path, body[:200], response.status_code, response.text[:300])
            event(f"{method} {path.split('?')[0]} -> {response.status_code}")  # --hypothesis-show-statistics
            if response.status_code >= 400 and response.headers.get("content-type") == "application/json":
                error = response.json().get("error") or response.json().get("detail")
                assert error and "\n" not in str(error), response.text[:300]
            if path == "/api/logout" and signed_in:  # keep bob signed in for the next examples
                bob.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
            anonymous.cookies.clear()  # a generated sign-in may have succeeded: stay anonymous

        check()

    assert store.integrity_check() == "ok"
    after = store.export_rankings()
    assert [r for r in after if r.annotator == "alice"] == before  # untouched by anything bob sent
    per_task: dict[str, int] = {}
    for ranking in after:
        task = store.get_task(ranking.task_id)
        ids = [c.id for c in task.completions]
        assert Ranking.normalized(ranking.ranks, ids) == ranking.ranks  # a complete, dense ranking
        per_task[ranking.task_id] = per_task.get(ranking.task_id, 0) + 1
        if ranking.annotator == "bob":
            assert ranking.task_id in handed
    assert all(count <= OVERLAP for count in per_task.values())
    events = store.events()
    for name in ("alice", "bob"):
        ids = [e["request_id"] for e in events if e["annotator"] == name and e["request_id"] is not None]
        assert len(ids) == len(set(ids))
    assert {(e["annotator"], e["task_id"]) for e in events if e["kind"] == "submit"} == \
        {(r.annotator, r.task_id) for r in after}


# ------------------------------------------------------------------------- every route mounted, odd requests

ODD_SEGMENTS = ["x", "0", "-1", "..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%00", "a%00b", "%ff%fe", "\u00fc" * 100,
                "a" * 300, "a/" * 200, "%3Cscript%3E"]
"""Values for a route's path parameters: unknown names, traversal, NUL, invalid UTF-8, over-long segments."""
ODD_BODIES = [None, b"", b"{}", b"[]", b"null", b"7", b'"x"', b"not json", b"{" * 5000, b'{"session_hash": ""}',
              b'{"session_hash": "' + b"h" * 500 + b'"}', b'{"session_hash": 5}', b'{"data": "x"}',
              b'{"fn_index": 999, "session_hash": "odd-1", "data": []}',
              b'{"fn_index": -1, "trigger_id": -1, "session_hash": "odd-1", "data": null}',
              b'{"event_id": "nope", "session_hash": "odd-1"}', b'{"data": [1, 2], "event_data": {"a": 1}}']
"""Bodies for every write: empty, not JSON, not an object, absurdly nested, empty or over-long session hashes,
unknown fn_index and event ids."""


def mounted_routes(app) -> list[tuple[str, str]]:
    """(method, path pattern) of every route the app serves, the mounted Gradio app's and its routers' included."""
    found = []

    def walk(routes, prefix=""):
        for route in routes:
            if type(route).__name__ == "Mount":
                walk(route.routes, prefix + route.path)
            elif hasattr(route, "original_router"):  # FastAPI's included router (Gradio's gradio_api routes)
                walk(route.original_router.routes, prefix)
            elif hasattr(route, "path"):
                found.extend((method, prefix + route.path) for method in sorted(route.methods or {"GET"}))

    walk(app.routes)
    return sorted(set(found))


def dependency_bodies(config: dict) -> list[bytes]:
    """queue/join-style bodies for each of the page's real event handlers, with odd data and session hashes."""
    bodies = []
    for dependency in config["dependencies"]:
        for session_hash in ("", "odd-2", None):
            for data in ([], [None] * 5, "x", [{"a": [1]}] * 3):
                body = {"fn_index": dependency["id"], "trigger_id": None, "data": data, "event_data": None}
                if session_hash is not None:
                    body["session_hash"] = session_hash
                bodies.append(json.dumps(body).encode())
    return bodies


def test_every_mounted_route_answers_odd_requests_with_a_4xx_never_a_5xx(tmp_path):
    """Every route of the server, Gradio's included (enumerated from the app, so a route a new Gradio adds is
    covered), signed in and not: odd path parameters and odd bodies get an answer under 500."""
    import re

    import httpx
    from app_helpers import serving

    store = open_store(tmp_path / "labels.db")
    store.import_tasks([Task.from_dict({"id": t, "prompt": f"prompt {t}", "completions": ["a", "b", "c"]})
                        for t in TASK_IDS[:3]])
    add_annotator(store, "bob", PASSWORD)
    settings = AppSettings(overlap=OVERLAP, request_rate=0)  # no request budget: hundreds of requests a second
    routes = mounted_routes(create_app(store, settings))
    paths = {path for _, path in routes}
    for expected in ("/gradio_api/queue/join", "/gradio_api/run/{api_name}", "/gradio_api/api/{api_name}",
                     "/gradio_api/call/{api_name}", "/gradio_api/call/v2/{api_name}",
                     "/gradio_api/heartbeat/{session_hash}", "/gradio_api/queue/data", "/gradio_api/upload",
                     "/config", "/api/rankings"):
        assert expected in paths  # the enumeration reaches into Gradio's routers
    answered: dict[tuple[str, str], set[int]] = {}
    with serving(store, settings) as (host, port):
        for signed_in in (True, False):
            with httpx.Client(base_url=f"http://{host}:{port}", timeout=httpx.Timeout(10)) as client:
                names, events = ["on_load"], []
                if signed_in:
                    client.post("/api/login", json={"username": "bob", "password": PASSWORD}).raise_for_status()
                    config = client.get("/config").json()
                    names = [d["api_name"] for d in config["dependencies"] if d.get("api_name")]
                    events = dependency_bodies(config)
                for method, pattern in routes:
                    if pattern in ("/api/login", "/api/logout", "/logout"):
                        continue  # signing in and out: the generated requests above cover them
                    has_params = "{" in pattern
                    for segment in (ODD_SEGMENTS + names if has_params else [""]):
                        path = re.sub(r"\{[^}]+\}", segment, pattern)
                        if method in ("GET", "HEAD"):
                            bodies = [None]
                        elif pattern.endswith(("/queue/join", "/cancel", "/reset")):
                            bodies = ODD_BODIES + events
                        else:
                            bodies = ODD_BODIES if not has_params or segment in names else ODD_BODIES[:6]
                        for body in bodies:
                            headers = {} if body is None else {"content-type": "application/json"}
                            with client.stream(method, path, content=body, headers=headers) as response:
                                status = response.status_code
                                location = response.headers.get("location")
                                text = response.read()[:300] if status >= 500 else b""
                            assert status < 500, (signed_in, method, path, body and body[:200], status, text)
                            if not signed_in and not pattern.startswith(("/api/", "/login", "/auth/")):
                                assert status in (401, 404, 405) or (status, location) == (303, "login"), (
                                    method, path, status)  # nothing without a session (the page: to sign-in)
                            answered.setdefault((method, pattern), set()).add(status)
    assert set(answered) == {route for route in routes if route[1] not in ("/api/login", "/api/logout", "/logout")}
    store.close()
