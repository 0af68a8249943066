"""`rlhf db copy`: a whole label store into an empty one, between any two backends (SQLite -> PostgreSQL and
back): tasks, completions, accounts, rankings, skips, assignments and the event log, ids and timestamps as they
are. Sign-in sessions are not copied (everyone signs in again).

The source is read in one consistent snapshot (servers may go on writing to it); the target is written in one
transaction, read back before it commits and compared with the source, table by table: row counts and a SHA-256
checksum over the rows in canonical form (`labeling.store.sql.CopiedTable`). A target that holds anything, or a
mismatch, is refused and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from labeling.store.sql import COPIED_TABLES, LABEL_TABLES, CopiedTable, SQLLabelStore
from rlhf.errors import UserError


@dataclass(frozen=True)
class CopyReport:
    counts: dict[str, int]
    """Rows copied per table."""
    checksum: str
    """SHA-256 (hex) over every copied row, equal in source and target."""


class _Tally:
    """Counts and hashes the rows that pass through it."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.digest = hashlib.sha256()

    def through(self, table: CopiedTable, rows: Iterable[tuple]) -> Iterator[tuple]:
        self.counts[table.name] = 0
        self.digest.update(f"\x00{table.name}\x00".encode())
        for row in rows:
            self.counts[table.name] += 1
            self.digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
            yield row


def copy_store(source: SQLLabelStore, target: SQLLabelStore) -> CopyReport:
    """Copy everything from `source` into the empty `target`, verified; returns the counts and checksum."""
    if source.location == target.location:
        raise UserError(f"{target.location} is the store being copied; nothing was written (copy into another one)")
    read, written = _Tally(), _Tally()
    with source.dump() as rows, target.load() as loader:
        held = {table: n for table in LABEL_TABLES if (n := loader.count(table))}
        if held:
            raise UserError(f"{target.location} is not empty ({', '.join(f'{n} {t}' for t, n in held.items())}); "
                            "nothing was written (copy into a new database)")
        for table in COPIED_TABLES:
            loader.add(table, read.through(table, rows(table)))
        for table in COPIED_TABLES:
            for _ in written.through(table, loader.rows(table)):
                pass
        if read.counts != written.counts or read.digest.hexdigest() != written.digest.hexdigest():
            different = [t for t in read.counts if read.counts[t] != written.counts.get(t)] or ["the checksum"]
            raise UserError(f"the copy in {target.location} does not match {source.location} "
                            f"({', '.join(different)} differ); nothing was written")
    return CopyReport(read.counts, read.digest.hexdigest())
