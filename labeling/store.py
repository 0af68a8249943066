"""The label store: tasks, completions, annotators, rankings, skips and an append-only event log.

`open_store(url_or_path)` returns a `LabelStore`. SQLite is the implementation (stdlib `sqlite3`):
a plain path or `sqlite:///path`. `postgresql://...` is the intended next backend and is refused
with a one-line error for now. The store knows nothing of Gradio: handlers call it, and so do
`rlhf simulate`, `rlhf export` and `rlhf stats`.

Durability: every write is one transaction (`BEGIN IMMEDIATE` ... `COMMIT`) in WAL mode with
`synchronous=FULL`, so a method that returned has committed, and a kill -9 afterwards loses nothing.
Threads: each thread gets its own connection (Gradio/FastAPI run handlers in a thread pool); SQLite's
lock plus `busy_timeout` serialises writers.

Assignments: `next_task` hands a task to an annotator and records it in the `assignments` table (annotator,
task, overlap, expiry), in the same transaction that chose it. A live assignment holds one of the task's
`overlap` slots, so annotators working at the same time never push a task past its overlap; after
`ASSIGNMENT_SECONDS` the slot may go to someone else. The app submits with `require_assignment=True`: a
ranking is accepted only for a task handed to this annotator (after the expiry too, while the task still has
a free slot) or as an edit of their own ranking. A ranking or a skip ends the assignment.

Accounts: the store keeps the annotators' rows (name, password hash); the name and password rules, the
hashing and the sign-in check are `labeling.auth`'s.

Privacy: the methods a request handler uses take the logged-in annotator's name and only ever return
that annotator's own work (`get_own_ranking`, `history`). Everyone's rankings are reachable only
through the explicitly named admin methods `export_ranked_tasks` / `export_rankings`, used by the CLI
and the admin view.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol

from rlhf.errors import UserError
from rlhf.records import Completion, RankedTask, Ranking, Task, is_text

SCHEMA_VERSION = 2
"""1: tasks, completions, annotators, rankings, skips, events. 2: + assignments."""
MAX_REQUEST_ID_LENGTH = 128
MAX_REASON_LENGTH = 500
PREVIEW_CHARS = 80
MAX_SECONDS = 365 * 24 * 3600
"""The most time on a task a client may report (anything larger is a broken or hostile client)."""
ASSIGNMENT_SECONDS = 30 * 60
"""How long a served task stays reserved for its annotator before its slot may go to someone else."""


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
    """The database could not be written (locked too long, disk full, I/O error); the write was rolled back."""


class ConflictingTask(StoreError):
    """A task id being imported already exists (or repeats in the batch) with different content."""


class Conflict(StoreError):
    """The request contradicts what is stored (HTTP 409); nothing was stored."""


class RequestIdReused(Conflict):
    """A request id already used by this annotator for another task or another kind of action."""


class NotAssigned(Conflict):
    """A submit or skip (with `require_assignment`) for a task that was not handed to this annotator, or whose
    assignment expired and whose slots have been taken since."""


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
    """Unix time after which the slot no longer counts as held (the annotator may still submit while there is room)."""


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


# ---------------------------------------------------------------------------------------- pure helpers

def display_order(annotator: str, task_id: str, completion_ids: Iterable[str]) -> list[str]:
    """The order one annotator sees a task's completions in: a shuffle seeded by (annotator, task),
    so it is stable across calls and processes but differs between annotators and tasks. Showing
    every annotator the same order would let position bias leak into the labels."""
    def key(cid: str) -> str:
        return hashlib.sha256(f"{annotator}\x00{task_id}\x00{cid}".encode("utf-8")).hexdigest()
    return sorted(completion_ids, key=key)


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") >> 1


def queue_key(annotator: str, task_id: str) -> int:
    """The queue's tie-break among tasks with equally few rankings (smallest first): a per-task hash XOR a
    per-annotator hash. Deterministic, yet annotators working at the same time are mostly served different
    tasks, so the overlap is not overshot by everyone opening the file's first task. Computed in SQL from
    the stored `tasks.queue_key` (SQLite has no XOR: a ^ b = (a | b) - (a & b))."""
    return _hash63(task_id) ^ _hash63(annotator)


def _preview(prompt: str) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _task_fingerprint(task: Task) -> str:
    return hashlib.sha256(json.dumps(task.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_request_id(request_id: str | None) -> None:
    if request_id is not None and (not is_text(request_id) or not request_id
                                   or len(request_id) > MAX_REQUEST_ID_LENGTH):
        raise InvalidRanking(f"request id must be a non-empty string of at most {MAX_REQUEST_ID_LENGTH} characters")


def _check_task_id(task_id: str) -> None:
    if not is_text(task_id):
        raise UnknownTask(f"unknown task {task_id!r}")


# ------------------------------------------------------------------------------------------- interface

class LabelStore(Protocol):
    """What the app, the simulator, export and stats need from a label store."""

    def import_tasks(self, tasks: Iterable[Task]) -> tuple[int, int]: ...
    def get_task(self, task_id: str) -> Task: ...
    def count_tasks(self) -> int: ...
    def add_annotator(self, name: str, *, password_hash: str | None = None) -> None: ...
    def has_annotator(self, name: str) -> bool: ...
    def password_hash(self, name: str) -> str | None: ...
    def list_annotators(self) -> list[str]: ...
    def next_task(self, annotator: str, overlap: int) -> Task | None: ...
    def assign_task(self, annotator: str, task_id: str, overlap: int) -> bool: ...
    def remaining(self, annotator: str, overlap: int) -> int: ...
    def open_slots(self, overlap: int) -> int: ...
    def task_for(self, annotator: str, task_id: str) -> Task: ...
    def submit_ranking(self, annotator: str, task_id: str, ranks: Mapping[str, int], request_id: str | None = None,
                       seconds: float | None = None, *, require_assignment: bool = False) -> SubmitResult: ...
    def skip_task(self, annotator: str, task_id: str, reason: str | None = None,
                  request_id: str | None = None, *, require_assignment: bool = False) -> SkipResult: ...
    def get_own_ranking(self, annotator: str, task_id: str) -> Ranking | None: ...
    def has_skipped(self, annotator: str, task_id: str) -> bool: ...
    def assignments(self) -> list[Assignment]: ...
    def history(self, annotator: str, limit: int | None = None) -> list[HistoryItem]: ...
    def progress(self, overlap: int) -> Progress: ...
    def export_ranked_tasks(self) -> Iterator[RankedTask]: ...
    def export_rankings(self) -> list[Ranking]: ...
    def events(self) -> list[dict]: ...
    def close(self) -> None: ...


def open_store(url_or_path: str | os.PathLike, *, create: bool = True) -> "SQLiteLabelStore":
    """Open a label store: a plain path or 'sqlite:///path' opens (and with create=True, creates) SQLite.

    'postgresql://...' is the extension point for a shared server and is not implemented yet.
    With create=False a missing database is a UserError (read-only commands should not make empty files).
    """
    text = os.fspath(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        raise UserError("PostgreSQL label stores are not implemented yet; use a SQLite path such as labels.db")
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    elif "://" in text:
        raise UserError(f"unsupported label store URL {text!r}: use a file path or sqlite:///path")
    if not text or text == ":memory:":
        raise UserError("the label store needs a file path (an in-memory database is not shared between threads)")
    path = Path(text)
    if not create and not path.exists():
        raise UserError(f"no label database at {path} (create one with `rlhf import --db {path} tasks.jsonl`)")
    if not path.parent.exists():
        raise UserError(f"cannot create {path}: folder {path.parent} does not exist")
    return SQLiteLabelStore(path)


# -------------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- import order
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    fingerprint TEXT NOT NULL,                  -- sha256 of the task's JSON: same id must mean same content
    queue_key INTEGER NOT NULL,                 -- 63-bit hash of the id, for the queue's tie-break
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS completions (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    num_tokens INTEGER,
    PRIMARY KEY (task_id, position),
    UNIQUE (task_id, id)
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    password_hash TEXT,                         -- NULL: cannot log in (scripted annotators)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rankings (
    annotator TEXT NOT NULL REFERENCES annotators(name),
    task_id TEXT NOT NULL REFERENCES tasks(id),
    ranks TEXT NOT NULL,                        -- JSON {completion_id: dense rank}, in completion order
    seconds REAL,
    request_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (annotator, task_id)
);
CREATE INDEX IF NOT EXISTS rankings_by_task ON rankings(task_id);
CREATE TABLE IF NOT EXISTS skips (
    annotator TEXT NOT NULL REFERENCES annotators(name),
    task_id TEXT NOT NULL REFERENCES tasks(id),
    reason TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (annotator, task_id)
);
-- Tasks handed out and not yet ranked or skipped by their annotator (schema 2). A row whose expires_at has
-- not passed holds one of the task's overlap slots.
CREATE TABLE IF NOT EXISTS assignments (
    annotator TEXT NOT NULL REFERENCES annotators(name),
    task_id TEXT NOT NULL REFERENCES tasks(id),
    overlap INTEGER NOT NULL,                   -- the overlap it was handed out under
    assigned_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (annotator, task_id)
);
CREATE INDEX IF NOT EXISTS assignments_by_task ON assignments(task_id, expires_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    annotator TEXT NOT NULL,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('submit', 'edit', 'skip')),
    payload TEXT NOT NULL,
    request_id TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_request ON events(annotator, request_id) WHERE request_id IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"""


