"""Load benchmark of the labeling server: many annotators submitting rankings at once over the HTTP API.

Starts `rlhf label` on 127.0.0.1 (loopback only) in its own process on a fresh database with --tasks
tasks and --clients annotators, runs one asyncio client per annotator (pause --think seconds, GET
/api/next, POST /api/rankings, in a loop) for --seconds, then kill -9s the server and counts the
acknowledged (HTTP 200) rankings missing from the database. Targets: submit p95 < 200 ms, 0 missing.

With --think 0 the clients never pause: a saturation test, where latency is mostly time spent queueing
(Little's law: 50 clients / throughput), so it measures throughput rather than what an annotator feels.

    .venv/bin/python bench/label_load.py [--seconds 20] [--clients 50] [--tasks 2000] [--think 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from labeling.auth import add_annotator  # noqa: E402
from labeling.store import open_store  # noqa: E402
from rlhf.records import Task  # noqa: E402

PASSWORD = "benchmark password"
SERVE = [sys.executable, "-m", "pipeline.cli", "label"]  # the real `rlhf label`


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def make_db(path: Path, tasks: int, k: int, clients: int, rng: random.Random) -> list[str]:
    words = "the a lighthouse keeper ship fog lamp sea night tower morning story prince plot river".split()
    with open_store(path) as store:
        store.import_tasks([Task.from_dict({
            "id": f"t{i}", "prompt": f"prompt {i}: " + " ".join(rng.choices(words, k=30)),
            "completions": [" ".join(rng.choices(words, k=60)) for _ in range(k)]}) for i in range(tasks)])
        names = [f"annotator-{i:02d}" for i in range(clients)]
        for name in names:
            add_annotator(store, name, PASSWORD)
    return names


async def request(client: httpx.AsyncClient, out: dict, method: str, url: str, **kw) -> httpx.Response:
    """One request, re-sent once if the connection dropped (a re-sent submit carries the same request id,
    so the server stores it once)."""
    try:
        return await client.request(method, url, **kw)
    except httpx.TransportError:
        out["retries"] += 1
        return await client.request(method, url, **kw)


async def annotate(client: httpx.AsyncClient, name: str, deadline: float, think: float, seed: int,
                   out: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if think:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think)  # reading the completions
        start = time.perf_counter()
        response = await request(client, out, "GET", "/api/next")
        out["next_ms"].append((time.perf_counter() - start) * 1000)
        task = response.json()["task"]
        if task is None:
            return
        ids = [c["id"] for c in task["completions"]]
        ranks = {cid: rng.randint(1, len(ids)) for cid in ids}
        if len(set(ranks.values())) == 1:
            ranks[ids[0]] = ranks[ids[0]] % len(ids) + 1  # never all-tied
        start = time.perf_counter()
        response = await request(client, out, "POST", "/api/rankings",
                                 json={"task_id": task["id"], "ranks": ranks, "request_id": uuid.uuid4().hex})
        out["submit_ms"].append((time.perf_counter() - start) * 1000)
        if response.status_code == 200:
            out["acked"].append((name, task["id"], response.json()["ranks"]))
        else:
            out["errors"].append(f"{response.status_code} {response.text[:100]}")


async def run_clients(base: str, names: list[str], seconds: float, think: float, out: dict) -> float:
    # TCP_NODELAY like a browser: without it the body of a POST, sent after its headers, waits for the
    # server's delayed ACK (Nagle), which adds 40 ms to every submit on Linux.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    clients = [httpx.AsyncClient(base_url=base, timeout=30, transport=httpx.AsyncHTTPTransport(
        socket_options=nodelay, limits=httpx.Limits(max_connections=1))) for _ in names]
    try:
        # Log everyone in first (scrypt is slow on purpose), then start the clock.
        for client, name in zip(clients, names):
            (await client.post("/api/login", json={"username": name, "password": PASSWORD})).raise_for_status()
        start = time.monotonic()
        await asyncio.gather(*(annotate(client, name, start + seconds, think, i, out)
                               for i, (client, name) in enumerate(zip(clients, names))))
        return time.monotonic() - start
    finally:
        for client in clients:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clients submit (default 20)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent annotators (default 50)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks in the database (default 2000)")
    parser.add_argument("--k", type=int, default=4, help="completions per task (default 4)")
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean seconds each client pauses before a task (uniform 0.5x-1.5x; default 1.0, "
                             "far quicker than a person reading K completions); 0 = no pause, saturation")
    parser.add_argument("--overlap", type=int, default=2, help="--overlap of the server (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="label-load-") as tmp:
        db = Path(tmp) / "labels.db"
        names = make_db(db, args.tasks, args.k, args.clients, random.Random(0))
        proc = subprocess.Popen([*SERVE, "--db", str(db), "--host", "127.0.0.1",
                                 "--port", "0", "--overlap", str(args.overlap)],
                                stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            proc.kill()
            sys.exit(f"server did not start: {line!r}")
        base = f"http://127.0.0.1:{match[1]}"
        out: dict = {"next_ms": [], "submit_ms": [], "acked": [], "errors": [], "retries": 0}
        try:
            elapsed = asyncio.run(run_clients(base, names, args.seconds, args.think, out))
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # no graceful shutdown: acknowledged must mean on disk
            proc.wait()
            proc.stdout.close()
        with open_store(db, create=False) as store:
            missing = sum(1 for name, task_id, ranks in out["acked"]
                          if (stored := store.get_own_ranking(name, task_id)) is None or stored.ranks != ranks)
            integrity = store.integrity_check()

    submit, nxt = out["submit_ms"], out["next_ms"]
    print(f"label_load: {args.clients} clients, {args.tasks} tasks x {args.k}, overlap {args.overlap}, "
          f"think {args.think:g} s, {elapsed:.1f} s, CPUs: {os.cpu_count()}")
    print(f"  acknowledged submits: {len(out['acked'])}  ({len(out['acked']) / elapsed:.1f} submits/s)  "
          f"errors: {len(out['errors'])}  re-sent after a dropped connection: {out['retries']}")
    print(f"  POST /api/rankings latency ms: p50 {statistics.median(submit):.1f}  p95 {percentile(submit, .95):.1f}"
          f"  max {max(submit):.1f}")
    print(f"  GET  /api/next     latency ms: p50 {statistics.median(nxt):.1f}  p95 {percentile(nxt, .95):.1f}"
          f"  max {max(nxt):.1f}")
    print(f"  acknowledged rankings missing from the DB after kill -9: {missing}  (integrity_check: {integrity})")
    print(f"  targets: submit p95 < 200 ms -> {'PASS' if percentile(submit, .95) < 200 else 'FAIL'}; "
          f"0 missing -> {'PASS' if missing == 0 else 'FAIL'}")
    for error in out["errors"][:5]:
        print("  error:", error)


if __name__ == "__main__":
    main()
