"""The SQLite label store (stdlib `sqlite3`): what differs from PostgreSQL, and nothing else.

Every rule and query is `labeling.store.sql.SQLLabelStore`'s; this module supplies the connections (one per
thread), the transactions (every write takes the database's one write lock) and the DDL of each schema version.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from labeling.store.errors import StorageUnavailable
from labeling.store.sql import (
    ASSIGNMENT_SECONDS,
    COMMENTS_AND_FLAGS,
    COUNT_RANKINGS,
    DRAFTS,
    GOLD_COLUMNS,
    SQLLabelStore,
    Statements,
)
from rlhf.errors import UserError

_MIGRATIONS = {
    1: (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- import order
            id TEXT NOT NULL UNIQUE,
            prompt TEXT NOT NULL,
            fingerprint TEXT NOT NULL,                  -- sha256 of the task's JSON: same id must mean same content
            queue_key INTEGER NOT NULL,                 -- 63-bit hash of the id, for the queue's tie-break
            created_at REAL NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS completions (
            task_id TEXT NOT NULL REFERENCES tasks(id),
            position INTEGER NOT NULL,
            id TEXT NOT NULL,
            text TEXT NOT NULL,
            model TEXT NOT NULL,
            num_tokens INTEGER,
            PRIMARY KEY (task_id, position),
            UNIQUE (task_id, id))""",
        """CREATE TABLE IF NOT EXISTS annotators (
            name TEXT PRIMARY KEY,
            password_hash TEXT,                         -- NULL: cannot sign in (scripted annotators)
            created_at REAL NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS rankings (
            annotator TEXT NOT NULL REFERENCES annotators(name),
            task_id TEXT NOT NULL REFERENCES tasks(id),
            ranks TEXT NOT NULL,                        -- JSON {completion_id: dense rank}, in completion order
            seconds REAL,
            request_id TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (annotator, task_id))""",
        "CREATE INDEX IF NOT EXISTS rankings_by_task ON rankings(task_id)",
        """CREATE TABLE IF NOT EXISTS skips (
            annotator TEXT NOT NULL REFERENCES annotators(name),
            task_id TEXT NOT NULL REFERENCES tasks(id),
            reason TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (annotator, task_id))""",
        """CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            annotator TEXT NOT NULL,
            task_id TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('submit', 'edit', 'skip')),
            payload TEXT NOT NULL,
            request_id TEXT)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS events_by_request ON events(annotator, request_id)"
        " WHERE request_id IS NOT NULL",
        """CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
    ),
    2: (
        # Tasks handed out and not yet ranked or skipped by their annotator. A row whose expires_at has not
        # passed holds one of the task's overlap places.
        """CREATE TABLE IF NOT EXISTS assignments (
            annotator TEXT NOT NULL REFERENCES annotators(name),
            task_id TEXT NOT NULL REFERENCES tasks(id),
            overlap INTEGER NOT NULL,                   -- the overlap it was handed out under
            assigned_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (annotator, task_id))""",
        "CREATE INDEX IF NOT EXISTS assignments_by_task ON assignments(task_id, expires_at)",
    ),
    3: (
        "ALTER TABLE annotators ADD COLUMN role TEXT NOT NULL DEFAULT 'annotator'"
        " CHECK (role IN ('annotator', 'admin'))",
        "ALTER TABLE annotators ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE sessions (
            token_hash TEXT PRIMARY KEY,                -- sha256 of the cookie's token: the table holds no token
            annotator TEXT NOT NULL REFERENCES annotators(name),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL)""",
        "CREATE INDEX sessions_by_annotator ON sessions(annotator)",
        "CREATE INDEX sessions_by_expiry ON sessions(expires_at)",
        *COUNT_RANKINGS,
    ),
    4: (
        # Failed sign-ins (labeling.auth.LoginThrottle), in the database so that every app server counts them.
        """CREATE TABLE login_failures (
            kind TEXT NOT NULL CHECK (kind IN ('account', 'address')),
            name TEXT NOT NULL,                         -- the account name tried, or the client's address
            failures INTEGER NOT NULL,
            last_at REAL NOT NULL,                      -- Unix time of the latest failure
            PRIMARY KEY (kind, name))""",
        "CREATE INDEX login_failures_by_time ON login_failures(last_at)",
    ),
    5: GOLD_COLUMNS,
    6: (
        # A resolved ranking per task, set by an admin in review; the event log gains its 'resolve' kind (SQLite
        # cannot change a CHECK constraint: the table is copied into one with the new constraint).
        """CREATE TABLE resolutions (
            task_id TEXT PRIMARY KEY REFERENCES tasks(id),
            ranks TEXT NOT NULL,                        -- JSON {completion_id: dense rank}
            resolved_by TEXT NOT NULL,                  -- the admin
            resolved_at REAL NOT NULL)""",
        """CREATE TABLE events_6 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            annotator TEXT NOT NULL,
            task_id TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('submit', 'edit', 'skip', 'resolve')),
            payload TEXT NOT NULL,
            request_id TEXT)""",
        "INSERT INTO events_6 (id, at, annotator, task_id, kind, payload, request_id)"
        " SELECT id, at, annotator, task_id, kind, payload, request_id FROM events ORDER BY id",
        "DROP TRIGGER events_append_only_update",
        "DROP TRIGGER events_append_only_delete",
        "DROP TABLE events",
        "ALTER TABLE events_6 RENAME TO events",
        "CREATE UNIQUE INDEX events_by_request ON events(annotator, request_id) WHERE request_id IS NOT NULL",
        """CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
    ),
    7: DRAFTS,
    8: COMMENTS_AND_FLAGS,
}


