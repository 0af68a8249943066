"""Load and fault benchmark of the labeling server: many annotators submitting rankings at once over the HTTP API,
on SQLite (one app server) and on PostgreSQL (two app servers on one database), with faults injected mid-run.

For each backend: a fresh store with --tasks tasks and --clients annotators; `rlhf label` processes on 127.0.0.1
(loopback only); one asyncio client per annotator, each in a bounded loop (pause --think seconds, GET /api/next,
POST /api/rankings with a fresh request id) for --seconds. A request that finds its server gone or the database
restarting (a dropped connection, HTTP 503) is sent again, the same request id with it, to a live server, for at
most RETRY_SECONDS; only an HTTP 200 counts as acknowledged.

Faults: PostgreSQL: `kill -9` of the first app server at a third of the run (its annotators go on on the other
server with the same session cookie: sessions live in the database), then an immediate-mode stop and restart of
PostgreSQL itself (`pg_ctl -m immediate`: a crash, recovered from its WAL) at two thirds. SQLite: `kill -9` of
its one server at the end. Then the database is checked: acknowledged rankings missing, duplicate rankings (one
annotator's task stored or submitted twice, a request id stored twice), tasks ranked past their overlap.
Targets: submit p95 < 200 ms, 0 missing, 0 duplicates, 0 tasks past the overlap.

Hostile clients run beside the honest ones (--hoarders, --odd): a hoarder takes a task and skips it, reopens
every task it skipped from its history, and takes the next, again and again (the way one annotator once held
every place); an odd client sends Gradio's routes and the API odd bodies (unknown fn_index, empty session
hash, direct API calls, a ranking that repeats a completion id); neither waits out a 429 (the server's
per-annotator request budget, `rlhf label --rate-limit`), as honest clients do. Also checked: 0 answers 5xx
to anyone, and
no honest annotator finds an empty queue while a task they have not answered has a place that no honest
annotator holds, beyond the --max-held places each hoarder may hold.

    .venv/bin/python bench/label_load.py [--backends sqlite postgresql] [--clients 200] [--tasks 2000]
                                         [--seconds 60] [--think 5] [--overlap 2] [--rate-limit R]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # postgres_cluster: the throwaway cluster of the tests
from labeling.auth import hash_password  # noqa: E402
from labeling.store import MAX_HELD, open_store  # noqa: E402
from rlhf.records import Task  # noqa: E402

PASSWORD = "benchmark password"
SERVE = [sys.executable, "-m", "pipeline.cli", "label"]  # the real `rlhf label`
RETRY_SECONDS = 30.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_store(url: str, tasks: int, k: int, clients: int, rng: random.Random, hostile: list[str] = ()) -> list[str]:
    words = "the a lighthouse keeper ship fog lamp sea night tower morning story prince plot river".split()
    password_hash = hash_password(PASSWORD)  # one scrypt hash for every account: setting up stays quick
    with open_store(url) as store:
        store.import_tasks([Task.from_dict({
            "id": f"t{i}", "prompt": f"prompt {i}: " + " ".join(rng.choices(words, k=30)),
            "completions": [" ".join(rng.choices(words, k=60)) for _ in range(k)]}) for i in range(tasks)])
        names = [f"annotator-{i:03d}" for i in range(clients)]
        for name in [*names, *hostile]:
            store.add_annotator(name, password_hash=password_hash)
    return names


def hostile_names(args) -> list[str]:
    return [f"hoarder-{i:03d}" for i in range(args.hoarders)] + [f"odd-{i:03d}" for i in range(args.odd)]


def hoarded(url: str, name: str, overlap: int) -> int:
    """How many tasks this honest annotator has not answered still have a place besides the rankings and the live
    holds of honest annotators: places only hoarders hold (at most --max-held each), or none."""
    with open_store(url, create=False) as store:
        done = {item.task_id for item in store.history(name)}
        taken: dict[str, int] = {}
        for ranking in store.export_rankings():
            taken[ranking.task_id] = taken.get(ranking.task_id, 0) + 1
        now = time.time()
        for a in store.assignments():
            if a.expires_at > now and a.annotator != name and not a.annotator.startswith("hoarder-"):
                taken[a.task_id] = taken.get(a.task_id, 0) + 1
        return sum(taken.get(t, 0) < overlap for t in store.task_ids() if t not in done)


def start_server(url: str, overlap: int, rate_limit: float | None = None) -> tuple[subprocess.Popen, str]:
    """`rate_limit` None: the server's default request budget."""
    budget = [] if rate_limit is None else ["--rate-limit", str(rate_limit)]
    proc = subprocess.Popen([*SERVE, "--db", url, "--host", "127.0.0.1", "--port", "0", "--overlap", str(overlap),
                             *budget], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        sys.exit(f"server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{match[1]}"


class Annotator:
    """One scripted annotator: an HTTP client (its cookie works on every server: sessions are in the database)
    and the server it talks to now."""

    def __init__(self, name: str, bases: list[str], home: int):
        # TCP_NODELAY like a browser: without it the body of a POST, sent after its headers, waits for the
        # server's delayed ACK (Nagle), which adds 40 ms to every submit on Linux.
        self.name, self.bases, self.server = name, bases, home
        self.http = httpx.AsyncClient(timeout=30, transport=httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], limits=httpx.Limits(max_connections=1)))

    async def send(self, out: dict, method: str, path: str, *, polite: bool = True,
                   **kw) -> tuple[httpx.Response, float]:
        """(response, seconds from the first try to the answer): re-sent (same body, so the same request id)
        after a dropped connection, on the next server, or after a 503, for at most RETRY_SECONDS; a `polite`
        client also waits out a 429's Retry-After and sends again."""
        start = time.perf_counter()
        while True:
            try:
                response = await self.http.request(method, self.bases[self.server] + path, **kw)
                if response.status_code == 429:
                    out["429"][polite] += 1
                    if polite:
                        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                        continue
                if response.status_code != 503:
                    return response, time.perf_counter() - start
                out["retries_503"] += 1
            except httpx.TransportError:
                out["retries_dropped"] += 1
                self.server = (self.server + 1) % len(self.bases)  # that server is gone: go on on another
            if time.perf_counter() - start > RETRY_SECONDS:
                raise RuntimeError(f"{method} {path}: no answer for {RETRY_SECONDS} s")
            await asyncio.sleep(0.2 + random.random() * 0.3)


