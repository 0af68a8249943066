"""What the labeling app does per request: plain functions over the label store, testable without a browser.

Every handler takes the store, the signed-in annotator and the request's payload, and returns plain
JSON-ready data. The annotator always comes from the server's session table (`Sessions`), never from
the request body, so nobody can act as someone else; a handler given no annotator raises NotSignedIn.
The payload is untrusted: each value is checked here or by the store before anything is stored. The
web layer (`labeling/app.py`) only parses HTTP and maps the errors below to status codes.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from labeling.store import MAX_PASSWORD_LENGTH, SQLiteLabelStore
from rlhf.errors import UserError
from rlhf.records import Task

SESSION_SECONDS = 12 * 3600
"""A session ends after this long without a request (sliding expiry)."""
MAX_HISTORY = 500


class RequestError(UserError):
    """A request the server refuses; `status` is its HTTP status code. The message is shown to the user."""

    status = 400


class NotSignedIn(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class TooManyAttempts(RequestError):
    """Sign-in refused without checking the password: too many recent failures (HTTP 429)."""

    status = 429

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed sign-ins; try again in {retry_after} s")
        self.retry_after = retry_after


class LoginThrottle:
    """Failed sign-ins per account name and per client address, kept in memory.

    Each key may fail `free_failures` times; after that, each further attempt must wait `base_delay` seconds
    after the latest failure, doubling with every failure up to `max_delay`. A key is forgotten `forget_after`
    seconds after its latest failure, and a successful sign-in clears its account. An attempt counts as a
    failure from the moment it starts (and is taken back if it succeeds), so parallel guesses cannot slip in
    while the password is checked. The account limit is lower than the address limit; the address limit
    stops one client guessing across many names (behind a reverse proxy every client has the proxy's
    address, so set that limit with the proxy in mind). At most `max_keys` keys are kept: the oldest go first.
    """

    def __init__(self, *, account_failures: int = 5, address_failures: int = 20, base_delay: float = 1.0,
                 max_delay: float = 300.0, forget_after: float = 900.0, max_keys: int = 10_000,
                 clock=time.monotonic):
        self._free = {"account": account_failures, "address": address_failures}
        self._base, self._max, self._forget, self._max_keys = base_delay, max_delay, forget_after, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()  # key -> (count, last)

    def _wait(self, key: tuple[str, str], now: float) -> float:
        count, last = self._failures.get(key, (0, now))
        if now - last > self._forget:
            self._failures.pop(key, None)
            return 0.0
        over = count - self._free[key[0]]
        if over < 0:
            return 0.0
        return last + min(self._max, self._base * 2.0 ** min(over, 64)) - now

    def attempt(self, account: str, address: str) -> None:
        """Start a sign-in attempt; raises TooManyAttempts (and counts nothing) if either key must wait."""
        keys = (("account", account), ("address", address))
        with self._lock:
            now = self._clock()
            wait = max(self._wait(key, now) for key in keys)
            if wait > 0:
                raise TooManyAttempts(max(1, math.ceil(wait)))
            for key in keys:
                count, _ = self._failures.pop(key, (0, now))
                self._failures[key] = (count + 1, now)  # to the end: the dict stays ordered by latest failure
            while self._failures and (len(self._failures) > self._max_keys
                                      or now - next(iter(self._failures.values()))[1] > self._forget):
                self._failures.popitem(last=False)

    def succeeded(self, account: str, address: str) -> None:
        """The attempt succeeded: clear the account's failures and take this attempt back from the address."""
        with self._lock:
            self._failures.pop(("account", account), None)
            count, last = self._failures.get(("address", address), (0, 0.0))
            if count > 1:
                self._failures[("address", address)] = (count - 1, last)
            else:
                self._failures.pop(("address", address), None)


class Sessions:
    """Signed-in sessions: an unguessable token (the cookie) -> annotator name, kept in memory.

    A server restart signs everyone out, which costs a login and nothing else: all work is in the store.
    """

    def __init__(self, ttl: float = SESSION_SECONDS, clock=time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}

    def create(self, annotator: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = (annotator, self._clock() + self._ttl)
        return token

    def annotator(self, token: str | None) -> str | None:
        """The annotator signed in with this token, or None (unknown or expired token)."""
        if not token:
            return None
        now = self._clock()
        with self._lock:
            entry = self._sessions.get(token)
            if entry is None:
                return None
            if entry[1] < now:
                del self._sessions[token]
                return None
            self._sessions[token] = (entry[0], now + self._ttl)
            return entry[0]

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)


@dataclass(frozen=True)
class AppSettings:
    """How `rlhf label` was started."""

    overlap: int = 2
    """Rankings wanted per task: the queue serves a task until this many annotators ranked it."""
    guidelines_html: str = ""
    """The project owner's guidelines, already rendered from Markdown (trusted text)."""
    admins: frozenset[str] = frozenset()
    """Annotators who may open the statistics view (it shows everyone's counts and agreement)."""


def completion_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: the stable label of the completion shown at `index`."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(65 + rest) + label
    return label


def _signed_in(annotator: str | None) -> str:
    if not annotator:
        raise NotSignedIn("sign in first")
    return annotator


