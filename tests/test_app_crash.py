"""kill -9 the labeling server while annotators submit over HTTP: every acknowledged ranking survives (on both
backends)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx

from labeling.auth import add_annotator
from labeling.store import open_store
from rlhf.records import Task

PASSWORD = "correct horse"
ANNOTATORS = [f"w{i}" for i in range(4)]
SERVE = [sys.executable, "-m", "pipeline.cli", "label"]  # the real `rlhf label`


def start_server(db) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*SERVE, "--db", str(db), "--port", "0", "--overlap", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc, f"http://127.0.0.1:{match[1]}"


def annotate(base: str, name: str, acked: list, stop: threading.Event) -> None:
    """Rank tasks until the server dies, recording each ranking the server acknowledged with HTTP 200."""
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.post("/api/login", json={"username": name, "password": PASSWORD}).status_code == 200
            while not stop.is_set():
                task = client.get("/api/next").json()["task"]
                if task is None:
                    return
                ranks = {c["id"]: i + 1 for i, c in enumerate(task["completions"])}
                response = client.post("/api/rankings",
                                       json={"task_id": task["id"], "ranks": ranks, "request_id": uuid.uuid4().hex})
                if response.status_code == 200:
                    acked.append((name, task["id"], ranks))
    except (httpx.TransportError, ValueError):
        return  # the server was killed mid-request: that ranking was never acknowledged


def test_kill_9_loses_no_acknowledged_ranking(db_url):
    db = db_url
    with open_store(db) as store:
        store.import_tasks([Task.from_dict({"id": f"t{i}", "prompt": f"prompt {i}",
                                            "completions": [f"answer {i}.{j}" for j in range(3)]})
                            for i in range(200)])
        for name in ANNOTATORS:
            add_annotator(store, name, PASSWORD)

    proc, base = start_server(db)
    acked: list = []
    stop = threading.Event()
    try:
        threads = [threading.Thread(target=annotate, args=(base, name, acked, stop)) for name in ANNOTATORS]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the clients are still submitting
        proc.wait(timeout=10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    for thread in threads:
        thread.join(timeout=15)
    assert len(acked) >= 40

    with open_store(db, create=False) as store:
        assert store.integrity_check() == "ok"
        missing = [(name, task_id) for name, task_id, ranks in acked
                   if (stored := store.get_own_ranking(name, task_id)) is None or stored.ranks != ranks]
        assert missing == []
        assert len(store.export_rankings()) >= len(acked)  # plus any committed just before the kill

    # The crashed database serves again.
    proc, base = start_server(db)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            client.post("/api/login", json={"username": "w0", "password": PASSWORD}).raise_for_status()
            ranked = client.get("/api/session").json()["progress"]["ranked"]
            assert ranked >= sum(1 for name, _, _ in acked if name == "w0") > 0
            assert client.get("/api/next").json()["task"] is not None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_port_in_use_is_one_line_and_exit_code_2(tmp_path):
    db = tmp_path / "labels.db"
    with open_store(db) as store:
        store.import_tasks([Task.from_dict({"id": "t0", "prompt": "p", "completions": ["a", "b"]})])
        add_annotator(store, "alice", PASSWORD)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*SERVE, "--db", str(db), "--port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"rlhf label: error: port {port} on 127.0.0.1 is already in use; " \
                            "stop the other server or pick --port\n"
