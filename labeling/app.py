"""`rlhf label`: the annotators' web app: a Gradio UI at / and a JSON API under /api, on one server.

The UI (labeling/gradio_ui.py) is a Gradio Blocks page around a custom ranker widget (keyboard, click,
drag-and-drop). The JSON API (docs/api.md, "The JSON API") serves scripted clients and other front ends; each
endpoint is a thin wrapper over a plain function in `labeling.handlers`. Accounts, sessions and the sign-in
check are labeling/auth.py; binding the port and running uvicorn, labeling/serve.py.

One login for both: the sign-in page (static/login.html) posts to /api/login, which sets an HttpOnly,
SameSite=Strict session cookie (Secure over https); the API reads it, and Gradio reads it through
`auth_dependency`, so every Gradio event handler gets the annotator as `request.username` from the session
table in the store (shared by every server on the database). A request to / without a session is sent to the
sign-in page; every other Gradio route answers 401 without one.

Security: every API write must be a JSON request (a cross-site form cannot send one without a CORS
preflight, which we never grant), a write whose Origin is another site is refused (`SameOrigin`), and the
cookie is SameSite=Strict, so another site cannot act as a signed-in annotator. The sign-in page and the API
get a strict Content-Security-Policy; Gradio pages need inline and evaluated scripts, so theirs still forbids
every foreign origin, plugins and framing, and model output is kept inert by the widget itself (textContent
only). ASGI middleware (labeling/guards.py) in front of every route, Gradio's included, refuses bodies over
MAX_BODY_BYTES before reading them, requires a session for every Gradio route and keeps each Gradio page
session to the annotator who opened it, and gives each signed-in annotator a request budget (`--rate-limit`), so
one client looping over valid requests cannot slow the others. Failed sign-ins are throttled per account and
per client address (`labeling.auth.LoginThrottle`).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at
# definition time, and they are imported inside create_app to keep `rlhf --help` fast.
import json
import math
from pathlib import Path
from typing import Any, Callable

from labeling import handlers
from labeling.auth import SESSION_SECONDS, SIGN_IN_BURST, SIGN_IN_RATE, LoginThrottle, Sessions, TooManySignIns
from labeling.guards import SIGNED_IN_STATE, BodyLimit, RequestBudget, SameOrigin, SignInGate, route_path
from labeling.handlers import REQUEST_BURST, AppSettings, RequestError
from labeling.store import Conflict, SQLLabelStore, StorageUnavailable, StoreError, UnknownAnnotator, UnknownTask
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
CLOSED_PREFIXES = ("/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/", "/gradio_api/vibe-",
                   "/gradio_api/undo-vibe-", "/gradio_api/dev/", "/gradio_api/proxy=")
"""Gradio's routes for direct API calls (the UI's page goes through its queue) and its editing, reloading and
proxying routes: the UI uses none of them, and the direct calls answered odd bodies with a 500."""
STATIC_PREFIXES = ("/assets/", "/static/", "/auth/", "/theme.css")
"""Static files (Gradio's scripts, styles and fonts, the sign-in page's): a page load fetches about 70, so they
spend no request budget."""
EVENT_STREAM = "/gradio_api/queue/data"
"""The stream that carries the answers of a page's events: each event (a queue/join) spends from the budget, and
its stream, which follows at once, does not. A stream refused after its event was let in loses the answer (the
ranking stored, the page never told), and Gradio then reloads the page."""
SIGN_IN_PAGES = ("/login", "/logout")
"""The sign-in page and the sign-out link spend no request budget: an annotator over it can still sign out, or
open the page to sign in again."""
_UNKNOWN = object()


class RepeatedKey(ValueError):
    """A JSON object of a request body names the same key twice (json.loads would keep the last value)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object_pairs_hook: the object as a dict, or RepeatedKey if a key repeats (a ranking that
    gives one completion two ranks must be refused, not read as whichever came last)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        shown = key.encode("utf-8", "backslashreplace").decode("utf-8")[:100]
        raise RepeatedKey(f"the request body repeats the key {shown!r} in one object")
    return result


