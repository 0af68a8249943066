"""Serving the labeling app (labeling/app.py): the listening socket and the uvicorn server."""

from __future__ import annotations

import errno
import socket

from labeling.handlers import AppSettings
from labeling.store import SQLLabelStore
from rlhf.errors import UserError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) for uvicorn; a port in use is a one-line UserError (checked here,
    before anything else starts, and with no window for another program to take the port meanwhile)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot use host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and without it
    # every response waits 40 ms for the client's delayed ACK (headers and body are separate writes).
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # reuse TIME_WAIT ports, never a listening one
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; stop the other server or pick --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)  # connections made before uvicorn starts wait in the backlog instead of being refused
    return sock


def make_server(store: SQLLabelStore, settings: AppSettings, *, root_path: str = ""):
    """A uvicorn server for the app (`server.run(sockets=[bind_socket(...)])`; set `should_exit` to stop).
    `root_path` is the path a reverse proxy serves the app under (e.g. '/label'; the proxy strips it)."""
    import uvicorn

    from labeling.app import create_app

    # Keep idle connections 75 s (uvicorn's default is 5): an annotator reads for tens of seconds between
    # requests, and a reused connection saves a TCP handshake per submit. uvicorn takes the client's address
    # and scheme from X-Forwarded-For / X-Forwarded-Proto sent by a proxy on 127.0.0.1 (and from nobody else).
    return uvicorn.Server(uvicorn.Config(create_app(store, settings), log_level="warning", access_log=False,
                                         timeout_keep_alive=75, timeout_graceful_shutdown=5, root_path=root_path,
                                         proxy_headers=True, forwarded_allow_ips="127.0.0.1"))

