"""Helpers for the labeling app's tests: serving the app on a real socket, and calling the ASGI app the way a
(hostile) client would."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from labeling.serve import bind_socket, make_server


@contextmanager
def serving(store, settings) -> Iterator[tuple[str, int]]:
    """The app (UI included) served by uvicorn in a thread on a free port of 127.0.0.1; yields (host, port)."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(store, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def asgi_request(app, path: str, headers: dict[str, str], chunk: bytes, max_chunks: int) -> tuple[int, int]:
    """POST `max_chunks` chunks of `chunk` to the ASGI app as a client would; returns (status, body bytes
    the app read). The client never stops on its own before max_chunks (like a hostile one)."""
    read = sent_chunks = 0
    status = []

    async def receive():
        nonlocal read, sent_chunks
        if sent_chunks >= max_chunks:
            await asyncio.sleep(3600)  # a slow client: the server must not wait for the rest
        sent_chunks += 1
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent_chunks < max_chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860)}

    async def run():
        await asyncio.wait_for(app(scope, receive, send), timeout=20)

    asyncio.run(run())
    return status[0], read
