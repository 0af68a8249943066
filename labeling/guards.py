"""ASGI middleware that guards the whole `rlhf label` server, the mounted Gradio app included.

- `BodyLimit`: refuses a request whose body is over the limit: on its Content-Length before reading any of
  it, and a chunked body as soon as the bytes read pass the limit. An unauthenticated client cannot make
  the server hold more than the limit per request.
- `SameOrigin`: refuses a state-changing request (any method but GET, HEAD and OPTIONS; a WebSocket) that a
  browser says came from another origin (its Origin header, or Sec-Fetch-Site: cross-site), so another site
  cannot act with an annotator's cookie even where SameSite is not enforced.
- `SignInGate`: every route outside the server's own (sign-in page, JSON API) needs a signed-in session,
  Gradio's included (its queue, heartbeat, cancel, reset, startup events, config ...); a few routes nobody
  needs are closed, and so is a path no file or route can have (a control character, an over-long segment).
  Gradio identifies a page by a client-chosen `session_hash` and streams that page's
  event output (the annotator's name, history, ranks) to whoever asks for the hash. The gate binds each
  hash to the annotator who first used it and refuses it to anyone else.
- `RequestBudget` (used by `SignInGate`): each signed-in annotator may make a few requests a second beyond a
  burst (static files free), so one client flooding the server with valid requests (taking, skipping and
  reopening tasks in a loop) cannot slow everyone else's; past it, a 429 with Retry-After, before any handler.

Plain ASGI (no FastAPI), so it runs before any route, and answers with one-line JSON errors.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Container, Iterable
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser

from rlhf.errors import UserError
from rlhf.records import is_text

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

MAX_SESSION_HASH_LENGTH = 128
REFUSAL_PAUSE_SECONDS = 1.0
"""The longest a request over its annotator's budget waits for its 429."""
SIGNED_IN_STATE = "rlhf_annotator"
"""Key of the request's state (scope["state"]) where SignInGate leaves the annotator it found."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOO_LARGE = object()
_HASH_IN_PATH = re.compile(r"^/gradio_api/(?:heartbeat|stream)/([^/]+)")
_ERROR_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                  (b"x-content-type-options", b"nosniff")]


async def send_error(send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON error response {"error": message}."""
    body = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [*_ERROR_HEADERS, *headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def route_path(scope: Scope) -> str:
    """The request's path below the server's root path (`rlhf label --root-path`, behind a reverse proxy)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class SameOrigin:
    """Refuse (403) a state-changing request or a WebSocket whose Origin is not this server's own origin (scheme
    and Host as the request arrived: behind a proxy, uvicorn takes the scheme from X-Forwarded-Proto and the proxy
    must pass the Host on), or that has no Origin but Sec-Fetch-Site 'cross-site'. Clients that send neither
    (scripts) pass: they carry no one's cookie but their own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] not in SAFE_METHODS):
            origin = _header(scope, b"origin")
            host = (_header(scope, b"host") or [b""])[0].decode("latin-1").lower()
            scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
            if origin:
                allowed = origin[0].decode("latin-1").lower() == f"{scheme}://{host}"
            else:
                allowed = (_header(scope, b"sec-fetch-site") or [b""])[0].lower() != b"cross-site"
            if not allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await send_error(send, 403, "request from another site refused")
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, reading at most `max_bytes` (plus one chunk) of them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared:
            if not all(value.isdigit() for value in declared):
                await send_error(send, 400, "invalid Content-Length header")
                return
            if max(int(value) for value in declared) > self.max_bytes:
                await send_error(send, 413, too_large, [(b"connection", b"close")])
                return
        received = 0
        tripped = started = False

        async def limited_receive() -> dict:
            nonlocal received, tripped
            if tripped:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # The app sees a client that went away; it stops reading, and we answer for it.
                    tripped = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if tripped and not started:
                return  # our 413 replaces whatever the app answers to the "disconnect"
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:
            if not tripped:
                raise
        if tripped and not started:
            await send_error(send, 413, too_large, [(b"connection", b"close")])


class Recent:
    """A mapping that keeps its `max_entries` most recently used keys (thread-safe)."""

    def __init__(self, max_entries: int = 20_000):
        self._items: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


