"""The labeling server over real sockets (uvicorn in a thread, no browser): what a hostile client can try
that a test client cannot show, such as a body that never ends, or reading another annotator's Gradio stream."""

from __future__ import annotations

import json
import select
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest
from app_helpers import serving

from labeling.auth import add_annotator
from labeling.handlers import AppSettings
from labeling.store import open_store
from rlhf.records import Task

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("live") / "labels.db")
    store.import_tasks([Task.from_dict({"id": f"t{i}", "prompt": f"prompt {i}", "completions": ["a", "b", "c"]})
                        for i in range(4)])
    for name in ("alice", "bob"):
        add_annotator(store, name, PASSWORD)
    with serving(store, AppSettings(overlap=2)) as address:
        yield address
    store.close()


@contextmanager
def signed_in(address, name: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=10) as client:
        client.post("/api/login", json={"username": name, "password": PASSWORD}).raise_for_status()
        yield client


def read_stream(client: httpx.Client, path: str, until: str, seconds: float = 10) -> tuple[int, str]:
    """GET an event stream; (status, text received until `until` appears, the stream ends or time is up)."""
    text = ""
    deadline = time.monotonic() + seconds
    with client.stream("GET", path, timeout=httpx.Timeout(seconds, read=seconds)) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode()
        for line in response.iter_lines():
            text += line + "\n"
            if until in text or time.monotonic() > deadline:
                break
    return 200, text


def test_a_gradio_page_session_streams_only_to_its_own_annotator(server):
    with signed_in(server, "alice") as alice, signed_in(server, "bob") as bob:
        load = next(d["id"] for d in alice.get("/config").json()["dependencies"] if d["targets"][0][1] == "load")
        joined = alice.post("/gradio_api/queue/join", json={"data": [], "event_data": None, "fn_index": load,
                                                           "trigger_id": None, "session_hash": "alice-page"})
        assert joined.status_code == 200, joined.text
        # bob learned alice's session hash: he gets neither her stream (her name, history, ranks) nor her page
        status, text = read_stream(bob, "/gradio_api/queue/data?session_hash=alice-page", "process_completed", 5)
        assert status == 403 and "alice" not in text
        for method, path, body in (("POST", "/gradio_api/cancel", {"session_hash": "alice-page", "fn_index": load,
                                                                   "event_id": "x"}),
                                   ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": load,
                                                                       "session_hash": "alice-page"})):
            assert bob.request(method, path, json=body).status_code == 403
        status, _ = read_stream(bob, "/gradio_api/heartbeat/alice-page", "ALIVE", 5)
        assert status == 403  # (closing a heartbeat stream ends its page's pending events)
        # alice still gets her own output
        status, text = read_stream(alice, "/gradio_api/queue/data?session_hash=alice-page", "process_completed")
        assert status == 200 and "process_completed" in text and "signed in as <b>alice</b>" in text


def test_gradio_streams_need_a_session(server):
    with httpx.Client(base_url=f"http://{server[0]}:{server[1]}", timeout=10) as anonymous:
        assert read_stream(anonymous, "/gradio_api/heartbeat/any-page", "ALIVE", 5)[0] == 401
        assert read_stream(anonymous, "/gradio_api/queue/data?session_hash=any-page", "data", 5)[0] == 401


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one HTTP response; the body by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length and (chunk := sock.recv(4096)):
        body += chunk
    return head, body


def test_a_declared_huge_body_is_refused_before_it_is_sent(server):
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"POST /api/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\n\r\n")
        head, body = read_response(sock)  # answered without waiting for a byte of the body
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body) == {"error": "request body over 262144 bytes"}


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
    sent = 0
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"POST /api/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 32 * 2**20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += 65536
        except OSError:  # the server answered and closed the connection while we were sending
            pass
        head, _ = read_response(sock)
    assert head.startswith(b"HTTP/1.1 413")
    assert sent < 16 * 2**20  # what the socket buffers took before the answer came, not the whole body