async def annotate(who: Annotator, deadline: float, think: float, seed: int, out: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if think:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think)  # reading the completions
        started = time.monotonic()
        response, seconds = await who.send(out, "GET", "/api/next")
        out["next"].append((started, seconds))
        count_status(out, response)
        task = response.json()["task"]
        if task is None:
            out["honest_empty"] += 1
            out["hoarded"] = max(out["hoarded"], await asyncio.to_thread(hoarded, out["url"], who.name, out["overlap"]))
            return
        ids = [c["id"] for c in task["completions"]]
        ranks = {cid: rng.randint(1, len(ids)) for cid in ids}
        if len(set(ranks.values())) == 1:
            ranks[ids[0]] = ranks[ids[0]] % len(ids) + 1  # never all-tied
        started = time.monotonic()
        response, seconds = await who.send(out, "POST", "/api/rankings",
                                           json={"task_id": task["id"], "ranks": ranks, "request_id": uuid.uuid4().hex})
        out["submit"].append((started, seconds))
        count_status(out, response)
        if response.status_code == 200:
            out["acked"].append((who.name, task["id"], response.json()["ranks"]))
        else:
            out["errors"].append(f"{response.status_code} {response.text[:100]}")


def count_status(out: dict, response: httpx.Response) -> None:
    out["requests"] += 1
    if response.status_code >= 500 and response.status_code != 503:  # 503: the database restarts, send again
        out["5xx"].append(f"{response.request.method} {response.request.url.path} -> {response.status_code}")


async def hoard(who: Annotator, deadline: float, out: dict) -> None:
    """Take a task and skip it, reopen every task skipped so far, take the next: over and over."""
    skipped: list[str] = []
    while time.monotonic() < deadline:
        response, _ = await who.send(out, "GET", "/api/next", polite=False)
        count_status(out, response)
        task = response.json().get("task") if response.status_code == 200 else None
        if task is not None:
            response, _ = await who.send(out, "POST", "/api/skip", json={"task_id": task["id"]}, polite=False)
            count_status(out, response)
            if response.status_code == 200:
                skipped.append(task["id"])
        for task_id in skipped[-20:]:
            response, _ = await who.send(out, "GET", "/api/task", params={"id": task_id}, polite=False)
            count_status(out, response)
        await asyncio.sleep(0.05)


