"""`rlhf label`: the annotators' web app: a Gradio UI at / and a JSON API under /api, on one server.

The UI (labeling/gradio_ui.py) is a Gradio Blocks page around a custom ranker widget (keyboard, click,
drag-and-drop). The JSON API serves integrations, the load benchmark and the crash test; each endpoint is
a thin wrapper over a plain function in `labeling.handlers`.

One login for both: the sign-in page (static/login.html) posts to /api/login, which sets an HttpOnly,
SameSite=Strict session cookie; the API reads it, and Gradio reads it through `auth_dependency`, so every
Gradio event handler gets the annotator as `request.username` from the server's session table. A request
to / without a session is sent to the sign-in page; every other Gradio route answers 401 without one.

Security: every API write must be a JSON request (a cross-site form cannot send one without a CORS
preflight, which we never grant) and the cookie is SameSite=Strict, so another site cannot act as a
signed-in annotator. The sign-in page and the API get a strict Content-Security-Policy; Gradio pages need
inline and evaluated scripts, so theirs still forbids every foreign origin, plugins and framing, and model
output is kept inert by the widget itself (textContent only). ASGI middleware (labeling/guards.py) in front
of every route, Gradio's included, refuses bodies over MAX_BODY_BYTES before reading them, requires a session
for every Gradio route and keeps each Gradio page session to the annotator who opened it. Failed sign-ins
are throttled per account and per client address (`handlers.LoginThrottle`).
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
from labeling.guards import BodyLimit, SignInGate
from labeling.handlers import AppSettings, LoginThrottle, RequestError, Sessions
from labeling.store import (Conflict, InvalidAnnotator, InvalidRanking, SQLiteLabelStore, StorageUnavailable,
                            StoreError, UnknownAnnotator, UnknownTask)
from rlhf.errors import UserError

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "rlhf_label_session"
MAX_BODY_BYTES = 256 * 1024

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
STRICT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
"""The sign-in page and the API: no inline script, no foreign origin, no plugin, no framing."""
GRADIO_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
              "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
              "connect-src 'self'; object-src 'none'; form-action 'self'; base-uri 'self'; frame-ancestors 'none'")
"""The Gradio UI: Gradio's page needs inline and evaluated scripts (js_on_load), but nothing may come from
or go to another origin."""
OWN_PATHS = ("/api/", "/login", "/logout", "/auth/")
"""Paths this module serves; everything else is the mounted Gradio app."""
CLOSED_PATHS = frozenset({"/openapi.json", "/docs", "/redoc", "/gradio_api/openapi.json"})
"""Gradio's API descriptions: the UI does not use them, and they would describe the server to anyone."""


def _status_of(exc: UserError) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, UnknownTask):
        return 404
    if isinstance(exc, UnknownAnnotator):  # the account was removed while signed in
        return 401
    if isinstance(exc, StorageUnavailable):  # nothing was stored; the client may try again
        return 503
    if isinstance(exc, Conflict):  # a reused request id, a task not handed to this annotator
        return 409
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


def create_app(store: SQLiteLabelStore, settings: AppSettings, sessions: "Sessions | None" = None, *,
               ui: bool = True, throttle: "LoginThrottle | None" = None):
    """The FastAPI app: the Gradio UI at / (when `ui`), the sign-in page at /login, the JSON API under /api.
    `throttle` limits failed sign-ins (a default LoginThrottle when None)."""
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from starlette.concurrency import run_in_threadpool

    sessions = sessions or Sessions()
    throttle = throttle or LoginThrottle()
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.settings, app.state.sessions = store, settings, sessions
    # Middleware, outermost first: security_headers (below), BodyLimit, CORS, SignInGate, then the routes.
    app.add_middleware(SignInGate, annotator_of_token=sessions.annotator, cookie_name=SESSION_COOKIE,
                       open_prefixes=OWN_PATHS, closed_paths=CLOSED_PATHS, max_body_bytes=MAX_BODY_BYTES)
    # No origin may read or call us across origins. (Without a CORS policy of ours, Gradio adds its own,
    # which lets pages served from localhost call the UI's events with the annotator's cookie.)
    app.add_middleware(CORSMiddleware, allow_origins=[])
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        path = request.url.path
        own = path.startswith(OWN_PATHS)
        if path == "/" and request.method in ("GET", "HEAD") and annotator_of(request) is None:
            response = RedirectResponse("login", status_code=303)  # the UI needs a session: sign in first
        else:
            response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers["Content-Security-Policy"] = STRICT_CSP if own else GRADIO_CSP
        if own or path == "/":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        # A message may quote client text: keep it encodable (a lone surrogate would fail the response).
        message = str(exc).encode("utf-8", "backslashreplace").decode("utf-8")
        retry_after = getattr(exc, "retry_after", None)
        return JSONResponse({"error": message}, status_code=_status_of(exc),
                            headers={"Retry-After": str(retry_after)} if retry_after else None)

    def annotator_of(request: Request) -> str | None:
        return sessions.annotator(request.cookies.get(SESSION_COOKIE))

    async def body_of(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError("send the request body as application/json")
        body = bytearray()
        async for chunk in request.stream():  # BodyLimit already refuses more; never hold more here either
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise RequestError("the request body is not valid JSON") from None

    async def call(handler: Callable, *args) -> JSONResponse:
        # Store calls block (SQLite, scrypt): run them in the thread pool, not on the event loop.
        return JSONResponse(await run_in_threadpool(handler, store, *args))

    @app.get("/login", include_in_schema=False)
    async def login_page():
        return FileResponse(STATIC_DIR / "login.html", media_type="text/html; charset=utf-8")

    @app.get("/auth/login.js", include_in_schema=False)
    async def login_script():
        return FileResponse(STATIC_DIR / "login.js", media_type="text/javascript; charset=utf-8")

    @app.get("/auth/login.css", include_in_schema=False)
    async def login_style():
        return FileResponse(STATIC_DIR / "login.css", media_type="text/css; charset=utf-8")

    @app.get("/logout", include_in_schema=False)
    async def logout_page(request: Request):
        # A plain link from the UI. SameSite=Strict: another site's link arrives without the cookie.
        sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("login?signed_out=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # Gradio's own form sign-in and sign-out routes would answer these (SignInGate lets our paths through).
    @app.api_route("/login", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/login/", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/logout", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/logout/", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def not_here():
        return JSONResponse({"error": "sign in with POST api/login, sign out with POST api/logout"}, status_code=405)

    @app.post("/api/login")
    async def api_login(request: Request):
        payload = await body_of(request)
        address = request.client.host if request.client else ""
        token, info = await run_in_threadpool(lambda: handlers.login(store, sessions, settings, payload,
                                                                     throttle=throttle, address=address))
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

    if ui:
        import gradio as gr

        from labeling import gradio_ui

        # Mounted last: the routes above take precedence over Gradio's catch-all mount at /.
        # No uploads in this UI: Gradio's upload route (signed-in only) takes at most 1 KB. No run history:
        # Gradio would keep every event's inputs and outputs in the browser's storage and offer to upload them.
        gr.mount_gradio_app(app, gradio_ui.build_ui(store, settings), path="/", auth_dependency=annotator_of,
                            ssr_mode=False, theme=gradio_ui.theme(), css=gradio_ui.css(), footer_links=[],
                            show_error=False, max_file_size=1024, run_history=False)
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
                       description="Serve the annotators' Gradio app at /: each signed-in annotator ranks the "
                                   "completions of the tasks in their queue (keyboard, click or drag-and-drop), "
                                   "ties, skips, and edits earlier answers. The same server answers a JSON API "
                                   "under /api (same login).")
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
