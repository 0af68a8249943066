"""A throwaway PostgreSQL cluster for the tests and the load benchmark: `initdb` and `pg_ctl` on a temporary
folder, listening only on a Unix socket in that folder (no TCP port), removed afterwards.

PostgreSQL refuses to run as root. As root (CI, containers) the cluster runs as the `postgres` account that
Debian's package creates, through `runuser` (or `su`); its folder is made for that account.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"
PASSWORD_ROLE = "labeler"
"""The one role that must sign in with a password (scram-sha-256); every other local connection is trusted."""


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return Path(found[0]).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.access(f"{folder}/initdb", os.X_OK) and os.access(f"{folder}/pg_ctl", os.X_OK):
            return Path(folder)
    return None


def run_as() -> str | None:
    """The account the cluster runs as: None for the current one; 'postgres' when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return ""
    return "postgres"


def unavailable() -> str | None:
    """Why no cluster can be started here (one line), or None."""
    if binaries() is None:
        return ("PostgreSQL not installed: initdb and pg_ctl are neither on PATH nor in /usr/lib/postgresql/*/bin "
                "(`make test` installs them with apt)")
    if run_as() == "":
        return "running as root, and there is no 'postgres' account to run PostgreSQL as (initdb refuses root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


class Cluster:
    """One PostgreSQL server on a temporary folder. `fsync=False` is for tests only (faster; the tests kill
    app processes, never the machine)."""

    def __init__(self, *, fsync: bool = True, max_connections: int = 100):
        self.bin = binaries()
        self.user = run_as()
        self.fsync, self.max_connections = fsync, max_connections
        self.root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._names = itertools.count()
        if self.user:
            shutil.chown(self.root, self.user, self.user)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user:
            command = (["runuser", "-u", self.user, "--", *command] if shutil.which("runuser")
                       else ["su", self.user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in command)])
        # cwd: a folder the cluster's account may enter (it may not enter the caller's)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def start(self) -> Cluster:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C",
                      *([] if self.fsync else ["--no-sync"]))
            hba = self.data / "pg_hba.conf"
            hba.write_text(f"local all {PASSWORD_ROLE} scram-sha-256\n" + hba.read_text())
        options = (f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} "
                   f"-c max_connections={self.max_connections} -c fsync={'on' if self.fsync else 'off'}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: 'fast' (clean) or 'immediate' (like a crash: recovery replays the WAL at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"labels_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        from urllib.parse import urlsplit

        self.admin(f"DROP DATABASE IF EXISTS {urlsplit(url).path.lstrip('/')} WITH (FORCE)")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
