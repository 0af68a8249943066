"""`rlhf label`: the annotators' web app, a JSON API over the label store plus one static page.

Why not Gradio components: ranking by keyboard, click and drag-and-drop needs custom JavaScript in any
case, and Gradio pages need inline scripts, which rules out a strict Content-Security-Policy, our
second line of defence against hostile model output. So the page (labeling/static) is a small
dependency-free script that talks to the JSON API below and builds the DOM with textContent only;
the same API serves integrations and the load benchmark. Each endpoint is a thin wrapper over a
plain function in `labeling.handlers`.

Security: the session cookie is HttpOnly and SameSite=Strict, and every write must be a JSON
request (a cross-site form cannot send one without a CORS preflight, which we never grant), so
another site cannot submit as a signed-in annotator.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at
# definition time, and they are imported inside create_app to keep `rlhf --help` fast.
import errno
import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from labeling import handlers
from labeling.handlers import AppSettings, RequestError, Sessions
from labeling.store import (InvalidAnnotator, InvalidRanking, SQLiteLabelStore, StorageUnavailable, StoreError,
                            UnknownAnnotator, UnknownTask)
from rlhf.errors import UserError

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "rlhf_label_session"
MAX_BODY_BYTES = 256 * 1024

SECURITY_HEADERS = {
    # No inline script, no foreign origin, no plugin, no framing: even text that slipped into the
    # page as markup could not run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _status_of(exc: UserError) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, UnknownTask):
        return 404
    if isinstance(exc, UnknownAnnotator):  # the account was removed while signed in
        return 401
    if isinstance(exc, StorageUnavailable):  # nothing was stored; the client may try again
        return 503
    if isinstance(exc, (InvalidRanking, InvalidAnnotator, StoreError)):
        return 422
    return 400


def render_guidelines(path: str | None) -> str:
    """The owner's Markdown guidelines as HTML (raw HTML in the file is escaped, not passed through)."""
    if not path:
        return ""
    from markdown_it import MarkdownIt

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--guidelines {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--guidelines {path}: cannot read ({exc})") from None
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def create_app(store: SQLiteLabelStore, settings: AppSettings, sessions: "Sessions | None" = None):
    """The FastAPI app: the page at /, its assets under /static, the JSON API under /api."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    sessions = sessions or Sessions()
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.settings, app.state.sessions = store, settings, sessions

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

    def annotator_of(request: Request) -> str | None:
        return sessions.annotator(request.cookies.get(SESSION_COOKIE))

    async def body_of(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError("send the request body as application/json")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None

    async def call(handler: Callable, *args) -> JSONResponse:
        # Store calls block (SQLite, scrypt): run them in the thread pool, not on the event loop.
        return JSONResponse(await run_in_threadpool(handler, store, *args))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/api/login")
    async def api_login(request: Request):
        payload = await body_of(request)
        token, info = await run_in_threadpool(handlers.login, store, sessions, settings, payload)
        response = JSONResponse(info)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path="/",
                            max_age=handlers.SESSION_SECONDS, secure=request.url.scheme == "https")
        return response

    @app.post("/api/logout")
    async def api_logout(request: Request):
        await body_of(request)  # JSON only, like every write
        sessions.end(request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/api/session")
    async def api_session(request: Request):
        return await call(handlers.session_info, annotator_of(request), settings)

    @app.get("/api/next")
    async def api_next(request: Request):
        return await call(handlers.next_task, annotator_of(request), settings)

    @app.get("/api/task")
    async def api_task(request: Request, id: str = ""):
        return await call(handlers.open_task, annotator_of(request), settings, id)

    @app.post("/api/rankings")
    async def api_rankings(request: Request):
        annotator = annotator_of(request)
        return await call(handlers.submit_ranking, annotator, settings, await body_of(request))

    @app.post("/api/skip")
    async def api_skip(request: Request):
        annotator = annotator_of(request)
        return await call(handlers.skip_task, annotator, settings, await body_of(request))

    @app.get("/api/history")
    async def api_history(request: Request):
        return await call(handlers.history, annotator_of(request), settings)

    @app.get("/api/stats")
    async def api_stats(request: Request):
        return await call(handlers.stats, annotator_of(request), settings)

    @app.get("/api/health", include_in_schema=False)
    async def api_health():
        return Response("ok", media_type="text/plain")

    return app


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


def open_label_store(db: str) -> SQLiteLabelStore:
    """The store to serve: it must exist and hold tasks (an empty queue would be a confusing app)."""
    from labeling.store import open_store

    store = open_store(db, create=False)
    if store.count_tasks() == 0:
        store.close()
        raise UserError(f"{db} holds no tasks; import some first with `rlhf import --db {db} tasks.jsonl`")
    return store


def make_server(store: SQLiteLabelStore, settings: AppSettings):
    """A uvicorn server for the app (`server.run(sockets=[bind_socket(...)])`; set `should_exit` to stop)."""
    import uvicorn

    # Keep idle connections 75 s (uvicorn's default is 5): an annotator reads for tens of seconds between
    # requests, and a reused connection saves a TCP handshake per submit.
    return uvicorn.Server(uvicorn.Config(create_app(store, settings), log_level="warning", access_log=False,
                                         timeout_keep_alive=75, timeout_graceful_shutdown=5))


def serve(store: SQLiteLabelStore, settings: AppSettings, host: str, port: int, *, on_ready: Callable | None = None):
    """Run the app until Ctrl+C (blocking). `on_ready(port)` is called once the socket is bound."""
    sock = bind_socket(host, port)
    try:
        server = make_server(store, settings)
        if on_ready is not None:
            on_ready(sock.getsockname()[1])
        server.run(sockets=[sock])
    finally:
        sock.close()


def add_label_command(sub) -> None:
    p = sub.add_parser("label", help="serve the ranking app to annotators (login required)",
                       description="Serve the annotators' web app: each signed-in annotator ranks the completions "
                                   "of the tasks in their queue (keyboard, click or drag-and-drop), skips, and "
                                   "edits earlier answers. Also serves a JSON API under /api.")
    p.add_argument("--db", required=True, help="label database (SQLite) made by `rlhf import`")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for your network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860; 0 picks a free one)")
    p.add_argument("--overlap", type=int, default=2,
                   help="annotators who should rank each task before it leaves the queues (default 2)")
    p.add_argument("--guidelines", default=None, help="Markdown file shown to annotators in the Guidelines panel")
    p.add_argument("--admin", action="append", default=[], metavar="NAME",
                   help="annotator allowed to see the statistics view (repeatable)")
    p.set_defaults(func=run_label)


def run_label(args) -> None:
    if args.overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {args.overlap}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    settings = AppSettings(overlap=args.overlap, guidelines_html=render_guidelines(args.guidelines),
                           admins=frozenset(args.admin))
    store = open_label_store(args.db)
    try:
        unknown = sorted(name for name in settings.admins if not store.has_annotator(name))
        if unknown:
            raise UserError(f"--admin names unknown annotators {unknown}; add them first")

        def ready(port: int) -> None:
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"labeling app: http://{shown}:{port}/  ({store.count_tasks()} tasks, overlap {args.overlap}; "
                  f"Ctrl+C stops)", flush=True)
            if not any(True for _ in store.list_annotators()):
                print("no annotators yet: add one before anyone can sign in", file=sys.stderr, flush=True)

        serve(store, settings, args.host, args.port, on_ready=ready)
    finally:
        store.close()