def _status_of(exc: UserError) -> int:
    if hasattr(exc, "status"):  # the handlers' and the sign-in's refusals carry theirs
        return exc.status
    if isinstance(exc, UnknownTask):
        return 404
    if isinstance(exc, UnknownAnnotator):  # the account was removed while signed in
        return 401
    if isinstance(exc, StorageUnavailable):  # nothing was stored; the client may try again
        return 503
    if isinstance(exc, Conflict):  # a reused request id, a task not handed to this annotator
        return 409
    if isinstance(exc, StoreError):  # an invalid ranking, seconds, request id or skip reason
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


def create_app(store: SQLLabelStore, settings: AppSettings, sessions: "Sessions | None" = None, *,
               ui: bool = True, throttle: "LoginThrottle | None" = None):
    """The FastAPI app: the Gradio UI at / (when `ui`), the sign-in page at /login, the JSON API under /api.
    `sessions` default to the store's (shared by every server on the database); `throttle` limits failed
    sign-ins (a default LoginThrottle when None)."""
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from starlette.concurrency import run_in_threadpool

    sessions = sessions or Sessions(store)
    throttle = throttle or LoginThrottle(store)
    event_ids: set[int] = set()  # the page's event handlers, once it is built below
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.settings, app.state.sessions = store, settings, sessions
    # Middleware, outermost first: security_headers (below), BodyLimit, SameOrigin, CORS, SignInGate, the routes.
    app.add_middleware(SignInGate, annotator_of_token=sessions.annotator, cookie_name=SESSION_COOKIE,
                       open_prefixes=OWN_PATHS, closed_paths=CLOSED_PATHS, closed_prefixes=CLOSED_PREFIXES,
                       max_body_bytes=MAX_BODY_BYTES, event_ids=event_ids,
                       free_prefixes=(*STATIC_PREFIXES, EVENT_STREAM, *SIGN_IN_PAGES),
                       budget=RequestBudget(settings.request_rate, REQUEST_BURST) if settings.request_rate else None)
    # No origin may read or call us across origins. (Without a CORS policy of ours, Gradio adds its own,
    # which lets pages served from localhost call the UI's events with the annotator's cookie.)
    app.add_middleware(CORSMiddleware, allow_origins=[])
    app.add_middleware(SameOrigin)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    def token_of(request: Request) -> str | None:
        return request.cookies.get(SESSION_COOKIE)

    async def annotator_of(request: Request) -> str | None:
        """The signed-in annotator (SignInGate already looked Gradio's requests up), read in the thread pool."""
        known = request.scope.get("state", {}).get(SIGNED_IN_STATE, _UNKNOWN)
        if known is not _UNKNOWN:
            return known
        return await run_in_threadpool(sessions.annotator, token_of(request))

    def cookie_path(request: Request) -> str:
        return (request.scope.get("root_path") or "").rstrip("/") + "/"

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        path = route_path(request.scope)
        own = path.startswith(OWN_PATHS)
        try:
            signed_out = path == "/" and request.method in ("GET", "HEAD") and await annotator_of(request) is None
        except UserError as exc:  # the sessions' database cannot be read (it restarts): try again
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Cache-Control": "no-store"})
        if signed_out:
            response = RedirectResponse("login", status_code=303)  # the UI needs a session: sign in first
        else:
            response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.scheme == "https":
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
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
            return json.loads(body, object_pairs_hook=_unique_keys)
        except RepeatedKey as exc:
            raise RequestError(str(exc)) from None
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise RequestError("the request body is not valid JSON") from None

    async def call(request: Request, handler: Callable, *args) -> JSONResponse:
        # Store calls block (the database, scrypt): the session lookup and the handler run in the thread pool,
        # not on the event loop.
        annotator = request.scope.get("state", {}).get(SIGNED_IN_STATE, _UNKNOWN)  # SignInGate's, if it looked
        token = token_of(request)
        return JSONResponse(await run_in_threadpool(lambda: handler(
            store, sessions.annotator(token) if annotator is _UNKNOWN else annotator, settings, *args)))

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
        await run_in_threadpool(sessions.end, token_of(request))
        response = RedirectResponse("login?signed_out=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=cookie_path(request))
        return response

    # Gradio's own form sign-in and sign-out routes would answer these (SignInGate lets our paths through).
    @app.api_route("/login", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/login/", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/logout", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/logout/", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def not_here():
        return JSONResponse({"error": "sign in with POST api/login, sign out with POST api/logout"}, status_code=405)

    sign_ins = RequestBudget(SIGN_IN_RATE, SIGN_IN_BURST)  # successful sign-ins per account (failed: `throttle`)

    @app.post("/api/login")
    async def api_login(request: Request):
        payload = await body_of(request)
        name = payload.get("username") if isinstance(payload, dict) else None
        if isinstance(name, str) and (wait := sign_ins.spend(name, take=False)):
            raise TooManySignIns(math.ceil(wait))
        address = request.client.host if request.client else ""
        token, info = await run_in_threadpool(lambda: handlers.login(store, sessions, settings, payload,
                                                                     throttle=throttle, address=address))
        sign_ins.spend(info["annotator"])
        response = JSONResponse(info)
        # HttpOnly: no script reads it; SameSite=Strict: no other site's request carries it; Secure over https
        # (behind a TLS proxy: uvicorn takes the scheme from X-Forwarded-Proto).
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path=cookie_path(request),
                            max_age=SESSION_SECONDS, secure=request.url.scheme == "https")
        return response

    @app.post("/api/logout")
    async def api_logout(request: Request):
        await body_of(request)  # JSON only, like every write
        await run_in_threadpool(sessions.end, token_of(request))
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path=cookie_path(request))
        return response

    @app.get("/api/session")
    async def api_session(request: Request):
        return await call(request, handlers.session_info)

    @app.get("/api/next")
    async def api_next(request: Request):
        return await call(request, handlers.next_task)

    @app.get("/api/task")
    async def api_task(request: Request, id: str = ""):
        return await call(request, handlers.open_task, id)

    @app.post("/api/rankings")
    async def api_rankings(request: Request):
        return await call(request, handlers.submit_ranking, await body_of(request))

    @app.post("/api/skip")
    async def api_skip(request: Request):
        return await call(request, handlers.skip_task, await body_of(request))

    @app.post("/api/draft")
    async def api_draft(request: Request):
        return await call(request, handlers.save_draft, await body_of(request))

    @app.get("/api/history")
    async def api_history(request: Request):
        return await call(request, handlers.history)

    @app.get("/api/admin/users")
    async def api_admin_users(request: Request):
        return await call(request, handlers.list_accounts)

    @app.post("/api/admin/users")
    async def api_admin_change_user(request: Request):
        return await call(request, handlers.change_account, await body_of(request))

    @app.get("/api/admin/annotators")
    async def api_admin_annotators(request: Request):
        return await call(request, handlers.annotator_metrics)

    @app.post("/api/admin/gold")
    async def api_admin_gold(request: Request):
        return await call(request, handlers.set_gold, await body_of(request))

    @app.get("/api/admin/review")
    async def api_admin_review(request: Request, limit: str = "50"):
        return await call(request, handlers.review_list, limit)

    @app.post("/api/admin/review")
    async def api_admin_resolve(request: Request):
        return await call(request, handlers.resolve_task, await body_of(request))

    @app.get("/api/health", include_in_schema=False)
    async def api_health():
        return Response("ok", media_type="text/plain")

    if ui:
        import gradio as gr

        from labeling import gradio_ui

        # Mounted last: the routes above take precedence over Gradio's catch-all mount at /.
        # No uploads in this UI: Gradio's upload route (signed-in only) takes at most 1 KB. No run history:
        # Gradio would keep every event's inputs and outputs in the browser's storage and offer to upload them.
        blocks = gradio_ui.build_ui(store, settings)
        event_ids.update(blocks.fns)
        gr.mount_gradio_app(app, blocks, path="/", auth_dependency=annotator_of,
                            ssr_mode=False, theme=gradio_ui.theme(), css=gradio_ui.css(), footer_links=[],
                            show_error=False, max_file_size=1024, run_history=False)
    return app
