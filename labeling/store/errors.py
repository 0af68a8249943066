"""The label store's errors and the records its methods return: what callers catch and read, whichever backend
answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import UserError
from rlhf.records import Ranking

# --------------------------------------------------------------------------------------------- errors

class StoreError(UserError):
    """Base of the store's errors; each message is one line that can be shown to the user as is."""


class InvalidRanking(StoreError, ValueError):
    """A submitted ranking (or its seconds / request id) is not acceptable; nothing was stored."""


class UnknownTask(StoreError, LookupError):
    """No task with this id exists in the store."""


class UnknownAnnotator(StoreError, LookupError):
    """No annotator with this name exists in the store."""


class AnnotatorExists(StoreError):
    """`add_annotator` was asked to create a name that is taken."""


class StorageUnavailable(StoreError):
    """The database could not be written or read (locked too long, unreachable, disk full, I/O error); the write
    was rolled back."""


class ConflictingTask(StoreError):
    """A task id being imported already exists (or repeats in the batch) with different content."""


class Conflict(StoreError):
    """The request contradicts what is stored (HTTP 409); nothing was stored."""


class RequestIdReused(Conflict):
    """A request id already used by this annotator for another task or another kind of action."""


class NotAssigned(Conflict):
    """A submit or skip (with `require_assignment`) for a task that was not handed to this annotator, or whose
    assignment expired and whose places have been taken since."""


# ------------------------------------------------------------------------------------- result records

@dataclass(frozen=True)
class SubmitResult:
    """What `submit_ranking` did: action is 'submit' (new), 'edit' (replaced), or 'duplicate'
    (the request id was already processed; nothing stored, the current ranking is returned)."""

    action: str
    ranking: Ranking


@dataclass(frozen=True)
class SkipResult:
    """What `skip_task` did: action is 'skip' or 'duplicate' (request id already processed)."""

    action: str
    task_id: str
    annotator: str


@dataclass(frozen=True)
class Assignment:
    """A task handed to an annotator by `next_task` (or `assign_task`), not yet ranked or skipped by them."""

    annotator: str
    task_id: str
    overlap: int
    """The overlap the task was handed out under: a late submit is still accepted while the task has room."""
    assigned_at: float
    expires_at: float
    """Unix time after which the place no longer counts as held (the annotator may still submit while there is
    room)."""


@dataclass(frozen=True)
class Account:
    """An annotator's account row."""

    name: str
    password_hash: str | None
    """None: cannot sign in (scripted annotators)."""
    role: str
    """'annotator' or 'admin' (admins see the statistics and manage accounts in the app)."""
    disabled: bool
    """A disabled account cannot sign in, and its sessions are refused."""
    created_at: float


@dataclass(frozen=True)
class HistoryItem:
    """One line of an annotator's own history: a task they ranked or skipped."""

    task_id: str
    prompt_preview: str
    """The prompt's first characters on one line (whitespace collapsed), at most PREVIEW_CHARS."""
    at: float
    """Unix time of the latest submit/edit/skip of this task by this annotator."""
    status: str
    """'ranked' or 'skipped'."""


@dataclass(frozen=True)
class AnnotatorProgress:
    """How much one annotator has done."""

    annotator: str
    ranked: int
    skipped: int


@dataclass(frozen=True)
class Progress:
    """Totals for the whole store at a given overlap (rankings wanted per task)."""

    tasks: int
    complete: int
    """Tasks that have at least `overlap` rankings."""
    rankings: int
    skips: int
    overlap: int
    annotators: list[AnnotatorProgress] = field(default_factory=list)