ODD_REQUESTS = [
    ("POST", "/gradio_api/queue/join", b'{"fn_index": 999, "session_hash": "odd-page", "data": []}'),
    ("POST", "/gradio_api/queue/join", b'{"fn_index": 0, "session_hash": "", "data": [], "event_data": null}'),
    ("POST", "/gradio_api/queue/join", b'{"fn_index": 0, "data": [], "event_data": null}'),
    ("POST", "/gradio_api/run/no_such_api", b'{"fn_index": 999, "session_hash": "odd-page", "data": []}'),
    ("POST", "/gradio_api/api/on_submit", b'{"data": ["x"]}'),
    ("POST", "/gradio_api/call/on_submit", b'{"data": []}'),
    ("POST", "/gradio_api/call/v2/on_submit", b"[]"),
    ("POST", "/gradio_api/cancel", b'{"session_hash": "", "fn_index": "x", "event_id": null}'),
    ("GET", "/gradio_api/queue/data?session_hash=", b""),
    ("GET", "/gradio_api/heartbeat/" + "h" * 300, b""),
    ("GET", "/assets/" + "a" * 300, b""),
    ("POST", "/api/rankings", b'{"task_id": "t0", "ranks": {"t0-0": 1, "t0-1": 2, "t0-0": 3}}'),
    ("POST", "/api/skip", b'{"task_id": ' + b"[" * 5000 + b"}"),
]
"""Bodies that Gradio's routes once answered with a 500, and a ranking that repeats a completion id."""


async def send_odd(who: Annotator, deadline: float, out: dict) -> None:
    rng = random.Random(who.name)
    while time.monotonic() < deadline:
        method, path, body = rng.choice(ODD_REQUESTS)
        try:
            response = await who.http.request(method, who.bases[who.server] + path, content=body or None,
                                              headers={"content-type": "application/json"}, timeout=5)
            count_status(out, response)
            out["odd"] += 1
            out["429"][False] += response.status_code == 429
        except httpx.TimeoutException:
            pass  # a stream that stays open (answered 200): nothing to count
        except httpx.TransportError:
            who.server = (who.server + 1) % len(who.bases)
        await asyncio.sleep(0.1)


async def run_clients(names: list[str], bases: list[str], seconds: float, think: float, out: dict,
                      faults: list[tuple[float, str, callable]], hostile: list[str] = ()) -> float:
    annotators = [Annotator(name, bases, i % len(bases)) for i, name in enumerate([*names, *hostile])]
    try:
        for who in annotators:  # sign everyone in first (scrypt is slow on purpose), then start the clock
            (await who.http.post(who.bases[who.server] + "/api/login",
                                 json={"username": who.name, "password": PASSWORD})).raise_for_status()
        start = time.monotonic()

        async def inject() -> None:
            for at, label, fault in faults:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                began = time.monotonic()
                await asyncio.to_thread(fault)
                out["faults"].append((label, began, time.monotonic()))

        work = [annotate(who, start + seconds, think, i, out) if who.name in names
                else hoard(who, start + seconds, out) if who.name.startswith("hoarder-")
                else send_odd(who, start + seconds, out) for i, who in enumerate(annotators)]
        await asyncio.gather(inject(), *work)
        return time.monotonic() - start
    finally:
        for who in annotators:
            await who.http.aclose()


def check_store(url: str, acked: list, overlap: int) -> dict:
    with open_store(url, create=False) as store:
        missing = sum(1 for name, task_id, ranks in acked
                      if (stored := store.get_own_ranking(name, task_id)) is None or stored.ranks != ranks)
        events = store.events()
        firsts = [(e["annotator"], e["task_id"]) for e in events if e["kind"] == "submit"]
        request_ids = [(e["annotator"], e["request_id"]) for e in events if e["request_id"] is not None]
        rankings = store.export_rankings()
        per_task: dict[str, int] = {}
        for ranking in rankings:
            per_task[ranking.task_id] = per_task.get(ranking.task_id, 0) + 1
        return {"missing": missing, "rankings": len(rankings),
                "duplicates": (len(firsts) - len(set(firsts))) + (len(request_ids) - len(set(request_ids)))
                + (len(rankings) - len({(r.annotator, r.task_id) for r in rankings})),
                "over_overlap": sum(1 for n in per_task.values() if n > overlap),
                "integrity": store.integrity_check()}