class SQLiteLabelStore(SQLLabelStore):
    """The SQLite label store. Use `open_store`; safe to share between threads; `close()` when done.

    Each thread gets its own connection (Gradio/FastAPI run handlers in a thread pool); every write takes the
    database's write lock up front (`BEGIN IMMEDIATE`), so SQLite runs one writer at a time."""

    backend = "sqlite"
    MIGRATIONS = _MIGRATIONS
    _TABLE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    def __init__(self, path: str | os.PathLike, *, create: bool = True, clock: Callable[[], float] = time.time,
                 busy_timeout: float = 30.0, assignment_seconds: float = ASSIGNMENT_SECONDS):
        """`clock` gives the timestamps (injectable for tests); `busy_timeout` is how long (seconds) a write waits
        for another writer's lock before failing with StorageUnavailable; `assignment_seconds` is how long a
        served task holds its place."""
        super().__init__(clock=clock, assignment_seconds=assignment_seconds)
        self.path = Path(path)
        self.location = str(self.path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        # Writers in this process queue on a lock instead of SQLite's busy handler, which sleeps in coarse
        # steps: under 50 concurrent submitters it cut the p95 submit latency ~4x (bench/label_load.py).
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        try:
            self._open_schema(create)
        except (sqlite3.DatabaseError, StorageUnavailable) as exc:
            self.close()
            raise UserError(f"{self.path}: not a usable label database ({exc.__cause__ or exc})") from None
        except BaseException:
            self.close()
            raise

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
    def _write(self) -> Iterator[Statements]:
        """One write transaction: BEGIN IMMEDIATE (take the write lock up front, so two writers never
        deadlock upgrading read locks) ... COMMIT, or ROLLBACK on any error. A database-level failure (locked
        past busy_timeout, disk full, I/O error) becomes StorageUnavailable: one line, nothing stored."""
        try:
            conn = self._conn()
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield Statements(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"{self.path}: cannot write the label database ({exc}); "
                                     "nothing was stored") from exc

    @contextmanager
    def _read(self) -> Iterator[Statements]:
        try:
            yield Statements(self._conn())
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"{self.path}: cannot read the label database ({exc})") from exc

    @contextmanager
    def _snapshot(self) -> Iterator[Statements]:
        with self._read() as tx:
            tx.execute("BEGIN")  # a WAL reader sees one snapshot until COMMIT
            try:
                yield tx
            finally:
                tx.execute("COMMIT")

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` result ('ok' when the file is sound)."""
        with self._read() as tx:
            return tx.value("PRAGMA integrity_check")