class SQLiteLabelStore:
    """The SQLite `LabelStore`. Use `open_store`; safe to share between threads; `close()` when done."""

    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time, busy_timeout: float = 30.0,
                 assignment_seconds: float = ASSIGNMENT_SECONDS):
        """`clock` gives the timestamps (injectable for tests); `busy_timeout` is how long (seconds) a write waits
        for another writer's lock before failing with StorageUnavailable; `assignment_seconds` is how long a
        served task holds its slot."""
        self.path = Path(path)
        self._clock = clock
        self._assignment_seconds = assignment_seconds
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        # Writers in this process queue on a lock instead of SQLite's busy handler, which sleeps in coarse
        # steps: under 50 concurrent submitters it cut the p95 submit latency ~4x (bench/label_load.py).
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        try:
            conn = self._conn()
            # executescript commits any open transaction first, so the script carries its own. Every statement
            # is create-if-missing, so the script also migrates: a schema-1 database gains `assignments`.
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() else None
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise UserError(f"{self.path} was written by a newer version (schema {row[0]}); upgrade rlhf")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            with self._write(conn):
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE"
                             " SET value = excluded.value", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            self.close()
            raise UserError(f"{self.path}: not a usable label database ({exc})") from None
        except BaseException:
            self.close()
            raise

    # --- connections and transactions

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy_timeout)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit: acknowledged = durable
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE (take the write lock up front, so two writers never
        deadlock upgrading read locks) ... COMMIT, or ROLLBACK on any error. A database-level failure (locked
        past busy_timeout, disk full, I/O error) becomes StorageUnavailable: one line, nothing stored."""
        try:
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"{self.path}: cannot write the label database ({exc}); nothing was stored") from exc

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> "SQLiteLabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tasks

    def import_tasks(self, tasks: Iterable[Task]) -> tuple[int, int]:
        """Add tasks in one transaction; returns (added, skipped). A task whose id is already stored with
        the same content is skipped (re-importing a file adds nothing twice); the same id with different
        content raises ConflictingTask naming the id, and then nothing of this call is stored."""
        conn = self._conn()
        added = skipped = 0
        now = self._clock()
        with self._write(conn):
            for task in tasks:
                try:
                    fingerprint = _task_fingerprint(task)
                except UnicodeEncodeError:
                    raise StoreError(f"task {task.id!r} contains text that is not valid Unicode (a lone surrogate)") from None
                row = conn.execute("SELECT fingerprint FROM tasks WHERE id = ?", (task.id,)).fetchone()
                if row is not None:
                    if row[0] != fingerprint:
                        raise ConflictingTask(f"task id {task.id!r} is already stored with different content")
                    skipped += 1
                    continue
                conn.execute("INSERT INTO tasks (id, prompt, fingerprint, queue_key, created_at) VALUES (?, ?, ?, ?, ?)",
                             (task.id, task.prompt, fingerprint, _hash63(task.id), now))
                conn.executemany(
                    "INSERT INTO completions (task_id, position, id, text, model, num_tokens) VALUES (?, ?, ?, ?, ?, ?)",
                    [(task.id, i, c.id, c.text, c.model, c.num_tokens) for i, c in enumerate(task.completions)])
                added += 1
        return added, skipped

    def get_task(self, task_id: str) -> Task:
        """The task with this id, completions in their stored (generation) order; UnknownTask if absent."""
        _check_task_id(task_id)
        conn = self._conn()
        row = conn.execute("SELECT prompt FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise UnknownTask(f"unknown task {task_id!r}")
        completions = tuple(
            Completion(id=cid, text=text, model=model, num_tokens=num_tokens)
            for cid, text, model, num_tokens in conn.execute(
                "SELECT id, text, model, num_tokens FROM completions WHERE task_id = ? ORDER BY position", (task_id,)))
        return Task(id=task_id, prompt=row[0], completions=completions)

    def count_tasks(self) -> int:
        """Number of tasks in the store."""
        return self._conn().execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def task_for(self, annotator: str, task_id: str) -> Task:
        """The task with its completions in this annotator's display order (see `display_order`)."""
        task = self.get_task(task_id)
        by_id = {c.id: c for c in task.completions}
        return Task(task.id, task.prompt, tuple(by_id[c] for c in display_order(annotator, task.id, by_id)))

    # --- annotators

    def add_annotator(self, name: str, *, password_hash: str | None = None) -> None:
        """Store a new annotator (`labeling.auth.add_annotator` checks the name and hashes the password); no
        password hash makes an account that cannot sign in (scripted annotators). AnnotatorExists if taken."""
        conn = self._conn()
        with self._write(conn):
            if conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise AnnotatorExists(f"annotator {name!r} already exists")
            conn.execute("INSERT INTO annotators (name, password_hash, created_at) VALUES (?, ?, ?)",
                         (name, password_hash, self._clock()))

    def has_annotator(self, name: str) -> bool:
        """Whether an annotator with this name exists."""
        return self._conn().execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone() is not None

    def password_hash(self, name: str) -> str | None:
        """The annotator's stored password hash; None for an unknown name or an account that cannot sign in."""
        if not is_text(name):
            return None
        row = self._conn().execute("SELECT password_hash FROM annotators WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def list_annotators(self) -> list[str]:
        """All annotator names, sorted."""
        return [r[0] for r in self._conn().execute("SELECT name FROM annotators ORDER BY name")]

    def _require_annotator(self, conn: sqlite3.Connection, annotator: str) -> None:
        if not is_text(annotator) or conn.execute(
                "SELECT 1 FROM annotators WHERE name = ?", (annotator,)).fetchone() is None:
            raise UnknownAnnotator(f"unknown annotator {annotator!r}")

    # --- the queue

    # Tasks this annotator may be served: not ranked or skipped by them, and with a free slot, i.e. fewer
    # than :overlap rankings plus live assignments of other annotators.
    _PENDING = """
        FROM tasks t
        LEFT JOIN (SELECT task_id, COUNT(*) AS n FROM rankings GROUP BY task_id) c ON c.task_id = t.id
        LEFT JOIN (SELECT task_id, COUNT(*) AS n FROM assignments WHERE expires_at > :now AND annotator <> :annotator
                   GROUP BY task_id) h ON h.task_id = t.id
        WHERE COALESCE(c.n, 0) + COALESCE(h.n, 0) < :overlap
          AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.task_id = t.id AND r.annotator = :annotator)
          AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.task_id = t.id AND s.annotator = :annotator)
    """

    def next_task(self, annotator: str, overlap: int) -> Task | None:
        """The next task for this annotator, completions in their display order; None when nothing is left.
        The task is assigned to them (recorded in the store, expiring after `assignment_seconds`).

        Serves the task already assigned to this annotator if it is still open to them (a reload shows the same
        task), else the tasks with the fewest rankings first, only tasks with a free slot (fewer than `overlap`
        rankings plus other annotators' live assignments), never one this annotator already ranked or skipped.
        Ties are broken by `queue_key(annotator, task_id)` (deterministic: the same call returns the same task
        until something changes)."""
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        conn = self._conn()
        with self._write(conn):  # choosing and assigning in one transaction: two servers never share a slot
            self._require_annotator(conn, annotator)
            now = self._clock()
            row = conn.execute(
                f"""SELECT t.id {self._PENDING} ORDER BY
                        EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.id AND a.annotator = :annotator) DESC,
                        COALESCE(c.n, 0), (t.queue_key | :salt) - (t.queue_key & :salt), t.seq LIMIT 1""",
                {"overlap": overlap, "annotator": annotator, "salt": _hash63(annotator), "now": now}).fetchone()
            if row is None:
                return None
            self._assign(conn, annotator, row[0], overlap, now)
        return self.task_for(annotator, row[0])

    def assign_task(self, annotator: str, task_id: str, overlap: int) -> bool:
        """Hand this task to this annotator if it is open to them (see `next_task`; the app uses it when an
        annotator reopens a task they skipped). Returns whether they may now submit a ranking of it: True
        also for a task they already ranked (an edit), False when its slots are taken."""
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        _check_task_id(task_id)
        conn = self._conn()
        with self._write(conn):
            self._require_annotator(conn, annotator)
            if conn.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone() is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            if self._own_ranking(conn, annotator, task_id) is not None:
                return True
            now = self._clock()
            if not self._has_room(conn, annotator, task_id, overlap, now):
                return False
            self._assign(conn, annotator, task_id, overlap, now)
        return True

    def _assign(self, conn: sqlite3.Connection, annotator: str, task_id: str, overlap: int, now: float) -> None:
        conn.execute("INSERT INTO assignments (annotator, task_id, overlap, assigned_at, expires_at)"
                     " VALUES (?, ?, ?, ?, ?) ON CONFLICT (annotator, task_id) DO UPDATE"
                     " SET overlap = excluded.overlap, expires_at = excluded.expires_at",
                     (annotator, task_id, overlap, now, now + self._assignment_seconds))

    def _has_room(self, conn: sqlite3.Connection, annotator: str, task_id: str, overlap: int, now: float) -> bool:
        """Whether the task has a slot for this annotator: fewer than `overlap` rankings plus other annotators'
        live assignments."""
        taken = conn.execute(
            """SELECT (SELECT COUNT(*) FROM rankings WHERE task_id = :task)
                    + (SELECT COUNT(*) FROM assignments WHERE task_id = :task AND annotator <> :annotator
                       AND expires_at > :now)""",
            {"task": task_id, "annotator": annotator, "now": now}).fetchone()[0]
        return taken < overlap

    def _check_assigned(self, conn: sqlite3.Connection, annotator: str, task_id: str, now: float) -> None:
        """NotAssigned unless the task was handed to this annotator and, if that assignment expired, still
        has a slot for them (a late answer is welcome while nobody else took its place)."""
        row = conn.execute("SELECT overlap, expires_at FROM assignments WHERE annotator = ? AND task_id = ?",
                           (annotator, task_id)).fetchone()
        if row is None:
            raise NotAssigned(f"task {task_id!r} was not handed to you; nothing was stored "
                              "(rank the tasks the app serves you, or edit your own earlier rankings)")
        overlap, expires_at = row
        if expires_at <= now and not self._has_room(conn, annotator, task_id, overlap, now):
            raise NotAssigned(f"your hold on task {task_id!r} expired and other annotators have taken its places; "
                              "nothing was stored (go on with the next task)")

    def remaining(self, annotator: str, overlap: int) -> int:
        """How many tasks `next_task` could still serve this annotator at this overlap."""
        conn = self._conn()
        self._require_annotator(conn, annotator)
        return conn.execute(f"SELECT COUNT(*) {self._PENDING}",
                            {"overlap": overlap, "annotator": annotator, "now": self._clock()}).fetchone()[0]

    def open_slots(self, overlap: int) -> int:
        """Rankings still wanted to bring every task to `overlap` rankings: sum of max(0, overlap - count)."""
        return self._conn().execute(
            """SELECT COALESCE(SUM(MAX(0, :overlap - COALESCE(c.n, 0))), 0) FROM tasks t
               LEFT JOIN (SELECT task_id, COUNT(*) AS n FROM rankings GROUP BY task_id) c ON c.task_id = t.id""",
            {"overlap": overlap}).fetchone()[0]

    # --- submissions

    def submit_ranking(self, annotator: str, task_id: str, ranks: Mapping[str, int], request_id: str | None = None,
                       seconds: float | None = None, *, require_assignment: bool = False) -> SubmitResult:
        """Store this annotator's ranking of a task (dense ranks, 1 best, ties allowed but not all-tied).

        Checks everything itself: unknown annotator/task -> UnknownAnnotator/UnknownTask; ranks that do not
        cover exactly the task's completion ids with positive integers, or all tie -> InvalidRanking; bad
        seconds/request id -> InvalidRanking. A request id this annotator already used for the same task
        stores nothing and returns the current ranking with action 'duplicate'; one used for another task or
        for a skip is a RequestIdReused conflict. With `require_assignment` (the app) a first ranking is
        accepted only for a task assigned to this annotator (see `_check_assigned`), else NotAssigned. Nothing
        is stored on error. A second submit for a task the annotator already ranked replaces it (action
        'edit', logged as an 'edit' event with the previous ranks; `seconds` add up over edits). Ranking a
        task ends its assignment and removes a skip. Returns after COMMIT."""
        _check_request_id(request_id)
        _check_task_id(task_id)
        if seconds is not None:
            # Compared as given: math.isfinite and float() overflow on huge integers.
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
                raise InvalidRanking(f"seconds must be a number from 0 to {MAX_SECONDS}")
            seconds = float(seconds)
        conn = self._conn()
        with self._write(conn):
            self._require_annotator(conn, annotator)
            if request_id is not None and self._replay(conn, annotator, request_id, task_id, ("submit", "edit")):
                ranking = self._own_ranking(conn, annotator, task_id)
                if ranking is not None:  # always: rankings are never deleted
                    return SubmitResult("duplicate", ranking)
            ids = [r[0] for r in conn.execute("SELECT id FROM completions WHERE task_id = ? ORDER BY position",
                                              (task_id,))]
            if not ids:
                raise UnknownTask(f"unknown task {task_id!r}")
            try:
                dense = Ranking.normalized(ranks, ids)
            except ValueError as exc:
                raise InvalidRanking(str(exc)) from None
            now = self._clock()
            previous = self._own_ranking(conn, annotator, task_id)
            if require_assignment and previous is None:
                self._check_assigned(conn, annotator, task_id, now)
            ranks_json = json.dumps(dense, ensure_ascii=False)
            if previous is None:
                action = "submit"
                conn.execute("INSERT INTO rankings (annotator, task_id, ranks, seconds, request_id, created_at, updated_at)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)", (annotator, task_id, ranks_json, seconds, request_id, now, now))
            else:
                action = "edit"
                if previous.seconds is not None:  # time spent accumulates over edits
                    seconds = previous.seconds + (seconds or 0.0)
                conn.execute("UPDATE rankings SET ranks = ?, seconds = ?, request_id = ?, updated_at = ?"
                             " WHERE annotator = ? AND task_id = ?", (ranks_json, seconds, request_id, now, annotator, task_id))
            conn.execute("DELETE FROM skips WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            conn.execute("DELETE FROM assignments WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            payload = {"ranks": dense, "seconds": seconds}
            if previous is not None:
                payload["previous"] = previous.ranks
            self._log(conn, now, annotator, task_id, action, payload, request_id)
            stored = self._own_ranking(conn, annotator, task_id)
        return SubmitResult(action, stored)

    def skip_task(self, annotator: str, task_id: str, reason: str | None = None,
                  request_id: str | None = None, *, require_assignment: bool = False) -> SkipResult:
        """Record that this annotator skipped a task (it is not served to them again; they can still rank it
        later from their history). Ends their assignment of it, so the slot goes to someone else. A task they
        already ranked cannot be skipped (InvalidRanking: edit it instead). With `require_assignment` only a
        task assigned to them (or skipped before) can be skipped, else NotAssigned. Re-sending the request id
        of a skip of the same task returns action 'duplicate' and stores nothing; one used for anything else
        is a RequestIdReused conflict."""
        _check_request_id(request_id)
        _check_task_id(task_id)
        if reason is not None and (not is_text(reason) or len(reason) > MAX_REASON_LENGTH):
            raise InvalidRanking(f"skip reason must be text of at most {MAX_REASON_LENGTH} characters")
        conn = self._conn()
        with self._write(conn):
            self._require_annotator(conn, annotator)
            if request_id is not None and self._replay(conn, annotator, request_id, task_id, ("skip",)):
                return SkipResult("duplicate", task_id, annotator)
            if conn.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone() is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            if self._own_ranking(conn, annotator, task_id) is not None:
                raise InvalidRanking(f"task {task_id!r} is already ranked; edit the ranking instead of skipping")
            if require_assignment and not conn.execute(
                    "SELECT 1 FROM assignments WHERE annotator = :a AND task_id = :t"
                    " UNION ALL SELECT 1 FROM skips WHERE annotator = :a AND task_id = :t",
                    {"a": annotator, "t": task_id}).fetchone():
                raise NotAssigned(f"task {task_id!r} was not handed to you; nothing was stored")
            now = self._clock()
            conn.execute("DELETE FROM assignments WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            conn.execute("INSERT INTO skips (annotator, task_id, reason, created_at) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (annotator, task_id) DO UPDATE SET reason = excluded.reason,"
                         " created_at = excluded.created_at", (annotator, task_id, reason, now))
            self._log(conn, now, annotator, task_id, "skip", {"reason": reason}, request_id)
        return SkipResult("skip", task_id, annotator)

    def _replay(self, conn: sqlite3.Connection, annotator: str, request_id: str, task_id: str,
                kinds: tuple[str, ...]) -> bool:
        """Whether this annotator already processed this request (same task, same kind of action): then it is
        answered again, not stored twice. A request id reused for another task or another kind of action is
        a RequestIdReused conflict: the client is confused, and answering with the other request's result
        (or storing anything) would be a guess."""
        row = conn.execute("SELECT task_id, kind FROM events WHERE annotator = ? AND request_id = ?",
                           (annotator, request_id)).fetchone()
        if row is None:
            return False
        done_task, kind = row
        if done_task != task_id or kind not in kinds:
            raise RequestIdReused(f"request id {request_id!r} was already used for a {kind} of task {done_task!r}; "
                                  "nothing was stored (send a new request id for a new answer)")
        return True

    def _log(self, conn, at, annotator, task_id, kind, payload, request_id) -> None:
        conn.execute("INSERT INTO events (at, annotator, task_id, kind, payload, request_id) VALUES (?, ?, ?, ?, ?, ?)",
                     (at, annotator, task_id, kind, json.dumps(payload, ensure_ascii=False), request_id))

    # --- an annotator's own work (handler-facing)

    def _own_ranking(self, conn: sqlite3.Connection, annotator: str, task_id: str) -> Ranking | None:
        row = conn.execute("SELECT ranks, seconds, request_id, created_at, updated_at FROM rankings"
                           " WHERE annotator = ? AND task_id = ?", (annotator, task_id)).fetchone()
        if row is None:
            return None
        return Ranking(task_id, annotator, json.loads(row[0]), *row[1:])

    def get_own_ranking(self, annotator: str, task_id: str) -> Ranking | None:
        """This annotator's own ranking of a task, or None. Handlers pass the logged-in user's name: there is
        deliberately no handler-facing way to read someone else's ranking."""
        if not is_text(annotator) or not is_text(task_id):
            return None
        return self._own_ranking(self._conn(), annotator, task_id)

    def has_skipped(self, annotator: str, task_id: str) -> bool:
        """Whether this annotator skipped this task (and has not ranked it since)."""
        if not is_text(annotator) or not is_text(task_id):
            return False
        return self._conn().execute("SELECT 1 FROM skips WHERE annotator = ? AND task_id = ?",
                                    (annotator, task_id)).fetchone() is not None

    def history(self, annotator: str, limit: int | None = None) -> list[HistoryItem]:
        """This annotator's ranked and skipped tasks, most recent first (at most `limit`)."""
        if not is_text(annotator):
            return []
        rows = self._conn().execute(
            """SELECT h.task_id, t.prompt, h.at, h.status FROM (
                   SELECT task_id, updated_at AS at, 'ranked' AS status FROM rankings WHERE annotator = :a
                   UNION ALL
                   SELECT task_id, created_at AS at, 'skipped' AS status FROM skips WHERE annotator = :a
               ) h JOIN tasks t ON t.id = h.task_id ORDER BY h.at DESC, t.seq DESC LIMIT :limit""",
            {"a": annotator, "limit": -1 if limit is None else int(limit)})
        return [HistoryItem(task_id, _preview(prompt), at, status) for task_id, prompt, at, status in rows]

    # --- totals and admin access

    def progress(self, overlap: int) -> Progress:
        """Totals (tasks, tasks with >= overlap rankings, rankings, skips) and per-annotator counts."""
        conn = self._conn()
        tasks = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        complete = conn.execute("SELECT COUNT(*) FROM (SELECT task_id FROM rankings GROUP BY task_id"
                                " HAVING COUNT(*) >= ?)", (overlap,)).fetchone()[0]
        rankings = conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]
        skips = conn.execute("SELECT COUNT(*) FROM skips").fetchone()[0]
        per = [AnnotatorProgress(name, ranked, skipped) for name, ranked, skipped in conn.execute(
            """SELECT a.name,
                      (SELECT COUNT(*) FROM rankings r WHERE r.annotator = a.name),
                      (SELECT COUNT(*) FROM skips s WHERE s.annotator = a.name)
               FROM annotators a ORDER BY a.name""")]
        return Progress(tasks, complete, rankings, skips, overlap, per)

    def export_rankings(self) -> list[Ranking]:
        """ADMIN/CLI ONLY: every annotator's stored ranking (ordered by task import order, then annotator)."""
        rows = self._conn().execute(
            "SELECT r.task_id, r.annotator, r.ranks, r.seconds, r.request_id, r.created_at, r.updated_at"
            " FROM rankings r JOIN tasks t ON t.id = r.task_id ORDER BY t.seq, r.annotator")
        return [Ranking(t, a, json.loads(ranks), *rest) for t, a, ranks, *rest in rows]

    def export_ranked_tasks(self) -> Iterator[RankedTask]:
        """ADMIN/CLI ONLY: every ranking joined with its task, as RankedTask (one line of rankings.jsonl),
        ordered by task import order, then annotator."""
        tasks: dict[str, Task] = {}
        for ranking in self.export_rankings():
            task = tasks.get(ranking.task_id)
            if task is None:
                tasks.clear()  # rankings come grouped by task: keep only the current one in memory
                task = tasks[ranking.task_id] = self.get_task(ranking.task_id)
            yield RankedTask.from_task(task, ranking)

    def events(self) -> list[dict]:
        """ADMIN/CLI ONLY: the append-only event log, oldest first, payload decoded."""
        return [{"id": i, "at": at, "annotator": a, "task_id": t, "kind": k, "payload": json.loads(p), "request_id": q}
                for i, at, a, t, k, p, q in self._conn().execute(
                    "SELECT id, at, annotator, task_id, kind, payload, request_id FROM events ORDER BY id")]

    def assignments(self) -> list[Assignment]:
        """ADMIN/CLI ONLY: every open assignment (live or expired), oldest first."""
        return [Assignment(*row) for row in self._conn().execute(
            "SELECT annotator, task_id, overlap, assigned_at, expires_at FROM assignments"
            " ORDER BY assigned_at, annotator, task_id")]

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` result ('ok' when the file is sound)."""
        return self._conn().execute("PRAGMA integrity_check").fetchone()[0]
