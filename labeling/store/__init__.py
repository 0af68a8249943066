"""The label store: tasks, completions, annotators, rankings, skips, assignments, sign-in sessions and an
append-only event log.

`open_store(url_or_path)` returns the store, picking the backend from the URL (`parse_url`): a plain path or
`sqlite:///path` is SQLite (stdlib `sqlite3`), `postgresql://...` is PostgreSQL (psycopg 3). The store knows
nothing of Gradio: handlers call it, and so do `rlhf simulate`, `rlhf export`, `rlhf stats` and `rlhf db copy`.

The package, from the ground up: `errors` (what callers catch and read), `sql` (every rule and query, written
once: `SQLLabelStore`), the backends `sqlite` and `postgres` (connections, transactions, DDL, locks), and `copy`
(`rlhf db copy`). The names callers use are handed on here.
"""

from __future__ import annotations

import os
from pathlib import Path

from labeling.store.errors import (
    Account,
    AnnotatorExists,
    AnnotatorProgress,
    Assignment,
    Conflict,
    ConflictingTask,
    HistoryItem,
    InvalidRanking,
    NotAssigned,
    Progress,
    RequestIdReused,
    SkipResult,
    StorageUnavailable,
    StoreError,
    SubmitResult,
    UnknownAnnotator,
    UnknownTask,
)
from labeling.store.postgres import PostgresLabelStore
from labeling.store.sql import (
    ASSIGNMENT_SECONDS,
    FLAG_NAME,
    MAX_COMMENT_LENGTH,
    MAX_FLAGS,
    MAX_HELD,
    MAX_REQUEST_ID_LENGTH,
    MAX_SECONDS,
    PREVIEW_CHARS,
    ROLES,
    SCHEMA_VERSION,
    SQLLabelStore,
    check_flags,
    display_order,
    queue_key,
    storable,
)
from labeling.store.sqlite import SQLiteLabelStore
from rlhf.errors import UserError

__all__ = [
    "ASSIGNMENT_SECONDS", "FLAG_NAME", "MAX_COMMENT_LENGTH", "MAX_FLAGS", "MAX_HELD", "MAX_REQUEST_ID_LENGTH",
    "MAX_SECONDS", "PREVIEW_CHARS", "ROLES", "SCHEMA_VERSION", "Account", "AnnotatorExists", "AnnotatorProgress",
    "Assignment", "Conflict", "ConflictingTask", "HistoryItem", "InvalidRanking", "NotAssigned", "PostgresLabelStore",
    "Progress", "RequestIdReused", "SQLLabelStore", "SQLiteLabelStore", "SkipResult", "StorageUnavailable",
    "StoreError", "SubmitResult", "UnknownAnnotator", "UnknownTask", "check_flags", "display_order", "open_store",
    "parse_url", "queue_key", "storable",
]


def parse_url(url_or_path: str | os.PathLike) -> tuple[str, str]:
    """Which backend a label store URL names, and what that backend opens: ('postgresql', the URL with the
    postgresql:// scheme) for 'postgresql://...' or 'postgres://...'; ('sqlite', the file's path) for a plain
    path or 'sqlite:///path'. Any other URL, no path, or ':memory:' is a UserError."""
    text = os.fspath(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql", "postgresql://" + text.split("://", 1)[1]
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    elif "://" in text:
        raise UserError(f"unsupported label store URL {text!r}: use a file path, sqlite:///path or postgresql://...")
    if not text or text == ":memory:":
        raise UserError("the label store needs a file path (an in-memory database is not shared between threads)")
    return "sqlite", text


def open_store(url_or_path: str | os.PathLike, *, create: bool = True, **options) -> SQLLabelStore:
    """Open a label store (see `parse_url`). With create=True a missing store is created (the SQLite file; the
    PostgreSQL tables, in a database that must exist); with create=False it is a UserError (read-only commands
    make nothing). `options` go to the backend's constructor (clock, assignment_seconds; SQLite: busy_timeout;
    PostgreSQL: lock_timeout)."""
    backend, where = parse_url(url_or_path)
    if backend == "postgresql":
        return PostgresLabelStore(where, create=create, **options)
    path = Path(where)
    if not create and not path.exists():
        raise UserError(f"no label database at {path} (create one with `rlhf import --db {path} tasks.jsonl`)")
    if not path.parent.exists():
        raise UserError(f"cannot create {path}: folder {path.parent} does not exist")
    return SQLiteLabelStore(path, create=create, **options)
