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

from labeling.active import ActiveQueue
from labeling.auth import LoginThrottle, NotSignedIn, Sessions, is_admin, sign_in
from labeling.stats import GOLD_THRESHOLD
from labeling.store import MAX_HELD, ROLES, SQLLabelStore, UnknownAnnotator, check_flags
from rlhf.errors import UserError
from rlhf.records import Task, prompt_json

MAX_HISTORY = 500
GOLD_RATE = 0.1
"""The share of served tasks that are gold questions (`rlhf label --gold-rate`), while any are left."""
FLAGS = ("unsafe", "broken-prompt", "off-topic", "duplicate")
"""The flags an annotator may set on a task (`rlhf label --flags`)."""


class RequestError(UserError):
    """A request the server refuses; `status` is its HTTP status code. The message is shown to the user."""

    status = 400


class Forbidden(RequestError):
    status = 403


class NotFound(RequestError):
    status = 404


REQUEST_RATE = 2.0
"""The default `--rate-limit`. An annotator reading K completions makes a request every few seconds; the fastest
keyboard ranking of two-line tasks, 33 requests in 10 s (measured in Chromium), stays within the burst for about
a minute and is then held to a task a second; a page load makes a handful besides its static files; a script
looping over the API, hundreds a second."""
REQUEST_BURST = 60
"""Requests a signed-in annotator may make at once after a pause, beyond `AppSettings.request_rate` a second."""


@dataclass(frozen=True)
class AppSettings:
    """How `rlhf label` was started."""

    overlap: int = 2
    """Rankings wanted per task: the queue serves a task until this many annotators ranked it."""
    guidelines_html: str = ""
    """The project owner's guidelines, already rendered from Markdown (trusted text)."""
    admins: frozenset[str] = frozenset()
    """Annotators treated as admins by this server besides those with the admin role in the store: they may open
    the statistics view (everyone's counts and agreement) and manage accounts."""
    gold_rate: float = GOLD_RATE
    """The share of served tasks that are gold questions (known answers), blind among the others."""
    gold_threshold: float = GOLD_THRESHOLD
    """Gold accuracy under which the admin view flags an annotator."""
    max_held: int = MAX_HELD
    """The most tasks one annotator holds at a time (served and not yet answered): a place held past this is
    not handed out, so nobody can take every place by opening tasks and leaving them."""
    request_rate: float = REQUEST_RATE
    """Requests a second each signed-in annotator may make (static files free), beyond a burst of REQUEST_BURST;
    past it a 429. 0: no limit."""
    flags: tuple[str, ...] = FLAGS
    """The flags an annotator may set on a ranking or a skip (`--flags`); any other name is refused."""
    active: ActiveQueue | None = None
    """Active labeling (`--order`, `--pre-rank`; `labeling.active`): the order tasks are served in and the reward
    model's proposed rankings. None: the store's queue and no proposal."""


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


def _notes(payload: Mapping[str, Any], settings: AppSettings, comment_key: str) -> tuple[str | None, tuple[str, ...]]:
    """The comment (blank: None; its length is the store's to check) and the flags of an answer; a flag this
    server was not started with is refused."""
    comment = payload.get(comment_key)
    if comment is not None and not isinstance(comment, str):
        raise RequestError(f"'{comment_key}' must be a string")
    flags = payload.get("flags", [])
    if not isinstance(flags, list):
        raise RequestError("'flags' must be a list of flag names")
    unknown = next((f for f in flags if f not in settings.flags), None)
    if unknown is not None:
        shown = str(unknown).encode("utf-8", "backslashreplace").decode("utf-8")[:50]
        raise RequestError(f"unknown flag {shown!r} (this server's flags: {', '.join(settings.flags) or 'none'})")
    return (comment.strip() or None) if comment is not None else None, check_flags(flags)


def task_view(task: Task) -> dict[str, Any]:
    """A task as the page shows it: completions already in the annotator's display order, labelled A, B, ...;
    the prompt a string, or a conversation as a list of {"role", "content"} messages ending in a user turn."""
    return {
        "id": task.id,
        "prompt": prompt_json(task.prompt),
        "completions": [{"id": c.id, "label": completion_label(i), "text": c.text}
                        for i, c in enumerate(task.completions)],
    }


