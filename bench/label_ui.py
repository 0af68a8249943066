"""Latency of the Gradio labeling UI as an annotator feels it, beside the bare JSON API, in one run.

Starts `rlhf label` on 127.0.0.1 with a fresh database, then
  - API: one client signs in and, --rounds times, POSTs /api/rankings and GETs /api/next (the same work as one
    UI submit: store the ranking, serve the next task);
  - UI: headless Chromium signs in on the Gradio page and, --rounds times, ranks the K completions by keyboard,
    presses Enter and waits until the next task is on screen (Gradio queue + rendering included).
Prints p50/p95 of both and the ratio UI/API. Target: UI submit-to-next-task p95 < 200 ms.

    .venv/bin/python bench/label_ui.py [--rounds 40] [--k 4]
"""

from __future__ import annotations

import argparse
import re
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
CHROMIUM = "/usr/bin/chromium"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def api_rounds(base: str, rounds: int) -> list[float]:
    times = []
    with httpx.Client(base_url=base, timeout=30) as client:
        client.post("/api/login", json={"username": "api", "password": PASSWORD}).raise_for_status()
        task = client.get("/api/next").json()["task"]
        for _ in range(rounds):
            start = time.perf_counter()
            ranks = {c["id"]: i + 1 for i, c in enumerate(task["completions"])}
            client.post("/api/rankings", json={"task_id": task["id"], "ranks": ranks,
                                               "request_id": uuid.uuid4().hex}).raise_for_status()
            task = client.get("/api/next").json()["task"]
            times.append((time.perf_counter() - start) * 1000)
    return times


def ui_rounds(base: str, rounds: int, k: int) -> tuple[float, list[float]]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            page.goto(base + "/")
            page.fill("#login-username", "ui")
            page.fill("#login-password", PASSWORD)
            page.press("#login-password", "Enter")
            page.wait_for_selector(".rk-card", timeout=60_000)
            sign_in = time.perf_counter() - start
            for _ in range(rounds):
                task_id = page.locator(".rk-task-id").text_content()
                for key in range(1, k + 1):
                    page.keyboard.press(str(key))
                start = time.perf_counter()
                page.keyboard.press("Enter")
                page.wait_for_function("id => document.querySelector('.rk-task-id').textContent !== id",
                                       arg=task_id, timeout=30_000)
                times.append((time.perf_counter() - start) * 1000)
        finally:
            browser.close()
    return sign_in, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="submits measured per side (default 40)")
    parser.add_argument("--k", type=int, default=4, help="completions per task (default 4, at most 9)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="label-ui-") as tmp:
        db = Path(tmp) / "labels.db"
        words = "the a lighthouse keeper ship fog lamp sea night tower morning story prince plot river".split()
        with open_store(db) as store:
            store.import_tasks([Task.from_dict({
                "id": f"t{i}", "prompt": f"prompt {i}: " + " ".join(words[(i + j) % len(words)] for j in range(30)),
                "completions": [" ".join(words[(i * j + n) % len(words)] for n in range(120))
                                for j in range(args.k)]}) for i in range(2 * args.rounds + 10)])
            add_annotator(store, "api", PASSWORD)
            add_annotator(store, "ui", PASSWORD)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", "--db", str(db), "--port", "0",
                                 "--overlap", "2"], stdout=subprocess.PIPE, text=True)
        try:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
            assert match, "the server did not start"
            base = f"http://127.0.0.1:{match[1]}"
            api = api_rounds(base, args.rounds)
            sign_in, ui = ui_rounds(base, args.rounds, args.k)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()

    import os

    print(f"label_ui: {args.rounds} submits per side, K={args.k}, CPUs: {os.cpu_count()}")
    print(f"  API  submit + next (HTTP round trips) ms: p50 {statistics.median(api):.1f}  p95 {p95(api):.1f}")
    print(f"  UI   Enter -> next task on screen    ms: p50 {statistics.median(ui):.1f}  p95 {p95(ui):.1f}"
          f"  (sign-in to first task: {sign_in:.2f} s)")
    print(f"  ratio UI/API p50: {statistics.median(ui) / statistics.median(api):.1f}x")
    print(f"  target: UI p95 < 200 ms -> {'PASS' if p95(ui) < 200 else 'FAIL'}")


if __name__ == "__main__":
    main()
