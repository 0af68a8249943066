"""Screenshots of the ranking screen on a multi-turn task, on a desktop and a phone screen, and of the admin
view, for docs/labeling.md and the README.

Starts `rlhf label` on 127.0.0.1 with a fresh database holding one conversation (a system message, two user
turns and an assistant turn before the last user turn) and three candidate replies in Markdown, and a few
tasks that two scripted annotators ranked (they disagree on some); signs in with headless Chromium, ranks two
replies, turns "Highlight differences" on, and saves
    docs/screenshot-conversation.png        (1400 x 1000)
    docs/screenshot-conversation-phone.png  (390 x 844 at 2x, earlier turns collapsed)
    docs/screenshot-phone.png               (390 x 844 at 2x: the replies, a tie made with "Tie next", the action bar)
    docs/screenshot-admin.png               (the admin view: annotators with gold accuracy, most disagreed tasks,
                                             comments and flags, one task under review)

    .venv/bin/python bench/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from labeling.auth import add_annotator  # noqa: E402
from labeling.store import open_store  # noqa: E402
from rlhf.records import Task  # noqa: E402

PASSWORD = "screenshot password"
CHROMIUM = "/usr/bin/chromium"
CONVERSATION = [
    {"role": "system", "content": "You help a data team with pandas. Answer briefly, in Markdown."},
    {"role": "user", "content": "I have a CSV of orders with `customer_id`, `amount` and `date`. "
                                "How do I get each customer's total?"},
    {"role": "assistant", "content": "Group by the customer and sum:\n\n```python\n"
                                     "totals = df.groupby(\"customer_id\")[\"amount\"].sum()\n```\n\n"
                                     "This gives a Series indexed by `customer_id`."},
    {"role": "user", "content": "Thanks! Now only the customers whose total is **over 100**, largest first, "
                                "with both columns."},
]
REPLIES = [
    "Filter the totals, then sort them:\n\n```python\n"
    "totals = df.groupby(\"customer_id\", as_index=False)[\"amount\"].sum()\n"
    "big = totals[totals[\"amount\"] > 100].sort_values(\"amount\", ascending=False)\n```\n\n"
    "For example:\n\n| customer_id | amount |\n|---|---:|\n| 17 | 412.50 |\n| 3 | 188.00 |\n\n"
    "`as_index=False` keeps `customer_id` as a column.",
    "Filter the totals, then sort them:\n\n```python\n"
    "totals = df.groupby(\"customer_id\")[\"amount\"].sum().reset_index()\n"
    "big = totals[totals[\"amount\"] >= 100].sort_values(\"amount\")\n```\n\n"
    "- `reset_index()` turns the index back into a column\n- `sort_values` sorts from the smallest by default",
    "You can use **SQL** instead:\n\n```sql\nSELECT customer_id, SUM(amount) AS amount\nFROM orders\n"
    "GROUP BY customer_id\nHAVING SUM(amount) > 100\nORDER BY amount DESC;\n```\n\n"
    "This is *often faster* on large files.",
]


REVIEWED = [  # (task id, prompt, replies, ann1's ranks, ann2's ranks): the admin view's material
    ("capital-fr", "What is the capital of France?", ["Paris.", "Lyon.", "Paris, on the Seine."], [2, 3, 1], [1, 3, 1]),
    ("haiku-rain", "Write a haiku about rain.",
     ["Soft rain on the roof", "Rain. Rain. Rain.", "Drops drum the tin roof"], [1, 3, 2], [2, 3, 1]),
    ("sql-join", "Explain a LEFT JOIN in one sentence.",
     ["Keeps every left row, matched or not.", "Joins tables.", "Returns only matching rows."], [1, 2, 3], [3, 2, 1]),
]

NOTES = {  # an annotator's comment and flags on a ranking (shown in the admin view)
    ("ann2", "sql-join"): {"comment": "Reply 3 describes an INNER JOIN.", "flags": ["off-topic"]},
    ("ann1", "capital-fr"): {"comment": "1 and 3 both right; 3 adds a detail."},
}


def sign_in(page, base: str, name: str) -> None:
    page.goto(base + "/")
    page.fill("#login-username", name)
    page.fill("#login-password", PASSWORD)
    page.press("#login-password", "Enter")
    page.wait_for_selector("#guide-panel:visible, .rk-layout:visible", timeout=60_000)
    if page.locator("#guide-ok").is_visible():  # the guidelines come first for a new annotator
        page.locator("#guide-ok").click()
    page.wait_for_selector(".rk-card", state="visible", timeout=60_000)


def shoot_phone(browser, base: str, out: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    sign_in(page, base, "alice")
    if page.locator(".rk-earlier").evaluate("node => node.open"):
        page.locator(".rk-earlier summary").tap()
    page.evaluate("document.querySelector('.rk-clear').click()")  # the desktop shot's ranks came back as a draft
    headers = page.locator(".rk-card header")
    headers.nth(1).tap()
    page.locator(".rk-bar-tie").tap()
    headers.nth(0).tap()
    page.locator(".rk-completions").evaluate("node => node.scrollIntoView()")
    page.evaluate("window.scrollBy(0, -60)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "screenshot-phone.png"))
    print("wrote", out / "screenshot-phone.png")
    context.close()


def shoot_admin(browser, base: str, out: Path) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    sign_in(page, base, "carol")
    page.locator("#admin button.label-wrap").click()
    page.wait_for_selector("#admin-disagreed .virtual-row", timeout=20_000)
    page.locator("#admin-review-pick input").click()
    page.locator("ul[role=listbox] li[role=option]").first.click()
    page.wait_for_selector("#admin-review-rankings .virtual-row", timeout=20_000)
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)
    page.locator("#admin").screenshot(path=str(out / "screenshot-admin.png"))
    print("wrote", out / "screenshot-admin.png")
    context.close()


def shoot(base: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            for name, options in [
                ("screenshot-conversation.png", dict(viewport={"width": 1400, "height": 1000})),
                ("screenshot-conversation-phone.png", dict(viewport={"width": 390, "height": 844},
                                                           device_scale_factor=2, is_mobile=True, has_touch=True)),
            ]:
                context = browser.new_context(**options)
                page = context.new_page()
                page.goto(base + "/")
                page.fill("#login-username", "alice")
                page.fill("#login-password", PASSWORD)
                page.press("#login-password", "Enter")
                page.wait_for_selector(".rk-card", timeout=60_000)
                page.keyboard.press("b")
                page.keyboard.press("a")
                page.click(".rk-diff-toggle")
                if options.get("is_mobile"):
                    page.locator(".rk-earlier summary").click()  # collapse: the last user turn and the replies
                    page.locator(".rk-layout").evaluate("node => node.scrollIntoView()")
                page.mouse.move(0, 0)
                page.wait_for_timeout(300)
                page.screenshot(path=str(out / name))
                print("wrote", out / name)
                context.close()
            shoot_phone(browser, base, out)
            shoot_admin(browser, base, out)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG files (default docs/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        db = Path(tmp) / "labels.db"
        with open_store(db) as store:
            store.import_tasks([Task.from_dict({
                "id": "orders-over-100", "prompt": CONVERSATION,
                "completions": [{"id": f"r{i}", "text": text} for i, text in enumerate(REPLIES)]})])
            store.import_tasks([Task.from_dict({"id": tid, "prompt": prompt, "completions": [
                {"id": f"{tid}-{i}", "text": text} for i, text in enumerate(replies)]})
                for tid, prompt, replies, _, _ in REVIEWED])
            add_annotator(store, "alice", PASSWORD)
            add_annotator(store, "carol", PASSWORD)
            for name in ("ann1", "ann2"):
                add_annotator(store, name, PASSWORD)
            for tid, _, _, first, second in REVIEWED:
                for name, ranks in (("ann1", first), ("ann2", second)):
                    note = NOTES.get((name, tid), {})
                    store.submit_ranking(name, tid, {f"{tid}-{i}": r for i, r in enumerate(ranks)},
                                         seconds=7.0 + 3 * len(name + tid) % 11, **note)
            # A gold question: its answer is known (here ann1's ranking), and ann2 is scored against it.
            store.set_gold("haiku-rain", {"haiku-rain-0": 1, "haiku-rain-1": 3, "haiku-rain-2": 2}, source="ann1")
            # A disagreement an admin has resolved.
            store.resolve("capital-fr", {"capital-fr-0": 2, "capital-fr-1": 3, "capital-fr-2": 1}, "carol")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", "--db", str(db), "--port", "0",
                                 "--admin", "carol"],
                                stdout=subprocess.PIPE, text=True)
        try:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
            assert match, "the server did not start"
            shoot(f"http://127.0.0.1:{match[1]}", args.out)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


if __name__ == "__main__":
    main()