def _payload(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise RequestError("the request body must be a JSON object")
    return payload


def _text_field(payload: Mapping[str, Any], key: str, *, required: bool = True, max_length: int = 1024) -> str | None:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise RequestError(f"'{key}' must be a non-empty string")
    if len(value) > max_length:
        raise RequestError(f"'{key}' is too long (at most {max_length} characters)")
    return value


def task_view(task: Task) -> dict[str, Any]:
    """A task as the page shows it: completions already in the annotator's display order, labelled A, B, ..."""
    return {
        "id": task.id,
        "prompt": task.prompt,
        "completions": [{"id": c.id, "label": completion_label(i), "text": c.text}
                        for i, c in enumerate(task.completions)],
    }


def progress(store: SQLiteLabelStore, annotator: str, settings: AppSettings) -> dict:
    """The annotator's own counts and the task total. (Not the length of their queue: counting it costs
    as much as finding the next task, on every request.)"""
    own = next((p for p in store.progress(settings.overlap).annotators if p.annotator == annotator), None)
    result = {"ranked": own.ranked if own else 0, "skipped": own.skipped if own else 0,
              "total_tasks": store.count_tasks()}
    return result


# ------------------------------------------------------------------------------------------ handlers

def login(store: SQLiteLabelStore, sessions: Sessions, settings: AppSettings, payload: Any, *,
          throttle: LoginThrottle | None = None, address: str = "") -> tuple[str, dict]:
    """Check a name and password against the store; returns (session token, session info). With a `throttle`,
    repeated failures for the account or from the client `address` are refused for a while (TooManyAttempts)."""
    payload = _payload(payload)
    name = payload.get("username")
    password = payload.get("password")
    account = name[:64] if isinstance(name, str) else ""
    if throttle is not None:
        throttle.attempt(account, address)
    if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH \
            or len(name) > 64 or not store.verify_password(name, password):
        raise NotSignedIn("wrong annotator name or password")
    if throttle is not None:
        throttle.succeeded(account, address)
    return sessions.create(name), session_info(store, name, settings)


def session_info(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Who is signed in, their progress, the guidelines, and whether they may open the statistics."""
    annotator = _signed_in(annotator)
    return {"annotator": annotator, "progress": progress(store, annotator, settings),
            "guidelines_html": settings.guidelines_html, "can_view_stats": annotator in settings.admins}


def next_task(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """The next task of this annotator's queue (None when it is empty) and their progress."""
    annotator = _signed_in(annotator)
    task = store.next_task(annotator, settings.overlap)
    return {"task": None if task is None else task_view(task),
            "progress": progress(store, annotator, settings)}


def open_task(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings, task_id: Any) -> dict:
    """A task to (re)rank, with this annotator's own stored ranking of it, if any, to edit. A task they
    skipped is assigned to them again if it still has a free slot, so they can rank it after all; any other
    task they can read but not submit unless it was handed to them."""
    annotator = _signed_in(annotator)
    if not isinstance(task_id, str) or not task_id:
        raise RequestError("'id' must be a non-empty string")
    task = store.task_for(annotator, task_id)
    own = store.get_own_ranking(annotator, task_id)
    if own is None and store.has_skipped(annotator, task_id):
        store.assign_task(annotator, task_id, settings.overlap)  # refused later, with the reason, if it is full
    return {"task": task_view(task), "own": None if own is None else {"ranks": own.ranks}}


def submit_ranking(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Store (or replace) the annotator's ranking of a task: {task_id, ranks: {completion_id: rank},
    request_id, seconds?}. The store validates the ranks against the task and accepts only a task handed to
    this annotator, or their own earlier ranking (NotAssigned otherwise); a re-sent request id stores nothing
    new ('duplicate'), and a request id of another task is a conflict (RequestIdReused)."""
    annotator = _signed_in(annotator)
    payload = _payload(payload)
    task_id = _text_field(payload, "task_id")
    ranks = payload.get("ranks")
    if not isinstance(ranks, Mapping):
        raise RequestError("'ranks' must map completion ids to ranks")
    result = store.submit_ranking(annotator, task_id, dict(ranks), request_id=payload.get("request_id"),
                                  seconds=payload.get("seconds"), require_assignment=True)
    return {"task_id": task_id, "action": result.action, "ranks": result.ranking.ranks,
            "progress": progress(store, annotator, settings)}


def skip_task(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Skip a task, with an optional reason: {task_id, reason?, request_id}."""
    annotator = _signed_in(annotator)
    payload = _payload(payload)
    task_id = _text_field(payload, "task_id")
    reason = payload.get("reason")
    if isinstance(reason, str):
        reason = reason.strip() or None
    result = store.skip_task(annotator, task_id, reason, request_id=payload.get("request_id"), require_assignment=True)
    return {"task_id": task_id, "action": result.action, "progress": progress(store, annotator, settings)}


def history(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """The annotator's own ranked and skipped tasks, newest first (never anyone else's)."""
    annotator = _signed_in(annotator)
    return {"items": [{"task_id": h.task_id, "prompt": h.prompt_preview, "status": h.status, "at": h.at}
                      for h in store.history(annotator, limit=MAX_HISTORY)]}


def stats(store: SQLiteLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Project statistics (counts, agreement) for the annotators named with --admin."""
    annotator = _signed_in(annotator)
    if annotator not in settings.admins:
        raise Forbidden("only the annotators named with `rlhf label --admin` can see the statistics")
    from labeling.stats import compute_stats, format_stats

    result = compute_stats(store, settings.overlap)
    return {"stats": result, "text": format_stats(result)}