def progress(store: SQLLabelStore, annotator: str, settings: AppSettings) -> dict:
    """The annotator's own counts and the task total. (Not the length of their queue: counting it costs
    as much as finding the next task, on every request.)"""
    own = store.annotator_progress(annotator)
    return {"ranked": own.ranked, "skipped": own.skipped, "total_tasks": store.count_tasks()}


def _admin(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> str:
    annotator = _signed_in(annotator)
    if not is_admin(store, annotator, settings.admins):
        raise Forbidden("only admins can do this (`rlhf users role NAME admin`, or `rlhf label --admin NAME`)")
    return annotator


# ------------------------------------------------------------------------------------------ handlers

def login(store: SQLLabelStore, sessions: Sessions, settings: AppSettings, payload: Any, *,
          throttle: LoginThrottle | None = None, address: str = "") -> tuple[str, dict]:
    """Sign in with {username, password} (`labeling.auth.sign_in`, throttled with a `throttle`); returns
    (session token, session info)."""
    payload = _payload(payload)
    token = sign_in(store, sessions, payload.get("username"), payload.get("password"), throttle=throttle,
                    address=address)
    return token, session_info(store, payload["username"], settings)


def session_info(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Who is signed in, their progress, the guidelines, and whether they may open the statistics."""
    annotator = _signed_in(annotator)
    return {"annotator": annotator, "progress": progress(store, annotator, settings),
            "guidelines_html": settings.guidelines_html, "flags": list(settings.flags),
            "can_view_stats": is_admin(store, annotator, settings.admins)}


def next_task(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """The next task of this annotator's queue (None when it is empty) and their progress."""
    annotator = _signed_in(annotator)
    active = settings.active
    options = {"max_held": settings.max_held, "gold_rate": settings.gold_rate}
    task = (active.next_task(store, annotator, settings.overlap, **options) if active is not None
            else store.next_task(annotator, settings.overlap, **options))
    result = {"task": None if task is None else task_view(task), "progress": progress(store, annotator, settings)}
    # "N left for you" (the served task included): counted here only, where the queue is read anyway.
    result["progress"]["left"] = 0 if task is None else store.remaining(annotator, settings.overlap)
    if active is not None and active.proposal_rewards:  # --pre-rank: the order the task opens with
        result["proposal"] = None if task is None else active.proposal(task.id)
    result["draft"] = None if task is None else store.draft(annotator, task.id)
    return result


def open_task(store: SQLLabelStore, annotator: str | None, settings: AppSettings, task_id: Any) -> dict:
    """A task to (re)rank, with this annotator's own stored ranking of it (ranks, comment, flags), if any, to
    edit, or their skip of it (reason, flags). Opening holds no place: a task they skipped can be ranked after
    all while it has a free place (the store checks at the submit); any other task they can read but not submit
    unless it was handed to them."""
    annotator = _signed_in(annotator)
    if not isinstance(task_id, str) or not task_id:
        raise RequestError("'id' must be a non-empty string")
    task = store.task_for(annotator, task_id)
    own = store.get_own_ranking(annotator, task_id)
    skipped = store.get_own_skip(annotator, task_id) if own is None else None
    result = {"task": task_view(task),
              "own": None if own is None else {"ranks": own.ranks, "comment": own.comment, "flags": list(own.flags)},
              "skipped": None if skipped is None else {"reason": skipped[0], "flags": list(skipped[1])},
              "draft": store.draft(annotator, task_id)}
    if own is None and settings.active is not None and settings.active.proposal_rewards:
        result["proposal"] = settings.active.proposal(task_id)
    return result


def submit_ranking(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Store (or replace) the annotator's ranking of a task: {task_id, ranks: {completion_id: rank},
    request_id, seconds?, comment?, flags?: [name, ...]} (an edit replaces the comment and flags too; flags are
    this server's `settings.flags`). The store validates the ranks against the task and accepts only a task handed to
    this annotator, or their own earlier ranking (NotAssigned otherwise); a re-sent request id stores nothing
    new ('duplicate'), and a request id of another task is a conflict (RequestIdReused)."""
    annotator = _signed_in(annotator)
    payload = _payload(payload)
    task_id = _task_id(payload)
    ranks = payload.get("ranks")
    if not isinstance(ranks, Mapping):
        raise RequestError("'ranks' must map completion ids to ranks")
    comment, flags = _notes(payload, settings, "comment")
    # With --pre-rank the task was opened with the reward model's order; the store keeps it beside the ranking.
    proposal = settings.active.proposal(task_id) if settings.active is not None else None
    result = store.submit_ranking(annotator, task_id, dict(ranks), request_id=payload.get("request_id"),
                                  seconds=payload.get("seconds"), require_assignment=True, overlap=settings.overlap,
                                  comment=comment, flags=flags, **({"proposal": proposal} if proposal else {}))
    return {"task_id": task_id, "action": result.action, "ranks": result.ranking.ranks,
            "comment": result.ranking.comment, "flags": list(result.ranking.flags),
            "progress": progress(store, annotator, settings)}


def skip_task(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Skip a task, with an optional reason (the skip's comment) and flags: {task_id, reason?, flags?: [name, ...],
    request_id} ("broken-prompt" tells the admins the task itself is wrong)."""
    annotator = _signed_in(annotator)
    payload = _payload(payload)
    task_id = _task_id(payload)
    reason, flags = _notes(payload, settings, "reason")
    result = store.skip_task(annotator, task_id, reason, request_id=payload.get("request_id"), require_assignment=True,
                             flags=flags)
    return {"task_id": task_id, "action": result.action, "progress": progress(store, annotator, settings)}


def save_draft(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Keep the annotator's partial ranking of a task as they go, {task_id, ranks: {completion id: rank}} (ranks
    so far; {} removes it): it comes back with the task (`next_task`, `open_task`) after a reload or a new
    sign-in, until they submit or skip the task. Not a ranking: nothing counts or exports it."""
    annotator = _signed_in(annotator)
    payload = _payload(payload)
    task_id = _task_id(payload)
    ranks = payload.get("ranks")
    if not isinstance(ranks, Mapping):
        raise RequestError("'ranks' must map completion ids to ranks ({} removes the draft)")
    return {"task_id": task_id, "draft": store.save_draft(annotator, task_id, dict(ranks))}


def history(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """The annotator's own ranked and skipped tasks, newest first (never anyone else's)."""
    annotator = _signed_in(annotator)
    return {"items": [{"task_id": h.task_id, "prompt": h.prompt_preview, "status": h.status, "at": h.at}
                      for h in store.history(annotator, limit=MAX_HISTORY)]}


def stats(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Project statistics (counts, agreement), for admins."""
    _admin(store, annotator, settings)
    from labeling.stats import compute_stats, format_stats

    result = compute_stats(store, settings.overlap, settings.gold_threshold)
    return {"stats": result, "text": format_stats(result)}


def annotator_metrics(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Per-annotator quality at a glance (admins only): `labeling.stats.annotator_table`, one object per
    annotator, flagged under the server's gold threshold."""
    _admin(store, annotator, settings)
    from labeling.stats import annotator_table, table_records

    return {"annotators": table_records(annotator_table(store, settings.gold_threshold)),
            "gold_threshold": settings.gold_threshold}


def set_gold(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Make a task a gold question (admins only): {task_id, from: NAME} takes that annotator's ranking of it as the
    known answer, {task_id, ranks: {completion id: rank}} gives it, {task_id, ranks: null} makes it an ordinary
    task again."""
    _admin(store, annotator, settings)
    payload = _payload(payload)
    task_id = _task_id(payload)
    source = payload.get("from")
    if source is not None:
        if "ranks" in payload:
            raise RequestError("give either 'from' (an annotator whose ranking is the answer) or 'ranks', not both")
        if not isinstance(source, str) or not source:
            raise RequestError("'from' must be an annotator's name")
        own = store.get_own_ranking(source, task_id)
        if own is None:
            raise NotFound(f"{source!r} has not ranked task {task_id!r}")
        ranks = own.ranks
    elif "ranks" in payload:
        ranks = payload["ranks"]
        if ranks is not None and not isinstance(ranks, Mapping):
            raise RequestError("'ranks' must map completion ids to ranks, or be null")
    else:
        raise RequestError("give 'from' (an annotator whose ranking is the answer) or 'ranks'")
    store.set_gold(task_id, None if ranks is None else dict(ranks), source=source)
    return {"task_id": task_id, "gold": store.gold_answers().get(task_id, (None,))[0], "from": source}


MAX_REVIEW = 200


def review_list(store: SQLLabelStore, annotator: str | None, settings: AppSettings, limit: Any = "50") -> dict:
    """The tasks whose rankings disagree most, each with its rankings and resolution (admins only;
    `labeling.stats.review_queue`)."""
    _admin(store, annotator, settings)
    if not (isinstance(limit, str) and limit.isdigit() and 1 <= int(limit) <= MAX_REVIEW):
        raise RequestError(f"'limit' must be a whole number from 1 to {MAX_REVIEW}")
    from labeling.stats import review_queue

    return {"tasks": review_queue(store, int(limit))}


def resolve_task(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """Set the resolved ranking of a task, {task_id, ranks: {completion id: rank}}, or remove it (ranks null);
    the event log records which admin did it (admins only)."""
    admin = _admin(store, annotator, settings)
    payload = _payload(payload)
    task_id = _task_id(payload)
    if "ranks" not in payload or not (payload["ranks"] is None or isinstance(payload["ranks"], Mapping)):
        raise RequestError("'ranks' must map completion ids to ranks, or be null")
    ranks = store.resolve(task_id, None if payload["ranks"] is None else dict(payload["ranks"]), admin)
    return {"task_id": task_id, "ranks": ranks, "by": admin}


ACCOUNT_ACTIONS = ("disable", "enable", "end-sessions", *(f"make-{role}" for role in ROLES))


def list_accounts(store: SQLLabelStore, annotator: str | None, settings: AppSettings) -> dict:
    """Every account with its role, whether it is disabled, and its counts (admins only)."""
    _admin(store, annotator, settings)
    counts = {p.annotator: p for p in store.progress(settings.overlap).annotators}
    return {"users": [{"name": a.name, "role": a.role, "disabled": a.disabled,
                       "can_sign_in": a.password_hash is not None,
                       "ranked": counts[a.name].ranked if a.name in counts else 0,
                       "skipped": counts[a.name].skipped if a.name in counts else 0} for a in store.accounts()]}


def change_account(store: SQLLabelStore, annotator: str | None, settings: AppSettings, payload: Any) -> dict:
    """An admin's change to an account: {name, action} with action one of ACCOUNT_ACTIONS. Disabling an account
    or ending its sessions signs it out everywhere. Admins cannot disable or demote themselves."""
    admin = _admin(store, annotator, settings)
    payload = _payload(payload)
    name, action = payload.get("name"), payload.get("action")
    if not isinstance(name, str) or not name:
        raise RequestError("'name' must be a non-empty string")
    if action not in ACCOUNT_ACTIONS:
        raise RequestError(f"'action' must be one of {', '.join(ACCOUNT_ACTIONS)}")
    if name == admin and action in ("disable", "make-annotator"):
        raise RequestError("you cannot disable or demote your own account")
    ended = 0
    try:
        if action in ("disable", "enable"):
            ended = store.set_disabled(name, action == "disable")
        elif action == "end-sessions":
            ended = store.end_sessions(name)
        else:
            store.set_role(name, action.removeprefix("make-"))
    except UnknownAnnotator as exc:
        raise NotFound(str(exc)) from None
    return {"name": name, "action": action, "sessions_ended": ended}
