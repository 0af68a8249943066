"""The label store written once for both backends (`SQLLabelStore`), and the tables it holds.

Here are every rule (validation, the queue, assignments, request-id replay, edits, skips), every query (in one
notation: `?` and `:name` placeholders) and the row <-> record conversion, plus the schema-version rules. A
backend (`labeling.store.sqlite`, `labeling.store.postgres`) supplies its connections and transactions, its
migrations (DDL), and two lock clauses: SQLite serialises writers with one database lock, PostgreSQL locks
the task row a write is about (`SELECT ... FOR UPDATE`; the queue takes the first free task with `FOR UPDATE
SKIP LOCKED`), so several app servers on one database never hand out more places than a task has.

Durability: every write is one transaction, committed before the method returns, so a kill -9 afterwards loses
nothing (SQLite: WAL with `synchronous=FULL`; PostgreSQL: its WAL, fsync'd at COMMIT). The event log is
append-only, enforced by the database (triggers refuse UPDATE and DELETE).

Assignments: `next_task` hands a task to an annotator and records it in the `assignments` table (annotator,
task, overlap, expiry), in the same transaction that chose it. A live assignment holds one of the task's
`overlap` places, so annotators working at the same time never push a task past its overlap; after
`ASSIGNMENT_SECONDS` the place may go to someone else. The app submits with `require_assignment=True`: a
ranking is accepted only for a task handed to this annotator (after the expiry too, while the task still has
a free place) or as an edit of their own ranking. A ranking or a skip ends the assignment.

Accounts and sessions: the store keeps the rows (name, password hash, role, disabled flag; sessions by the hash
of their token); the rules, the hashing and the sign-in check are `labeling.auth`'s. Sessions live in the
database, so every app server on it knows every session.

Privacy: the methods a request handler uses take the signed-in annotator's name and only ever return that
annotator's own work (`get_own_ranking`, `history`). Everyone's rankings are reachable only through the
explicitly named admin methods `export_ranked_tasks` / `export_rankings`, used by the CLI and the admin view.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from labeling.store.errors import (
    Account,
    AnnotatorExists,
    AnnotatorProgress,
    Assignment,
    ConflictingTask,
    HistoryItem,
    InvalidRanking,
    NotAssigned,
    Progress,
    RequestIdReused,
    SkipResult,
    StoreError,
    SubmitResult,
    UnknownAnnotator,
    UnknownTask,
)
from rlhf.errors import UserError
from rlhf.pairs import proposal_moves
from rlhf.records import Completion, RankedTask, Ranking, Task, decode_prompt, encode_prompt, is_text, last_user_turn

SCHEMA_VERSION = 8
"""1: tasks, completions, annotators, rankings, skips, events. 2: + assignments. 3: + sessions; annotators gain
a role and a disabled flag; tasks count their rankings (`ranking_count`, kept by `submit_ranking`). 4: +
login_failures (failed sign-ins per account and per address, shared by every app server on the database). 5: tasks
gain `gold` (a known answer: JSON ranks) and `gold_from` (the annotator whose ranking it was, if any). 6: +
resolutions (an admin's resolved ranking of a task); events gain the kind 'resolve'. 7: + drafts (an annotator's
partial ranking of a task, kept until they submit or skip it). 8: rankings gain `comment` and `flags`, skips
`flags` (JSON lists of flag names; a skip's comment is its reason)."""
ROLES = ("annotator", "admin")
MAX_REQUEST_ID_LENGTH = 128
MAX_COMMENT_LENGTH = 500
"""The longest comment on a ranking, or reason of a skip, in characters."""
MAX_FLAGS = 20
"""The most flags one ranking or skip may carry."""
FLAG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
"""A flag's name: 1-40 lower-case letters, digits, '-' or '_' ("unsafe", "broken-prompt")."""
PREVIEW_CHARS = 80
MAX_SECONDS = 365 * 24 * 3600
"""The most time on a task a client may report (anything larger is a broken or hostile client)."""
ASSIGNMENT_SECONDS = 30 * 60
"""How long a served task stays reserved for its annotator before its place may go to someone else."""
MAX_HELD = 3
"""The most tasks one annotator may hold (live assignments) at a time: one who opens tasks without answering them
cannot take more places than this from everyone else."""


# ---------------------------------------------------------------------------------------- pure helpers

def display_order(annotator: str, task_id: str, completion_ids: Iterable[str]) -> list[str]:
    """The order one annotator sees a task's completions in: a shuffle seeded by (annotator, task),
    so it is stable across calls and processes but differs between annotators and tasks. Showing
    every annotator the same order would let position bias leak into the labels."""
    def key(cid: str) -> str:
        return hashlib.sha256(f"{annotator}\x00{task_id}\x00{cid}".encode()).hexdigest()
    return sorted(completion_ids, key=key)


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") >> 1


def queue_key(annotator: str, task_id: str) -> int:
    """The queue's tie-break among tasks with equally few rankings (smallest first): a per-task hash XOR a
    per-annotator hash. Deterministic, yet annotators working at the same time are mostly served different
    tasks, so the overlap is not overshot by everyone opening the file's first task. Computed in SQL from
    the stored `tasks.queue_key` (a ^ b = (a | b) - (a & b): SQLite has no XOR operator)."""
    return _hash63(task_id) ^ _hash63(annotator)


def _preview(stored_prompt: str) -> str:
    """A stored prompt on one line; a conversation by its last user turn (the one its completions answer)."""
    text = " ".join(last_user_turn(decode_prompt(stored_prompt)).split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def storable(value: Any) -> bool:
    """Whether `value` is text every backend can store: valid Unicode (JSON's "\\ud800" escapes decode to lone
    surrogates) without NUL characters (PostgreSQL's text cannot hold them)."""
    return is_text(value) and "\x00" not in value


def _task_fingerprint(task: Task) -> str:
    prompt = [task.prompt] if isinstance(task.prompt, str) else [m.content for m in task.prompt]
    texts = [task.id, *prompt] + [text for c in task.completions for text in (c.id, c.text, c.model)]
    if not all(is_text(text) for text in texts):
        raise StoreError(f"task {task.id!r} contains text that is not valid Unicode (a lone surrogate)")
    if any("\x00" in text for text in texts):
        raise StoreError(f"task {task.id!r} contains a NUL character, which the label store cannot hold")
    return hashlib.sha256(json.dumps(task.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_request_id(request_id: str | None) -> None:
    if request_id is not None and (not storable(request_id) or not request_id
                                   or len(request_id) > MAX_REQUEST_ID_LENGTH):
        raise InvalidRanking(f"request id must be a non-empty string of at most {MAX_REQUEST_ID_LENGTH} characters")


def _check_task_id(task_id: str) -> None:
    if not storable(task_id):
        raise UnknownTask(f"unknown task {task_id!r}")


def check_comment(comment: Any, what: str = "comment") -> str | None:
    """A comment (or skip reason) as stored: text of at most MAX_COMMENT_LENGTH characters, or None; InvalidRanking
    otherwise (the whole answer is refused: nothing is cut short)."""
    if comment is not None and (not storable(comment) or len(comment) > MAX_COMMENT_LENGTH):
        raise InvalidRanking(f"{what} must be text of at most {MAX_COMMENT_LENGTH} characters")
    return comment


def check_flags(flags: Any) -> tuple[str, ...]:
    """Flag names as stored: distinct names (FLAG_NAME), at most MAX_FLAGS, sorted; InvalidRanking otherwise. Which
    names a server accepts is its own setting (`rlhf label --flags`, checked by `labeling.handlers`)."""
    if isinstance(flags, (str, bytes)) or not isinstance(flags, (list, tuple, set, frozenset)):
        raise InvalidRanking("flags must be a list of flag names")
    if len(flags) > MAX_FLAGS:
        raise InvalidRanking(f"at most {MAX_FLAGS} flags")
    bad = next((f for f in flags if not isinstance(f, str) or not FLAG_NAME.fullmatch(f)), None)
    if bad is not None:
        raise InvalidRanking(f"{str(bad)[:50]!r} is not a flag name (1-40 lower-case letters, digits, '-', '_')")
    return tuple(sorted(set(flags)))


def _float(value) -> float | None:
    return None if value is None else float(value)


# ------------------------------------------------------------------------------- rows <-> records

def _ranking(task_id: str, annotator: str, ranks: str, seconds, request_id, created_at, updated_at, comment,
             flags) -> Ranking:
    return Ranking(task_id, annotator, json.loads(ranks), _float(seconds), request_id, _float(created_at),
                   _float(updated_at), comment, tuple(json.loads(flags)))


def _account(name, password_hash, role, disabled, created_at) -> Account:
    return Account(name, password_hash, role, bool(disabled), float(created_at))


# ------------------------------------------------------------------------------------------------ tables

@dataclass(frozen=True)
class CopiedTable:
    """A table `rlhf db copy` carries over: its columns, the order that makes a dump deterministic, and how a
    stored value becomes the one canonical Python value both backends agree on (for the checksum)."""

    name: str
    columns: tuple[str, ...]
    order_by: str
    convert: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)

    def canonical(self, row: tuple) -> tuple:
        return tuple(self.convert[c](v) if c in self.convert and v is not None else v
                     for c, v in zip(self.columns, row))


COPIED_TABLES = (
    CopiedTable("tasks", ("seq", "id", "prompt", "fingerprint", "queue_key", "created_at", "ranking_count", "gold",
                          "gold_from"), "seq",
                {"created_at": float}),
    CopiedTable("completions", ("task_id", "position", "id", "text", "model", "num_tokens"), "task_id, position"),
    CopiedTable("annotators", ("name", "password_hash", "role", "disabled", "created_at"), "name",
                {"disabled": bool, "created_at": float}),
    CopiedTable("rankings", ("annotator", "task_id", "ranks", "seconds", "request_id", "created_at", "updated_at",
                             "comment", "flags"),
                "annotator, task_id", {"seconds": float, "created_at": float, "updated_at": float}),
    CopiedTable("skips", ("annotator", "task_id", "reason", "created_at", "flags"), "annotator, task_id",
                {"created_at": float}),
    CopiedTable("assignments", ("annotator", "task_id", "overlap", "assigned_at", "expires_at"), "annotator, task_id",
                {"assigned_at": float, "expires_at": float}),
    CopiedTable("drafts", ("annotator", "task_id", "ranks", "updated_at"), "annotator, task_id",
                {"updated_at": float}),
    CopiedTable("resolutions", ("task_id", "ranks", "resolved_by", "resolved_at"), "task_id",
                {"resolved_at": float}),
    CopiedTable("events", ("id", "at", "annotator", "task_id", "kind", "payload", "request_id"), "id", {"at": float}),
)
"""Everything a label store holds, in an order that satisfies the foreign keys. Sign-in sessions and failed
sign-ins are not copied: after a copy everyone signs in again."""
LABEL_TABLES = tuple(t.name for t in COPIED_TABLES) + ("sessions", "login_failures")

COUNT_RANKINGS = (
    "ALTER TABLE tasks ADD COLUMN ranking_count INTEGER NOT NULL DEFAULT 0",
    "UPDATE tasks SET ranking_count = (SELECT COUNT(*) FROM rankings r WHERE r.task_id = tasks.id)",
)
"""Schema 3's counter of rankings per task, in SQL both backends read alike."""
DRAFTS = (
    """CREATE TABLE drafts (
        annotator TEXT NOT NULL REFERENCES annotators(name),
        task_id TEXT NOT NULL REFERENCES tasks(id),
        ranks TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (annotator, task_id))""",
)
"""Schema 7's drafts (`SQLLabelStore.save_draft`), in SQL both backends read alike: JSON {completion id: rank} of
the completions ranked so far."""
GOLD_COLUMNS = (
    "ALTER TABLE tasks ADD COLUMN gold TEXT",  # NULL: an ordinary task
    "ALTER TABLE tasks ADD COLUMN gold_from TEXT",
    "CREATE INDEX tasks_gold ON tasks(seq) WHERE gold IS NOT NULL",
)
"""Schema 5's gold questions (`SQLLabelStore.set_gold`), in SQL both backends read alike."""
COMMENTS_AND_FLAGS = (
    "ALTER TABLE rankings ADD COLUMN comment TEXT",
    "ALTER TABLE rankings ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'",  # JSON list of flag names, sorted
    "ALTER TABLE skips ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'",
)
"""Schema 8's comments and flags (`SQLLabelStore.submit_ranking`, `skip_task`), in SQL both backends read alike."""


# ------------------------------------------------------------------------------ the shared SQL store

class Statements:
    """A connection as the store's shared code uses it: statements in one notation (`?` and `:name`
    placeholders), translated by `translate` for the backend's driver; rows come back as tuples."""

    def __init__(self, conn, translate: Callable[[str], str] = lambda sql: sql):
        self.conn, self._translate = conn, translate

    def execute(self, sql: str, params: Any = ()):
        return self.conn.execute(self._translate(sql), params)

    def one(self, sql: str, params: Any = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Any = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def value(self, sql: str, params: Any = ()):
        row = self.one(sql, params)
        return None if row is None else row[0]

    def many(self, sql: str, rows: Iterable[tuple]) -> None:
        self.conn.cursor().executemany(self._translate(sql), list(rows))


class SQLLabelStore:
    """The label store that the app, the simulator, export, stats and the copy use: all of its rules and queries,
    written once for SQL databases. A backend subclass supplies `_write()` (one write transaction), `_read()`
    (single statements), `_snapshot()` (a consistent read transaction), its `MIGRATIONS` and the lock clauses
    below; `close()` closes the connections it keeps."""

    backend = ""
    location = ""
    """Where the store is, for messages (a path, or a URL without its password)."""
    MIGRATIONS: Mapping[int, tuple[str, ...]] = {}
    """Schema version -> the statements that bring a store of the version before it to this one."""
    _LOCK_TASK = ""
    """Appended to the statement that looks a task (or a sign-in counter) up before a write about it: a row lock
    where writers do not already hold a lock on the whole database."""
    _LOCK_ANNOTATOR = ""
    """Appended to the look-up of an annotator whose holds are counted: a row lock that leaves foreign-key checks
    (rankings, sessions) free to go on."""
    _PICK_LOCK = ""
    """Appended to the queue's choice of a task: lock it, passing over tasks that other writers hold."""
    _TABLE_EXISTS = ""
    """A query with one placeholder (a table name) that returns a row if the table exists."""

    def __init__(self, *, clock: Callable[[], float], assignment_seconds: float):
        self._clock = clock
        self._assignment_seconds = assignment_seconds
        self.gold_draw: Callable[[], float] = random.random
        """Draws the number in [0, 1) that decides whether `next_task` serves a gold question (tests replace it)."""

    # --- hooks (the backend's)

    @contextmanager
    def _write(self) -> Iterator[Statements]:  # pragma: no cover - every backend overrides it
        raise NotImplementedError
        yield

    @contextmanager
    def _read(self) -> Iterator[Statements]:  # pragma: no cover
        raise NotImplementedError
        yield

    @contextmanager
    def _snapshot(self) -> Iterator[Statements]:  # pragma: no cover
        raise NotImplementedError
        yield

    def _lock_schema(self, tx: Statements) -> None:
        """Keep two processes from migrating at once (a no-op where the write transaction locks everything)."""

    def _after_copy(self, tx: Statements) -> None:
        """Bring generated-id counters past the ids a copy wrote (a no-op where the database does it itself)."""

    def close(self) -> None:
        """Close every connection this store opened (in any thread); each backend keeps them in
        `_connections` under `_lock`, one per thread in `_local`."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- schema

    def _open_schema(self, create: bool) -> None:
        """Check the schema version and apply the missing migrations in one transaction: a store written by a
        newer version is refused, and so (with create=False) is a database that holds no label store; either
        way nothing is written."""
        with self._write() as tx:
            self._lock_schema(tx)
            current = self._schema_version(tx)
            if current > SCHEMA_VERSION:
                raise UserError(f"{self.location} was written by a newer version of rlhf (schema {current}, this "
                                f"one reads up to {SCHEMA_VERSION}); upgrade rlhf")
            if current == 0 and not create:
                raise UserError(f"{self.location} holds no label store (create one with "
                                f"`rlhf import --db {self.location} tasks.jsonl`)")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in self.MIGRATIONS[version]:
                    tx.execute(statement)
            if current != SCHEMA_VERSION:
                tx.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE"
                           " SET value = excluded.value", (str(SCHEMA_VERSION),))

    def _schema_version(self, tx: Statements) -> int:
        if tx.one(self._TABLE_EXISTS, ("meta",)) is None:
            return 0
        value = tx.value("SELECT value FROM meta WHERE key = 'schema_version'")
        return 0 if value is None else int(value)

    def schema_version(self) -> int:
        with self._read() as tx:
            return self._schema_version(tx)

    # --- tasks

    def import_tasks(self, tasks: Iterable[Task], gold: Mapping[str, Mapping[str, int]] | None = None
                     ) -> tuple[int, int]:
        """Add tasks in one transaction; returns (added, skipped). A task whose id is already stored with
        the same content is skipped (re-importing a file adds nothing twice); the same id with different
        content raises ConflictingTask naming the id, and then nothing of this call is stored. `gold`: the known
        answer of some of the tasks, {task id: {completion id: rank}} (see `set_gold`; an invalid one is an
        InvalidRanking naming the task, and nothing is stored)."""
        added = skipped = 0
        now = self._clock()
        gold = dict(gold or {})
        with self._write() as tx:
            for task in tasks:
                fingerprint = _task_fingerprint(task)
                inserted = tx.execute("INSERT INTO tasks (id, prompt, fingerprint, queue_key, created_at)"
                                      " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                                      (task.id, encode_prompt(task.prompt), fingerprint, _hash63(task.id),
                                       now)).rowcount
                if not inserted:
                    if tx.value("SELECT fingerprint FROM tasks WHERE id = ?", (task.id,)) != fingerprint:
                        raise ConflictingTask(f"task id {task.id!r} is already stored with different content")
                    skipped += 1
                else:
                    tx.many("INSERT INTO completions (task_id, position, id, text, model, num_tokens)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            [(task.id, i, c.id, c.text, c.model, c.num_tokens) for i, c in enumerate(task.completions)])
                    added += 1
                if task.id in gold:
                    self._store_gold(tx, task.id, gold.pop(task.id), None, [c.id for c in task.completions])
            if gold:
                raise UnknownTask(f"gold answer for task {next(iter(gold))!r}, which is not among the tasks imported")
        return added, skipped

    # --- gold questions

    def set_gold(self, task_id: str, ranks: Mapping[str, int] | None, *, source: str | None = None) -> None:
        """Make a task a gold question with this known answer (dense ranks over its completions, ties allowed,
        not all tied), or an ordinary task again (ranks None). A gold task is served to every annotator at the
        server's gold rate, whatever the overlap, never exported as training data, and each ranking of it is
        scored against the answer (`labeling.stats.gold_agreement`). `source`: the annotator whose ranking the
        answer is (their own ranking of it is then not scored). InvalidRanking / UnknownTask / UnknownAnnotator."""
        _check_task_id(task_id)
        with self._write() as tx:
            if not self._lock_task(tx, task_id):
                raise UnknownTask(f"unknown task {task_id!r}")
            if ranks is None:
                tx.execute("UPDATE tasks SET gold = NULL, gold_from = NULL WHERE id = ?", (task_id,))
                return
            if source is not None:
                self._require_annotator(tx, source)
            ids = [r[0] for r in tx.all("SELECT id FROM completions WHERE task_id = ? ORDER BY position", (task_id,))]
            self._store_gold(tx, task_id, ranks, source, ids)

    def _store_gold(self, tx: Statements, task_id: str, ranks: Mapping[str, int], source: str | None,
                    completion_ids: list[str]) -> None:
        try:
            dense = Ranking.normalized(ranks, completion_ids)
        except (ValueError, TypeError) as exc:
            raise InvalidRanking(f"gold answer of task {task_id!r}: {exc}") from None
        tx.execute("UPDATE tasks SET gold = ?, gold_from = ? WHERE id = ?",
                   (json.dumps(dense, ensure_ascii=False), source, task_id))

    def gold_answers(self) -> dict[str, tuple[dict[str, int], str | None]]:
        """ADMIN/CLI ONLY: {task id: (its gold answer, the annotator it came from or None)}, in import order."""
        with self._read() as tx:
            return {task_id: (json.loads(gold), source) for task_id, gold, source in tx.all(
                "SELECT id, gold, gold_from FROM tasks WHERE gold IS NOT NULL ORDER BY seq")}

    def get_task(self, task_id: str) -> Task:
        """The task with this id, completions in their stored (generation) order; UnknownTask if absent."""
        _check_task_id(task_id)
        with self._read() as tx:
            prompt = tx.value("SELECT prompt FROM tasks WHERE id = ?", (task_id,))
            if prompt is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            completions = tuple(Completion(id=cid, text=text, model=model, num_tokens=num_tokens)
                                for cid, text, model, num_tokens in tx.all(
                                    "SELECT id, text, model, num_tokens FROM completions WHERE task_id = ?"
                                    " ORDER BY position", (task_id,)))
        return Task(id=task_id, prompt=decode_prompt(prompt), completions=completions)

    def count_tasks(self) -> int:
        """Number of tasks in the store."""
        with self._read() as tx:
            return tx.value("SELECT COUNT(*) FROM tasks")

    def task_ids(self) -> list[str]:
        """Every task id, in import order (active labeling scores them all: `labeling.active`)."""
        with self._read() as tx:
            return [row[0] for row in tx.all("SELECT id FROM tasks ORDER BY seq")]

    def task_for(self, annotator: str, task_id: str) -> Task:
        """The task with its completions in this annotator's display order (see `display_order`)."""
        task = self.get_task(task_id)
        by_id = {c.id: c for c in task.completions}
        return Task(task.id, task.prompt, tuple(by_id[c] for c in display_order(annotator, task.id, by_id)))

    # --- annotators

    def add_annotator(self, name: str, *, password_hash: str | None = None, role: str = "annotator") -> None:
        """Store a new annotator (`labeling.auth.add_annotator` checks the name and hashes the password); no
        password hash makes an account that cannot sign in (scripted annotators). AnnotatorExists if taken."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self._write() as tx:
            if not tx.execute("INSERT INTO annotators (name, password_hash, role, disabled, created_at)"
                              " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                              (name, password_hash, role, False, self._clock())).rowcount:
                raise AnnotatorExists(f"annotator {name!r} already exists")

    def has_annotator(self, name: str) -> bool:
        """Whether an annotator with this name exists."""
        return self.account(name) is not None

    def account(self, name: str) -> Account | None:
        """The annotator's account row, or None for an unknown name."""
        if not storable(name):
            return None
        with self._read() as tx:
            row = tx.one("SELECT name, password_hash, role, disabled, created_at FROM annotators WHERE name = ?",
                         (name,))
        return None if row is None else _account(*row)

    def accounts(self) -> list[Account]:
        """Every account, sorted by name."""
        with self._read() as tx:
            return [_account(*row) for row in tx.all(
                "SELECT name, password_hash, role, disabled, created_at FROM annotators ORDER BY name")]

    def password_hash(self, name: str) -> str | None:
        """The annotator's stored password hash; None for an unknown name or an account that cannot sign in."""
        account = self.account(name)
        return None if account is None else account.password_hash

    def list_annotators(self) -> list[str]:
        """All annotator names, sorted."""
        with self._read() as tx:
            return [r[0] for r in tx.all("SELECT name FROM annotators ORDER BY name")]

    def set_password_hash(self, name: str, password_hash: str | None) -> int:
        """Replace the annotator's password hash and end their sessions (a new password signs them out
        everywhere); returns the number of sessions ended. UnknownAnnotator for an unknown name."""
        with self._write() as tx:
            self._update_account(tx, name, "password_hash", password_hash)
            return tx.execute("DELETE FROM sessions WHERE annotator = ?", (name,)).rowcount

    def set_disabled(self, name: str, disabled: bool) -> int:
        """Disable (no sign-in, and every session of theirs ends) or enable an account; returns the number of
        sessions ended. UnknownAnnotator for an unknown name."""
        with self._write() as tx:
            self._update_account(tx, name, "disabled", bool(disabled))
            return tx.execute("DELETE FROM sessions WHERE annotator = ?", (name,)).rowcount if disabled else 0

    def set_role(self, name: str, role: str) -> None:
        """Make the account an 'annotator' or an 'admin'. UnknownAnnotator for an unknown name."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self._write() as tx:
            self._update_account(tx, name, "role", role)

    def _update_account(self, tx: Statements, name: str, column: str, value) -> None:
        if not storable(name) or not tx.execute(f"UPDATE annotators SET {column} = ? WHERE name = ?",
                                                (value, name)).rowcount:
            raise UnknownAnnotator(f"unknown annotator {name!r}")

    def _require_annotator(self, tx: Statements, annotator: str, *, lock: bool = False) -> None:
        """UnknownAnnotator unless the annotator exists; with `lock`, their row is locked for the rest of the
        transaction where the backend needs it (the writes that count their holds happen one after another)."""
        if not storable(annotator) or tx.one("SELECT 1 FROM annotators WHERE name = ?"
                                             + (self._LOCK_ANNOTATOR if lock else ""), (annotator,)) is None:
            raise UnknownAnnotator(f"unknown annotator {annotator!r}")

    # --- sessions (rows only: labeling.auth.Sessions decides)

    def add_session(self, token_hash: str, annotator: str, now: float, expires_at: float) -> None:
        """Store a session (by the hash of its token), dropping every session that expired by `now`."""
        with self._write() as tx:
            tx.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            tx.execute("INSERT INTO sessions (token_hash, annotator, created_at, expires_at) VALUES (?, ?, ?, ?)",
                       (token_hash, annotator, now, expires_at))

    def find_session(self, token_hash: str) -> tuple[str, float] | None:
        """(annotator, expires_at) of the session with this token hash, or None (unknown, or its account is
        disabled). Whether it expired is the caller's to check."""
        with self._read() as tx:
            row = tx.one("SELECT s.annotator, s.expires_at FROM sessions s JOIN annotators a ON a.name = s.annotator"
                         " WHERE s.token_hash = ? AND NOT a.disabled", (token_hash,))
        return None if row is None else (row[0], float(row[1]))

    def renew_session(self, token_hash: str, expires_at: float) -> None:
        with self._write() as tx:
            tx.execute("UPDATE sessions SET expires_at = ? WHERE token_hash = ?", (expires_at, token_hash))

    def end_session(self, token_hash: str) -> None:
        with self._write() as tx:
            tx.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    def end_sessions(self, annotator: str) -> int:
        """End every session of this annotator; returns how many. UnknownAnnotator for an unknown name."""
        with self._write() as tx:
            self._require_annotator(tx, annotator)
            return tx.execute("DELETE FROM sessions WHERE annotator = ?", (annotator,)).rowcount

    # --- failed sign-ins (rows only: labeling.auth.LoginThrottle decides)

    def count_login_attempt(self, keys: Iterable[tuple[str, str]], now: float, forget_before: float,
                            max_rows: int, wait: Callable[[list[tuple[int, float]]], float]) -> float:
        """One sign-in attempt for these (kind, name) keys, in one transaction: failures older than
        `forget_before` are forgotten, `wait` is given each key's (failures, time of the latest), and unless it
        answers a wait > 0 every key counts one more failure now (taken back by `login_succeeded`). The rows
        of the keys are locked first, so attempts on several servers at once are counted one after another; at
        most `max_rows` rows are kept, the most recent. Returns the wait."""
        keys = sorted(set(keys))
        with self._write() as tx:
            tx.execute("DELETE FROM login_failures WHERE last_at < ?", (forget_before,))
            counts = []
            for kind, name in keys:
                tx.execute("INSERT INTO login_failures (kind, name, failures, last_at) VALUES (?, ?, 0, ?)"
                           " ON CONFLICT (kind, name) DO NOTHING", (kind, name, now))
                failures, last_at = tx.one("SELECT failures, last_at FROM login_failures WHERE kind = ? AND name = ?"
                                           + self._LOCK_TASK, (kind, name))
                counts.append((int(failures), float(last_at)))
            waiting = wait(counts)
            if waiting > 0:
                return waiting
            for kind, name in keys:
                tx.execute("UPDATE login_failures SET failures = failures + 1, last_at = ? WHERE kind = ? AND name = ?",
                           (now, kind, name))
            tx.execute("DELETE FROM login_failures WHERE last_at <= (SELECT last_at FROM login_failures"
                       " ORDER BY last_at DESC LIMIT 1 OFFSET ?)", (max_rows,))
        return 0.0

    def login_succeeded(self, account: tuple[str, str], address: tuple[str, str]) -> None:
        """A sign-in succeeded: forget the account key's failures and take one back from the address key."""
        with self._write() as tx:
            tx.execute("DELETE FROM login_failures WHERE kind = ? AND name = ?", account)
            tx.execute("UPDATE login_failures SET failures = failures - 1 WHERE kind = ? AND name = ?", address)
            tx.execute("DELETE FROM login_failures WHERE kind = ? AND name = ? AND failures <= 0", address)

    def login_failures(self) -> dict[tuple[str, str], int]:
        """ADMIN/CLI ONLY: the failed sign-ins counted now, per (kind, name)."""
        with self._read() as tx:
            return {(kind, name): int(n) for kind, name, n in tx.all(
                "SELECT kind, name, failures FROM login_failures ORDER BY kind, name")}

    # --- the queue

    # Tasks this annotator may be served: not ranked or skipped by them, and with a free place, i.e. fewer
    # than :overlap rankings plus live assignments of other annotators. The rankings are counted in
    # tasks.ranking_count, and the annotator's own rankings and skips and the live assignments are few, so the
    # queue costs one pass over the tasks with a lookup in three small sets.
    _HELD = """(SELECT COUNT(*) FROM assignments h WHERE h.task_id = t.id AND h.expires_at > :now
                AND h.annotator <> :annotator)"""
    _PENDING = """
        FROM tasks t
        LEFT JOIN (SELECT task_id, COUNT(*) AS n FROM assignments WHERE expires_at > :now AND annotator <> :annotator
                   GROUP BY task_id) h ON h.task_id = t.id
        WHERE t.ranking_count + COALESCE(h.n, 0) < :overlap AND t.gold IS NULL
          AND t.id NOT IN (SELECT task_id FROM rankings WHERE annotator = :annotator)
          AND t.id NOT IN (SELECT task_id FROM skips WHERE annotator = :annotator)
    """

    def next_task(self, annotator: str, overlap: int, *, max_held: int = MAX_HELD, gold_rate: float = 0.0
                  ) -> Task | None:
        """The next task for this annotator, completions in their display order; None when nothing is left.
        The task is assigned to them (recorded in the store, expiring after `assignment_seconds`). Holds of theirs
        on tasks that filled up meanwhile are dropped first; None also when they hold `max_held` live
        assignments that cannot be served (never in practice: a held task that is open comes first).

        Serves the task already assigned to this annotator if it is still open to them (a reload shows the same
        task), else the tasks with the fewest rankings first, only tasks with a free place (fewer than `overlap`
        rankings plus other annotators' live assignments), never one this annotator already ranked or skipped.
        Ties are broken by `queue_key(annotator, task_id)` (deterministic: the same call returns the same task
        until something changes). The choice is locked (`_PICK_LOCK`) and its room checked again with what
        other writers committed meanwhile, so servers sharing the database never hand out the same place.

        Gold questions (`set_gold`) are not in that queue: with probability `gold_rate` (drawn by `gold_draw`)
        a new task is instead a gold question this annotator has not answered, served like any other (blind)
        and held until answered; never when no ordinary task is left for them."""
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        if not 0 <= gold_rate <= 1:
            raise ValueError("gold_rate must be from 0 to 1")
        with self._write() as tx:
            self._require_annotator(tx, annotator, lock=True)
            now = self._clock()
            params: dict[str, Any] = {"overlap": overlap, "annotator": annotator, "salt": _hash63(annotator),
                                      "now": now}
            self._release_full_holds(tx, annotator, overlap, now)
            gold = tx.value("SELECT a.task_id FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.annotator = ?"
                            " AND t.gold IS NOT NULL ORDER BY a.assigned_at LIMIT 1", (annotator,))
            if gold is not None:  # a gold question served before and not answered yet: the same again
                self._assign(tx, annotator, gold, overlap, now)
                return self.task_for(annotator, gold)
            passed: list[str] = []  # chosen, but full once locked (another server filled it meanwhile)
            while True:
                exclude = "".join(f" AND t.id <> :passed{i}" for i in range(len(passed)))
                task_id = tx.value(
                    f"""SELECT t.id {self._PENDING} {exclude} ORDER BY
                            t.id IN (SELECT task_id FROM assignments WHERE annotator = :annotator) DESC,
                            t.ranking_count, (t.queue_key | :salt) - (t.queue_key & :salt), t.seq
                        LIMIT 1 {self._PICK_LOCK}""",
                    {**params, **{f"passed{i}": p for i, p in enumerate(passed)}})
                if task_id is None:
                    return None
                if self._has_room(tx, annotator, task_id, overlap, now):
                    break
                passed.append(task_id)
            held = tx.one("SELECT 1 FROM assignments WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            if not held and gold_rate > 0 and self.gold_draw() < gold_rate:
                task_id = tx.value(
                    """SELECT t.id FROM tasks t WHERE t.gold IS NOT NULL
                         AND t.id NOT IN (SELECT task_id FROM rankings WHERE annotator = :annotator)
                         AND t.id NOT IN (SELECT task_id FROM skips WHERE annotator = :annotator)
                       ORDER BY (t.queue_key | :salt) - (t.queue_key & :salt), t.seq LIMIT 1""", params) or task_id
            if not self._may_hold(tx, annotator, task_id, max_held, now):
                return None
            self._assign(tx, annotator, task_id, overlap, now)
        return self.task_for(annotator, task_id)

    def assign_task(self, annotator: str, task_id: str, overlap: int, *, max_held: int = MAX_HELD) -> bool:
        """Hand this task to this annotator if it is open to them (see `next_task`; active labeling's queue uses
        it). Returns whether they may now submit a ranking of it: True also for a task they already ranked (an
        edit), False when its places are taken or they already hold `max_held` other live assignments."""
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        _check_task_id(task_id)
        with self._write() as tx:
            self._require_annotator(tx, annotator, lock=True)
            if not self._lock_task(tx, task_id):
                raise UnknownTask(f"unknown task {task_id!r}")
            if self._own_ranking(tx, annotator, task_id) is not None:
                return True
            now = self._clock()
            if not self._has_room(tx, annotator, task_id, overlap, now) \
                    or not self._may_hold(tx, annotator, task_id, max_held, now):
                return False
            self._assign(tx, annotator, task_id, overlap, now)
        return True

    def _may_hold(self, tx: Statements, annotator: str, task_id: str, max_held: int, now: float) -> bool:
        """Whether this annotator holds fewer than `max_held` live assignments besides this task's (their row is
        locked by the caller, so two servers cannot both hand them one more)."""
        if max_held < 1:
            raise ValueError("max_held must be at least 1")
        return tx.value("SELECT COUNT(*) FROM assignments WHERE annotator = ? AND task_id <> ? AND expires_at > ?",
                        (annotator, task_id, now)) < max_held

    def _release_full_holds(self, tx: Statements, annotator: str, overlap: int, now: float) -> None:
        """Drop this annotator's assignments of tasks that others have filled meanwhile (their hold had expired):
        such a hold can no longer be answered and would only count against `max_held`."""
        tx.execute(f"""DELETE FROM assignments WHERE annotator = :annotator AND task_id IN (
                           SELECT t.id FROM tasks t JOIN assignments a ON a.task_id = t.id AND a.annotator = :annotator
                           WHERE t.gold IS NULL AND t.ranking_count + {self._HELD} >= :overlap)""",
                   {"annotator": annotator, "overlap": overlap, "now": now})

    def _lock_task(self, tx: Statements, task_id: str) -> bool:
        """Whether the task exists; locks its row for the rest of the transaction where the backend needs it
        (every write about a task's places takes this lock first, so they happen one after another)."""
        return tx.one("SELECT 1 FROM tasks WHERE id = ?" + self._LOCK_TASK, (task_id,)) is not None

    def _assign(self, tx: Statements, annotator: str, task_id: str, overlap: int, now: float) -> None:
        tx.execute("INSERT INTO assignments (annotator, task_id, overlap, assigned_at, expires_at)"
                   " VALUES (?, ?, ?, ?, ?) ON CONFLICT (annotator, task_id) DO UPDATE"
                   " SET overlap = excluded.overlap, expires_at = excluded.expires_at",
                   (annotator, task_id, overlap, now, now + self._assignment_seconds))

    def _has_room(self, tx: Statements, annotator: str, task_id: str, overlap: int, now: float) -> bool:
        """Whether the task has a place for this annotator: fewer than `overlap` rankings plus other annotators'
        live assignments (a gold question has a place for everyone)."""
        gold, taken = tx.one(f"SELECT t.gold IS NOT NULL, t.ranking_count + {self._HELD} FROM tasks t"
                             " WHERE t.id = :task", {"task": task_id, "annotator": annotator, "now": now})
        return bool(gold) or taken < overlap

    def _check_assigned(self, tx: Statements, annotator: str, task_id: str, now: float,
                        overlap: int | None = None) -> None:
        """NotAssigned unless the task was handed to this annotator and, if that assignment expired, still
        has a place for them (a late answer is welcome while nobody else took its place). A task they skipped
        needs no assignment, only a free place at `overlap` (reopening it from the history holds no place)."""
        row = tx.one("SELECT overlap, expires_at FROM assignments WHERE annotator = ? AND task_id = ?",
                     (annotator, task_id))
        if row is None and overlap is not None and tx.one(
                "SELECT 1 FROM skips WHERE annotator = ? AND task_id = ?", (annotator, task_id)):
            if not self._has_room(tx, annotator, task_id, overlap, now):
                raise NotAssigned(f"task {task_id!r} has no free place any more (others are ranking it); "
                                  "nothing was stored")
            return
        if row is None:
            raise NotAssigned(f"task {task_id!r} was not handed to you; nothing was stored "
                              "(rank the tasks the app serves you, or edit your own earlier rankings)")
        overlap, expires_at = row
        if expires_at <= now and not self._has_room(tx, annotator, task_id, overlap, now):
            raise NotAssigned(f"your hold on task {task_id!r} expired and other annotators have taken its places; "
                              "nothing was stored (go on with the next task)")

    def remaining(self, annotator: str, overlap: int) -> int:
        """How many tasks `next_task` could still serve this annotator at this overlap."""
        with self._read() as tx:
            self._require_annotator(tx, annotator)
            return tx.value(f"SELECT COUNT(*) {self._PENDING}",
                            {"overlap": overlap, "annotator": annotator, "now": self._clock()})

    def open_slots(self, overlap: int) -> int:
        """Rankings still wanted to bring every task to `overlap` rankings: sum of max(0, overlap - count)."""
        with self._read() as tx:
            return int(tx.value(
                """SELECT COALESCE(SUM(CASE WHEN ranking_count < :overlap THEN :overlap - ranking_count ELSE 0 END), 0)
                   FROM tasks WHERE gold IS NULL""",
                {"overlap": overlap}))

    # --- submissions

    def submit_ranking(self, annotator: str, task_id: str, ranks: Mapping[str, int], request_id: str | None = None,
                       seconds: float | None = None, *, require_assignment: bool = False,
                       proposal: Mapping[str, int] | None = None, overlap: int | None = None,
                       comment: str | None = None, flags: Iterable[str] = ()) -> SubmitResult:
        """Store this annotator's ranking of a task (dense ranks, 1 best, ties allowed but not all-tied).

        Checks everything itself: unknown annotator/task -> UnknownAnnotator/UnknownTask; ranks that do not
        cover exactly the task's completion ids with positive integers, or all tie -> InvalidRanking; bad
        seconds/request id -> InvalidRanking. A request id this annotator already used for the same task
        stores nothing and returns the current ranking with action 'duplicate'; one used for another task or
        for a skip is a RequestIdReused conflict. With `require_assignment` (the app) a first ranking is
        accepted only for a task assigned to this annotator (see `_check_assigned`; given the server's `overlap`,
        also for a task they skipped that still has a free place), else NotAssigned. Nothing
        is stored on error. A second submit for a task the annotator already ranked replaces it (action
        'edit', logged as an 'edit' event with the previous ranks; `seconds` add up over edits). Ranking a
        task ends its assignment and removes a skip. `proposal`: the order the task was opened with (active
        labeling's pre-ranking, `labeling.active`); a first submit records it in its event, apart from the
        ranking, with whether it was kept and how many pairs were moved. `comment` (at most MAX_COMMENT_LENGTH
        characters) and `flags` (`check_flags`) are stored with the ranking and replaced by an edit; the event
        records them. Returns after COMMIT."""
        _check_request_id(request_id)
        _check_task_id(task_id)
        comment, flags = check_comment(comment), check_flags(flags)
        if seconds is not None:
            # Compared as given: math.isfinite and float() overflow on huge integers.
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
                raise InvalidRanking(f"seconds must be a number from 0 to {MAX_SECONDS}")
            seconds = float(seconds)
        with self._write() as tx:
            self._require_annotator(tx, annotator)
            exists = self._lock_task(tx, task_id)
            if request_id is not None and self._replay(tx, annotator, request_id, task_id, ("submit", "edit")):
                ranking = self._own_ranking(tx, annotator, task_id)
                if ranking is not None:  # always: rankings are never deleted
                    return SubmitResult("duplicate", ranking)
            if not exists:
                raise UnknownTask(f"unknown task {task_id!r}")
            ids = [r[0] for r in tx.all("SELECT id FROM completions WHERE task_id = ? ORDER BY position", (task_id,))]
            try:
                dense = Ranking.normalized(ranks, ids)
            except ValueError as exc:
                raise InvalidRanking(str(exc)) from None
            now = self._clock()
            previous = self._own_ranking(tx, annotator, task_id)
            if require_assignment and previous is None:
                self._check_assigned(tx, annotator, task_id, now, overlap)
            ranks_json = json.dumps(dense, ensure_ascii=False)
            flags_json = json.dumps(list(flags))
            if previous is None:
                action = "submit"
                tx.execute("INSERT INTO rankings (annotator, task_id, ranks, seconds, request_id, created_at,"
                           " updated_at, comment, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (annotator, task_id, ranks_json, seconds, request_id, now, now, comment, flags_json))
                tx.execute("UPDATE tasks SET ranking_count = ranking_count + 1 WHERE id = ?", (task_id,))
            else:
                action = "edit"
                if previous.seconds is not None:  # time spent accumulates over edits
                    seconds = previous.seconds + (seconds or 0.0)
                tx.execute("UPDATE rankings SET ranks = ?, seconds = ?, request_id = ?, updated_at = ?, comment = ?,"
                           " flags = ? WHERE annotator = ? AND task_id = ?",
                           (ranks_json, seconds, request_id, now, comment, flags_json, annotator, task_id))
            tx.execute("DELETE FROM skips WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            tx.execute("DELETE FROM assignments WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            tx.execute("DELETE FROM drafts WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            payload = {"ranks": dense, "seconds": seconds, "comment": comment, "flags": list(flags)}
            if previous is not None:
                payload.update(previous=previous.ranks, previous_comment=previous.comment,
                               previous_flags=list(previous.flags))
            elif proposal is not None:
                try:
                    shown = Ranking.normalized(proposal, ids)
                except ValueError as exc:
                    raise InvalidRanking(f"proposal: {exc}") from None
                moves = proposal_moves(shown, dense)
                payload.update(proposal=shown, proposal_kept=moves == 0, proposal_moves=moves)
            self._log(tx, now, annotator, task_id, action, payload, request_id)
            stored = self._own_ranking(tx, annotator, task_id)
        return SubmitResult(action, stored)

    def skip_task(self, annotator: str, task_id: str, reason: str | None = None,
                  request_id: str | None = None, *, require_assignment: bool = False,
                  flags: Iterable[str] = ()) -> SkipResult:
        """Record that this annotator skipped a task (it is not served to them again; they can still rank it
        later from their history). Ends their assignment of it, so the place goes to someone else. A task they
        already ranked cannot be skipped (InvalidRanking: edit it instead). With `require_assignment` only a
        task assigned to them (or skipped before) can be skipped, else NotAssigned. Re-sending the request id
        of a skip of the same task returns action 'duplicate' and stores nothing; one used for anything else
        is a RequestIdReused conflict. `reason` is the skip's comment (at most MAX_COMMENT_LENGTH characters);
        `flags` (`check_flags`: a skip with "broken-prompt" tells the admins the task itself is wrong) are stored
        with it and in its event."""
        _check_request_id(request_id)
        _check_task_id(task_id)
        reason, flags = check_comment(reason, "skip reason"), check_flags(flags)
        with self._write() as tx:
            self._require_annotator(tx, annotator)
            exists = self._lock_task(tx, task_id)
            if request_id is not None and self._replay(tx, annotator, request_id, task_id, ("skip",)):
                return SkipResult("duplicate", task_id, annotator)
            if not exists:
                raise UnknownTask(f"unknown task {task_id!r}")
            if self._own_ranking(tx, annotator, task_id) is not None:
                raise InvalidRanking(f"task {task_id!r} is already ranked; edit the ranking instead of skipping")
            if require_assignment and not tx.one(
                    "SELECT 1 FROM assignments WHERE annotator = :a AND task_id = :t"
                    " UNION ALL SELECT 1 FROM skips WHERE annotator = :a AND task_id = :t",
                    {"a": annotator, "t": task_id}):
                raise NotAssigned(f"task {task_id!r} was not handed to you; nothing was stored")
            now = self._clock()
            tx.execute("DELETE FROM assignments WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            tx.execute("DELETE FROM drafts WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            tx.execute("INSERT INTO skips (annotator, task_id, reason, created_at, flags) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (annotator, task_id) DO UPDATE SET reason = excluded.reason,"
                       " created_at = excluded.created_at, flags = excluded.flags",
                       (annotator, task_id, reason, now, json.dumps(list(flags))))
            self._log(tx, now, annotator, task_id, "skip", {"reason": reason, "flags": list(flags)}, request_id)
        return SkipResult("skip", task_id, annotator)

    def _replay(self, tx: Statements, annotator: str, request_id: str, task_id: str, kinds: tuple[str, ...]) -> bool:
        """Whether this annotator already processed this request (same task, same kind of action): then it is
        answered again, not stored twice. A request id reused for another task or another kind of action is
        a RequestIdReused conflict: the client is confused, and answering with the other request's result
        (or storing anything) would be a guess."""
        row = tx.one("SELECT task_id, kind FROM events WHERE annotator = ? AND request_id = ?", (annotator, request_id))
        if row is None:
            return False
        done_task, kind = row
        if done_task != task_id or kind not in kinds:
            raise RequestIdReused(f"request id {request_id!r} was already used for a {kind} of task {done_task!r}; "
                                  "nothing was stored (send a new request id for a new answer)")
        return True

    def _log(self, tx: Statements, at, annotator, task_id, kind, payload, request_id) -> None:
        tx.execute("INSERT INTO events (at, annotator, task_id, kind, payload, request_id) VALUES (?, ?, ?, ?, ?, ?)",
                   (at, annotator, task_id, kind, json.dumps(payload, ensure_ascii=False), request_id))

    # --- drafts (handler-facing: an annotator's own)

    def save_draft(self, annotator: str, task_id: str, ranks: Mapping[str, int]) -> dict[str, int] | None:
        """Keep this annotator's partial ranking of a task (not a ranking: nothing counts it) until they submit or
        skip the task: {completion id: rank} over some of its completions, ranks from 1 to K; an empty one
        removes the draft. InvalidRanking / UnknownTask / UnknownAnnotator. Returns what is stored."""
        _check_task_id(task_id)
        if not isinstance(ranks, Mapping):
            raise InvalidRanking("a draft must map completion ids to ranks")
        with self._write() as tx:
            self._require_annotator(tx, annotator)
            if not self._lock_task(tx, task_id):
                raise UnknownTask(f"unknown task {task_id!r}")
            ids = {r[0] for r in tx.all("SELECT id FROM completions WHERE task_id = ?", (task_id,))}
            unknown = [key for key in ranks if key not in ids]
            if unknown:
                raise InvalidRanking(f"draft names completions the task does not have: {unknown[:3]!r}")
            if not all(type(rank) is int and 1 <= rank <= len(ids) for rank in ranks.values()):
                raise InvalidRanking(f"a draft's ranks must be whole numbers from 1 to {len(ids)}")
            tx.execute("DELETE FROM drafts WHERE annotator = ? AND task_id = ?", (annotator, task_id))
            if not ranks:
                return None
            stored = dict(ranks)
            tx.execute("INSERT INTO drafts (annotator, task_id, ranks, updated_at) VALUES (?, ?, ?, ?)",
                       (annotator, task_id, json.dumps(stored, ensure_ascii=False), self._clock()))
        return stored

    def draft(self, annotator: str, task_id: str) -> dict[str, int] | None:
        """This annotator's own draft of a task, or None."""
        if not storable(annotator) or not storable(task_id):
            return None
        with self._read() as tx:
            ranks = tx.value("SELECT ranks FROM drafts WHERE annotator = ? AND task_id = ?", (annotator, task_id))
        return None if ranks is None else json.loads(ranks)

    # --- review (admin)

    def resolve(self, task_id: str, ranks: Mapping[str, int] | None, admin: str) -> dict[str, int] | None:
        """ADMIN: set the resolved ranking of a task (what `rlhf export --resolve review` turns into its pairs), or
        remove it (ranks None); logged as a 'resolve' event by `admin` with the previous resolution. Returns the
        stored (dense) ranks. InvalidRanking / UnknownTask / UnknownAnnotator; nothing is stored on error."""
        _check_task_id(task_id)
        with self._write() as tx:
            self._require_annotator(tx, admin)
            if not self._lock_task(tx, task_id):
                raise UnknownTask(f"unknown task {task_id!r}")
            ids = [r[0] for r in tx.all("SELECT id FROM completions WHERE task_id = ? ORDER BY position", (task_id,))]
            dense = None
            if ranks is not None:
                try:
                    dense = Ranking.normalized(ranks, ids)
                except (ValueError, TypeError) as exc:
                    raise InvalidRanking(str(exc)) from None
            previous = tx.value("SELECT ranks FROM resolutions WHERE task_id = ?", (task_id,))
            now = self._clock()
            tx.execute("DELETE FROM resolutions WHERE task_id = ?", (task_id,))
            if dense is not None:
                tx.execute("INSERT INTO resolutions (task_id, ranks, resolved_by, resolved_at) VALUES (?, ?, ?, ?)",
                           (task_id, json.dumps(dense, ensure_ascii=False), admin, now))
            self._log(tx, now, admin, task_id, "resolve",
                      {"ranks": dense, "previous": None if previous is None else json.loads(previous)}, None)
        return dense

    def resolutions(self) -> dict[str, tuple[dict[str, int], str, float]]:
        """ADMIN/CLI ONLY: {task id: (resolved ranks, the admin, when)}, in task import order."""
        with self._read() as tx:
            return {task_id: (json.loads(ranks), admin, float(at)) for task_id, ranks, admin, at in tx.all(
                "SELECT r.task_id, r.ranks, r.resolved_by, r.resolved_at FROM resolutions r"
                " JOIN tasks t ON t.id = r.task_id ORDER BY t.seq")}

    # --- an annotator's own work (handler-facing)

    def _own_ranking(self, tx: Statements, annotator: str, task_id: str) -> Ranking | None:
        row = tx.one("SELECT ranks, seconds, request_id, created_at, updated_at, comment, flags FROM rankings"
                     " WHERE annotator = ? AND task_id = ?", (annotator, task_id))
        return None if row is None else _ranking(task_id, annotator, *row)

    def get_own_ranking(self, annotator: str, task_id: str) -> Ranking | None:
        """This annotator's own ranking of a task, or None. Handlers pass the signed-in user's name: there is
        deliberately no handler-facing way to read someone else's ranking."""
        if not storable(annotator) or not storable(task_id):
            return None
        with self._read() as tx:
            return self._own_ranking(tx, annotator, task_id)

    def get_own_skip(self, annotator: str, task_id: str) -> tuple[str | None, tuple[str, ...]] | None:
        """(reason, flags) of this annotator's own skip of a task (not ranked since), or None."""
        if not storable(annotator) or not storable(task_id):
            return None
        with self._read() as tx:
            row = tx.one("SELECT reason, flags FROM skips WHERE annotator = ? AND task_id = ?", (annotator, task_id))
        return None if row is None else (row[0], tuple(json.loads(row[1])))

    def has_skipped(self, annotator: str, task_id: str) -> bool:
        """Whether this annotator skipped this task (and has not ranked it since)."""
        if not storable(annotator) or not storable(task_id):
            return False
        with self._read() as tx:
            return tx.one("SELECT 1 FROM skips WHERE annotator = ? AND task_id = ?", (annotator, task_id)) is not None

    def history(self, annotator: str, limit: int | None = None) -> list[HistoryItem]:
        """This annotator's ranked and skipped tasks, most recent first (at most `limit`)."""
        if not storable(annotator):
            return []
        with self._read() as tx:
            rows = tx.all(
                """SELECT h.task_id, t.prompt, h.at, h.status FROM (
                       SELECT task_id, updated_at AS at, 'ranked' AS status FROM rankings WHERE annotator = :a
                       UNION ALL
                       SELECT task_id, created_at AS at, 'skipped' AS status FROM skips WHERE annotator = :a
                   ) h JOIN tasks t ON t.id = h.task_id ORDER BY h.at DESC, t.seq DESC"""
                + ("" if limit is None else " LIMIT :limit"), {"a": annotator, "limit": limit})
        return [HistoryItem(task_id, _preview(prompt), float(at), status) for task_id, prompt, at, status in rows]

    # --- totals and admin access

    def progress(self, overlap: int) -> Progress:
        """Totals (tasks, tasks with >= overlap rankings, rankings, skips) and per-annotator counts."""
        with self._read() as tx:
            tasks = tx.value("SELECT COUNT(*) FROM tasks")
            complete = tx.value("SELECT COUNT(*) FROM tasks WHERE ranking_count >= ? AND gold IS NULL", (overlap,))
            rankings = tx.value("SELECT COUNT(*) FROM rankings")
            skips = tx.value("SELECT COUNT(*) FROM skips")
            per = [AnnotatorProgress(name, ranked, skipped) for name, ranked, skipped in tx.all(
                """SELECT a.name,
                          (SELECT COUNT(*) FROM rankings r WHERE r.annotator = a.name),
                          (SELECT COUNT(*) FROM skips s WHERE s.annotator = a.name)
                   FROM annotators a ORDER BY a.name""")]
        return Progress(tasks, complete, rankings, skips, overlap, per)

    def annotator_progress(self, annotator: str) -> AnnotatorProgress:
        """One annotator's own counts (what the app shows them after every answer)."""
        with self._read() as tx:
            ranked, skipped = tx.one("SELECT (SELECT COUNT(*) FROM rankings WHERE annotator = :a),"
                                     " (SELECT COUNT(*) FROM skips WHERE annotator = :a)", {"a": annotator})
        return AnnotatorProgress(annotator, ranked, skipped)

    def export_rankings(self, *, gold: bool = True) -> list[Ranking]:
        """ADMIN/CLI ONLY: every annotator's stored ranking (ordered by task import order, then annotator); with
        gold=False, none of a gold question's."""
        with self._read() as tx:
            rows = tx.all("SELECT r.task_id, r.annotator, r.ranks, r.seconds, r.request_id, r.created_at,"
                          " r.updated_at, r.comment, r.flags FROM rankings r JOIN tasks t ON t.id = r.task_id"
                          + ("" if gold else " WHERE t.gold IS NULL") + " ORDER BY t.seq, r.annotator")
        return [_ranking(*row) for row in rows]

    def export_ranked_tasks(self) -> Iterator[RankedTask]:
        """ADMIN/CLI ONLY: every ranking joined with its task, as RankedTask (one line of rankings.jsonl),
        ordered by task import order, then annotator; never a gold question's (they are tests of the annotators,
        not training data)."""
        tasks: dict[str, Task] = {}
        for ranking in self.export_rankings(gold=False):
            task = tasks.get(ranking.task_id)
            if task is None:
                tasks.clear()  # rankings come grouped by task: keep only the current one in memory
                task = tasks[ranking.task_id] = self.get_task(ranking.task_id)
            yield RankedTask.from_task(task, ranking)

    def notes(self) -> list[dict]:
        """ADMIN/CLI ONLY: every ranking and skip that carries a comment (a skip's reason) or flags, newest first:
        {task_id, annotator, status ('ranked' or 'skipped'), flags, comment, at}."""
        with self._read() as tx:
            rows = tx.all(
                """SELECT n.task_id, n.annotator, n.status, n.flags, n.comment, n.at FROM (
                       SELECT task_id, annotator, 'ranked' AS status, flags, comment, updated_at AS at FROM rankings
                       WHERE comment IS NOT NULL OR flags <> '[]'
                       UNION ALL
                       SELECT task_id, annotator, 'skipped' AS status, flags, reason AS comment, created_at AS at
                       FROM skips WHERE reason IS NOT NULL OR flags <> '[]'
                   ) n JOIN tasks t ON t.id = n.task_id ORDER BY n.at DESC, t.seq DESC, n.annotator""")
        return [{"task_id": task_id, "annotator": annotator, "status": status, "flags": json.loads(flags),
                 "comment": comment, "at": float(at)} for task_id, annotator, status, flags, comment, at in rows]

    def events(self) -> list[dict]:
        """ADMIN/CLI ONLY: the append-only event log, oldest first, payload decoded."""
        with self._read() as tx:
            rows = tx.all("SELECT id, at, annotator, task_id, kind, payload, request_id FROM events ORDER BY id")
        return [{"id": i, "at": float(at), "annotator": a, "task_id": t, "kind": k, "payload": json.loads(p),
                 "request_id": q} for i, at, a, t, k, p, q in rows]

    def assignments(self) -> list[Assignment]:
        """ADMIN/CLI ONLY: every open assignment (live or expired), oldest first."""
        with self._read() as tx:
            rows = tx.all("SELECT annotator, task_id, overlap, assigned_at, expires_at FROM assignments"
                          " ORDER BY assigned_at, annotator, task_id")
        return [Assignment(a, t, o, float(at), float(exp)) for a, t, o, at, exp in rows]

    # --- whole-store copies (rlhf db copy)

    def row_counts(self) -> dict[str, int]:
        """Rows per table, sessions included (a store is empty when every count is 0)."""
        with self._read() as tx:
            return {table: tx.value(f"SELECT COUNT(*) FROM {table}") for table in LABEL_TABLES}

    @contextmanager
    def dump(self) -> Iterator[Callable[[CopiedTable], Iterator[tuple]]]:
        """A consistent view of the store while it is read: yields a function that gives a table's rows in
        canonical form (see CopiedTable), in its deterministic order."""
        with self._snapshot() as tx:
            yield lambda table: self._table_rows(tx, table)

    @contextmanager
    def load(self) -> Iterator[Loader]:
        """One write transaction that adds rows as they are (ids included) and can read them back before they
        are committed. Committed when the block ends without an error; nothing is written otherwise."""
        with self._write() as tx:
            yield Loader(self, tx)
            self._after_copy(tx)

    @staticmethod
    def _table_rows(tx: Statements, table: CopiedTable) -> Iterator[tuple]:
        cursor = tx.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {table.order_by}")
        while batch := cursor.fetchmany(1000):
            for row in batch:
                yield table.canonical(row)


class Loader:
    """Rows going into a store within one write transaction (`SQLLabelStore.load`)."""

    def __init__(self, store: SQLLabelStore, tx: Statements):
        self._store, self._tx = store, tx

    def count(self, table: str) -> int:
        return self._tx.value(f"SELECT COUNT(*) FROM {table}")

    def add(self, table: CopiedTable, rows: Iterable[tuple]) -> None:
        statement = (f"INSERT INTO {table.name} ({', '.join(table.columns)})"
                     f" VALUES ({', '.join('?' for _ in table.columns)})")
        batch: list[tuple] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= 1000:
                self._tx.many(statement, batch)
                batch = []
        if batch:
            self._tx.many(statement, batch)

    def rows(self, table: CopiedTable) -> Iterator[tuple]:
        """The table's rows as this transaction sees them (canonical form)."""
        return self._store._table_rows(self._tx, table)