class SessionHashes:
    """Which annotator each Gradio session hash belongs to (the first one to use it); at most `max_entries`
    hashes, the least recently used forgotten first (only signed-in annotators can add entries)."""

    def __init__(self, max_entries: int = 20_000):
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def claim(self, session_hash: str, annotator: str) -> bool:
        """True if the hash is this annotator's (binding it to them if it is new), False if it is someone else's."""
        with self._lock:
            owner = self._owners.get(session_hash)
            if owner is None:
                self._owners[session_hash] = owner = annotator
                while len(self._owners) > self._max:
                    self._owners.popitem(last=False)
            else:
                self._owners.move_to_end(session_hash)
            return owner == annotator


class RequestBudget:
    """A token bucket per key (a signed-in annotator): `rate` requests a second, and up to `burst` at once after
    a pause; at most `max_entries` keys, the least recently used forgotten first (a forgotten key starts full).
    Kept per server process: each of several app servers on one database grants its own budget."""

    def __init__(self, rate: float, burst: int, *, max_entries: int = 20_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("a request budget needs a rate above 0 and a burst of at least 1")
        self.rate, self.burst, self._max, self._clock = rate, burst, max_entries, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def spend(self, key: str, *, take: bool = True) -> float:
        """0.0 if `key` may make a request now (one token taken, unless `take` is False: only asking, which keeps
        nothing about a key it does not know), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            if not take and key not in self._buckets:
                return 0.0
            tokens, when = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if wait == 0.0 and take else tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return wait


class SignInGate:
    """Every request outside `open_prefixes` needs a signed-in session (else 401; `closed_paths`, and the paths
    under `closed_prefixes`, are 404 for
    everyone), and a Gradio session hash in the request (query, path or JSON body) must be the annotator's.
    With a `budget`, every request of a signed-in annotator (open prefixes included) but a GET or HEAD under
    `free_prefixes` (static files: a page load fetches dozens) spends from it, and is a 429 when it is spent."""

    def __init__(self, app, *, annotator_of_token: Callable[[str | None], str | None], cookie_name: str,
                 open_prefixes: tuple[str, ...], closed_paths: frozenset[str], max_body_bytes: int,
                 closed_prefixes: tuple[str, ...] = (), event_ids: Container[int] | None = None,
                 upload_paths: frozenset[str] = frozenset({"/gradio_api/upload"}),
                 session_hashes: SessionHashes | None = None, budget: RequestBudget | None = None,
                 free_prefixes: tuple[str, ...] = ()):
        """`upload_paths` take other bodies than JSON (Gradio's file uploads, multipart). `event_ids`: the page's
        event handlers (Gradio's fn_index values, filled in once the page is built); a queue/join naming another
        is refused (Gradio's queue looks it up unchecked: a 500)."""
        self.app = app
        self.upload_paths = upload_paths
        self.annotator_of_token, self.cookie_name = annotator_of_token, cookie_name
        self.open_prefixes, self.closed_paths, self.closed_prefixes = open_prefixes, closed_paths, closed_prefixes
        self.event_ids = event_ids
        self.max_body_bytes = max_body_bytes
        self.session_hashes = session_hashes or SessionHashes()
        self.budget, self.free_prefixes = budget, free_prefixes
        self._token_owners = Recent()

    def _token(self, scope: Scope) -> str | None:
        cookies = _header(scope, b"cookie")
        return cookie_parser(b"; ".join(cookies).decode("latin-1")).get(self.cookie_name) if cookies else None

    async def _annotator(self, scope: Scope, token: str | None) -> str | None:
        """The signed-in annotator (looked up in the thread pool: sessions are in the database), left in the
        request's state for the routes."""
        annotator = await run_in_threadpool(self.annotator_of_token, token) if token else None
        scope.setdefault("state", {})[SIGNED_IN_STATE] = annotator
        return annotator

    def _charged(self, scope: Scope, path: str) -> bool:
        return (self.budget is not None and scope["type"] == "http"
                and not (scope["method"] in ("GET", "HEAD") and path.startswith(self.free_prefixes)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        own = path.startswith(self.open_prefixes)
        token = self._token(scope)
        charged = self._charged(scope, path) and token is not None
        if own and not charged:
            await self.app(scope, receive, send)  # our routes check the session themselves
            return
        looked_up = False
        try:
            if charged:
                # Whose budget: remembered per token, so a request refused for a spent budget costs no database
                # lookup. (Only the budget trusts this memory; a request let through is looked up below.)
                owner = self._token_owners.get(token)
                if owner is None:
                    owner, looked_up = await self._annotator(scope, token), True
                    if owner is not None:
                        self._token_owners.put(token, owner)
                wait = self.budget.spend(owner) if owner is not None else 0.0
                if wait:
                    # Answered after a pause (a sleeping task costs the server nothing), so a client that sends
                    # again at once, ignoring Retry-After, is slowed to about one refusal a second per connection.
                    await asyncio.sleep(min(wait, REFUSAL_PAUSE_SECONDS))
                    await send_error(send, 429, f"too many requests: at most {self.budget.rate:g} a second; "
                                                f"try again in {math.ceil(wait)} s",
                                     [(b"retry-after", str(math.ceil(wait)).encode())])
                    return
            annotator = scope["state"][SIGNED_IN_STATE] if looked_up else await self._annotator(scope, token)
            if charged and annotator is None:  # an ended session (signed out, expired, account disabled): whoever
                self._token_owners.forget(token)  # still holds its token spends no one's budget any more
        except UserError as exc:  # the sessions' database cannot be read (it restarts): try again
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
            else:
                await send_error(send, 503, str(exc))
            return
        if own:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # Gradio serves none to this UI; refuse any without a session
            if annotator is None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if path in self.closed_paths or path.startswith(self.closed_prefixes) or not _plain_path(path):
            await send_error(send, 404, "not found")
            return
        if annotator is None:
            await send_error(send, 401, "sign in first")
            return
        hashes = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True).get(
            "session_hash", [])  # an empty one too: refused below (Gradio's stream fails on it)
        match = _HASH_IN_PATH.match(path)
        if match and (scope["method"] == "GET" or "/heartbeat/" in path):  # POST /stream/{id} names an event
            hashes.append(match[1])
        content_type = (_header(scope, b"content-type") or [b""])[-1].split(b";")[0].strip().lower()
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and path not in self.upload_paths:
            # Gradio's writes are JSON. Checked here, whole: Gradio answers some malformed bodies with a 500
            # (a RecursionError, or a validation error message it cannot encode).
            body = await self._read_body(receive)
            if body is None:
                return  # the client went away (or BodyLimit answers for a body over the limit)
            if body is _TOO_LARGE:
                await send_error(send, 413, f"request body over {self.max_body_bytes} bytes")
                return
            if body and content_type != b"application/json":
                await send_error(send, 415, "send the request body as application/json")
                return
            try:
                data = json.loads(body) if body else None
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                await send_error(send, 400, "the request body is not valid JSON")
                return
            if _has_lone_surrogate(data):
                await send_error(send, 400, "the request body holds text that is not valid Unicode")
                return
            if isinstance(data, dict) and "session_hash" in data:
                if not isinstance(data["session_hash"], str):
                    await send_error(send, 400, "session_hash must be a string")
                    return
                hashes.append(data["session_hash"])
            elif path == "/gradio_api/queue/join":
                await send_error(send, 400, "queue/join needs a session_hash")
                return
            if path == "/gradio_api/queue/join" and self.event_ids is not None and not (isinstance(data, dict)
                    and type(data.get("fn_index")) is int and data["fn_index"] in self.event_ids):
                await send_error(send, 404, "no such event on this page; reload the page")
                return
            receive = _replay(body, receive)
        for session_hash in hashes:
            if not 0 < len(session_hash) <= MAX_SESSION_HASH_LENGTH:  # an empty one fails Gradio's queue (a 500)
                await send_error(send, 400, f"a session hash must be 1 to {MAX_SESSION_HASH_LENGTH} characters")
                return
            if not self.session_hashes.claim(session_hash, annotator):
                await send_error(send, 403, "this page session belongs to another sign-in; reload the page")
                return
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive):
        """The whole body; None if the client went away; _TOO_LARGE past max_body_bytes (reading stops there)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return _TOO_LARGE
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


MAX_PATH_SEGMENT_BYTES = 255
"""The longest path segment Gradio's routes are given (a file name's limit on common file systems)."""


def _plain_path(path: str) -> bool:
    """Whether a (percent-decoded) path can name something of Gradio's: no control character (a NUL fails its
    file and proxy routes with a 500) and no segment over MAX_PATH_SEGMENT_BYTES (a longer file name fails the
    operating system's file calls with a 500)."""
    return (not any(ord(char) < 32 or ord(char) == 127 for char in path)
            and all(len(part.encode("utf-8", "surrogatepass")) <= MAX_PATH_SEGMENT_BYTES for part in path.split("/")))


def _has_lone_surrogate(data) -> bool:
    """Whether parsed JSON holds a string that is not valid Unicode ("\\ud800" escapes decode to lone surrogates)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and not is_text(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then whatever the client sends next (disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