def summarize(out: dict, elapsed: float, checked: dict) -> dict:
    def window_free(samples):  # requests that began outside every fault and the 3 s after it
        return [s for began, s in samples
                if not any(start - 0.5 <= began <= end + 3.0 for _, start, end in out["faults"])]

    submit = [s * 1000 for _, s in out["submit"]]
    calm = [s * 1000 for s in window_free(out["submit"])]
    nxt = [s * 1000 for _, s in out["next"]]
    return {"acked": len(out["acked"]), "rate": len(out["acked"]) / elapsed, "elapsed": elapsed,
            "submit_p50": statistics.median(submit) if submit else float("nan"), "submit_p95": percentile(submit, .95),
            "submit_max": max(submit, default=float("nan")), "calm_p95": percentile(calm, .95),
            "next_p50": statistics.median(nxt) if nxt else float("nan"), "next_p95": percentile(nxt, .95),
            "retries": f"{out['retries_dropped']} dropped / {out['retries_503']} x 503",
            "errors": len(out["errors"]), "faults": out["faults"], "requests": out["requests"],
            "5xx": len(out["5xx"]), "odd": out["odd"], "honest_empty": out["honest_empty"],
            "hoarded": out["hoarded"], "hoard_bound": out["hoard_bound"], "429_honest": out["429"][True],
            "429_hostile": out["429"][False], **checked}


def new_out(url: str, overlap: int, hoard_bound: int) -> dict:
    return {"next": [], "submit": [], "acked": [], "errors": [], "faults": [], "retries_dropped": 0,
            "retries_503": 0, "429": {True: 0, False: 0},
            "requests": 0, "5xx": [], "odd": 0, "honest_empty": 0, "hoarded": 0, "url": url,
            "overlap": overlap, "hoard_bound": hoard_bound}


def bench_sqlite(args, tmp: Path) -> dict:
    url = str(tmp / "labels.db")
    names = make_store(url, args.tasks, args.k, args.clients, random.Random(0), hostile_names(args))
    proc, base = start_server(url, args.overlap, args.rate_limit)
    out = new_out(url, args.overlap, args.hoarders * MAX_HELD)
    try:
        elapsed = asyncio.run(run_clients(names, [base], args.seconds, args.think, out, [], hostile_names(args)))
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no graceful shutdown: acknowledged must mean on disk
        proc.wait()
        proc.stdout.close()
    out["faults"].append(("kill -9 of the server at the end", time.monotonic(), time.monotonic()))
    return summarize(out, elapsed, check_store(url, out["acked"], args.overlap))


