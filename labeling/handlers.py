"""What the labeling app does per request: plain functions over the label store, testable without a browser.

Every handler takes the store, the signed-in annotator and the request's payload, and returns plain
JSON-ready data. The annotator always comes from the server's session table (`labeling.auth.Sessions`),
never from the request body, so nobody can act as someone else; a handler given no annotator raises
NotSignedIn.
The payload is untrusted: each value is checked here or by the store before anything is stored. The
web layer (`labeling/app.py`) only parses HTTP and maps the errors below to status codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from labeling.auth import LoginThrottle, NotSignedIn, Sessions, sign_in
from labeling.store import SQLiteLabelStore
from rlhf.errors import UserError
from rlhf.records import Task

MAX_HISTORY = 500


class RequestError(UserError):
    """A request the server refuses; `status` is its HTTP status code. The message is shown to the user."""

    status = 400


class Forbidden(RequestError):
    status = 403


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


def _task_id(payload: Mapping[str, Any], max_length: int = 1024) -> str:
    value = payload.get("task_id")
    if not isinstance(value, str) or not value:
        raise RequestError("'task_id' must be a non-empty string")
    if len(value) > max_length:
        raise RequestError(f"'task_id' is too long (at most {max_length} characters)")
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
    return {"ranked": own.ranked if own else 0, "skipped": own.skipped if own else 0,
            "total_tasks": store.count_tasks()}


# ------------------------------------------------------------------------------------------ handlers

def login(store: SQLiteLabelStore, sessions: Sessions, settings: AppSettings, payload: Any, *,
          throttle: LoginThrottle | None = None, address: str = "") -> tuple[str, dict]:
    """Sign in with {username, password} (`labeling.auth.sign_in`, throttled with a `throttle`); returns
    (session token, session info)."""
    payload = _payload(payload)
    token = sign_in(store, sessions, payload.get("username"), payload.get("password"), throttle=throttle,
                    address=address)
    return token, session_info(store, payload["username"], settings)


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
    task_id = _task_id(payload)
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
    task_id = _task_id(payload)
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
