"""Helpers for the labeling app's tests: calling the ASGI app the way a (hostile) client would."""

from __future__ import annotations

import asyncio


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