def bench_postgresql(args) -> dict:
    from postgres_cluster import Cluster, unavailable

    reason = unavailable()
    if reason:
        sys.exit(f"PostgreSQL benchmark not run: {reason}")
    cluster = Cluster(fsync=True, max_connections=300).start()
    procs: list[subprocess.Popen] = []
    try:
        url = cluster.new_database()
        names = make_store(url, args.tasks, args.k, args.clients, random.Random(0), hostile_names(args))
        servers = [start_server(url, args.overlap, args.rate_limit) for _ in range(args.servers)]
        procs = [proc for proc, _ in servers]

        def kill_first_server() -> None:
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait()

        def restart_database() -> None:
            cluster.stop("immediate")
            cluster.start()

        faults = [(args.seconds / 3, "kill -9 of app server 1", kill_first_server),
                  (2 * args.seconds / 3, "PostgreSQL stopped in immediate mode and restarted", restart_database)]
        out = new_out(url, args.overlap, args.hoarders * MAX_HELD)
        elapsed = asyncio.run(run_clients(names, [base for _, base in servers], args.seconds, args.think, out,
                                          faults, hostile_names(args)))
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return summarize(out, elapsed, check_store(url, out["acked"], args.overlap))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        cluster.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients submit (default 60)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent honest annotators (default 200)")
    parser.add_argument("--hoarders", type=int, default=10,
                        help="hostile annotators who skip and reopen tasks to hold places (default 10)")
    parser.add_argument("--odd", type=int, default=10,
                        help="hostile clients sending odd bodies to Gradio's routes and the API (default 10)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks in the store (default 2000)")
    parser.add_argument("--k", type=int, default=4, help="completions per task (default 4)")
    parser.add_argument("--think", type=float, default=5.0,
                        help="mean seconds each client pauses before a task (uniform 0.5x-1.5x; default 5, far "
                             "quicker than a person reading K completions); 0 = no pause, saturation")
    parser.add_argument("--overlap", type=int, default=2, help="--overlap of the servers (default 2)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="the servers' --rate-limit (default: theirs); 0 with --think 0 to measure saturation")
    parser.add_argument("--servers", type=int, default=2, help="app servers on the PostgreSQL database (default 2)")
    args = parser.parse_args()

    print(f"label_load: {args.clients} clients (+ {args.hoarders} hoarders, {args.odd} odd),"
          f" {args.tasks} tasks x {args.k}, overlap {args.overlap}, "
          f"think {args.think:g} s, {args.seconds:g} s per backend, CPUs: {os.cpu_count()}")
    print("before:", uptime(), flush=True)
    results = {}
    for backend in args.backends:
        with tempfile.TemporaryDirectory(prefix="label-load-") as tmp:
            results[backend] = bench_sqlite(args, Path(tmp)) if backend == "sqlite" else bench_postgresql(args)
        print(f"after {backend}:", uptime(), flush=True)

    columns = {"sqlite": "SQLite, 1 server", "postgresql": f"PostgreSQL, {args.servers} servers"}
    rows = [
        ("acknowledged submits", lambda r: f"{r['acked']} ({r['rate']:.1f}/s)"),
        ("submit p50 / p95 / max ms",
         lambda r: f"{r['submit_p50']:.0f} / {r['submit_p95']:.0f} / {r['submit_max']:.0f}"),
        ("submit p95 ms away from faults", lambda r: f"{r['calm_p95']:.0f}"),
        ("next p50 / p95 ms", lambda r: f"{r['next_p50']:.0f} / {r['next_p95']:.0f}"),
        ("re-sent requests", lambda r: r["retries"]),
        ("faults", lambda r: "; ".join(f"{label} ({end - start:.1f} s)" for label, start, end in r["faults"])),
        ("acknowledged rankings missing", lambda r: str(r["missing"])),
        ("duplicate rankings", lambda r: str(r["duplicates"])),
        ("tasks past the overlap", lambda r: str(r["over_overlap"])),
        ("other errors", lambda r: str(r["errors"])),
        ("requests answered 5xx", lambda r: f"{r['5xx']} of {r['requests']} ({r['odd']} odd)"),
        ("429s (request budget spent): honest, waited out / hostile",
         lambda r: f"{r['429_honest']} / {r['429_hostile']}"),
        ("honest empty queues / most places only hoarders held then (bound)",
         lambda r: f"{r['honest_empty']} / {r['hoarded']} ({r['hoard_bound']})"),
    ]
    print("\n| | " + " | ".join(columns[b] for b in results) + " |")
    print("|---|" + "---:|" * len(results))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in results.values()) + " |")
    for backend, r in results.items():
        ok = (r["submit_p95"] < 200, r["missing"] == 0, r["duplicates"] == 0, r["over_overlap"] == 0,
              r["5xx"] == 0 and r["hoarded"] <= r["hoard_bound"])
        print(f"{columns[backend]}: p95 < 200 ms {'PASS' if ok[0] else 'FAIL'}; "
              f"0 missing {'PASS' if ok[1] else 'FAIL'}; 0 duplicates {'PASS' if ok[2] else 'FAIL'}; "
              f"overlap kept {'PASS' if ok[3] else 'FAIL'}; 0 5xx and hoarders within --max-held "
              f"{'PASS' if ok[4] else 'FAIL'}")


if __name__ == "__main__":
    main()
