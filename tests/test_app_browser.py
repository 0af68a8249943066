"""The labeling page in headless Chromium: sign in, rank by keyboard, skip, edit by click and drag-and-drop,
and check that hostile model output is shown as literal text and never runs.

RLHF_SCREENSHOT=1 also saves the ranking screen to docs/screenshot-label.png (used by the README).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from labeling.app import bind_socket, make_server
from labeling.handlers import AppSettings
from labeling.store import open_store
from rlhf.records import Task

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is missing (install it with `make browser` or `apt-get install chromium`)"),
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot-label.png"
PASSWORD = "correct horse"

STORY_PROMPT = "Write a two-sentence story about a lighthouse keeper. <script>window.__pwned=1</script>"
STORY = [
    "The lighthouse keeper counted ships instead of sheep. One night a ship counted him back, "
    "blinking its lamp twice before vanishing into the fog.",
    '<img src=x onerror="window.__pwned=1"> Every evening Mara climbed the tower; every morning the sea '
    "returned something she had lost.",
    "Lighthouse lighthouse light light light. Keeper keeps keeping the keeping.",
    "**Old Tom** polished the lens for forty years. [Click me](javascript:window.__pwned=1) "
    "When they automated the light, he kept polishing anyway.",
]
OTHER_PROMPT = "Summarise the plot of Hamlet in one line. {{7*7}} ${7*7}"
OTHER = [
    "<script>window.__pwned=1</script></div></pre><b>bold?</b>",
    "\u202eA prince avenges his father\u202c &lt;i&gt; &amp; " + "very long line " * 80,
    "A Danish prince hesitates, and almost everyone dies.",
]


@pytest.fixture()
def server(tmp_path):
    db = tmp_path / "labels.db"
    store = open_store(db)
    store.import_tasks([
        Task.from_dict({"id": "story", "prompt": STORY_PROMPT,
                        "completions": [{"id": f"s{i}", "text": t} for i, t in enumerate(STORY)]}),
        Task.from_dict({"id": "hamlet", "prompt": OTHER_PROMPT,
                        "completions": [{"id": f"h{i}", "text": t} for i, t in enumerate(OTHER)]}),
    ])
    store.add_annotator("alice", PASSWORD)
    # The queue serves the least-ranked tasks first: one earlier ranking of "hamlet" (by a scripted
    # annotator who cannot sign in) makes alice see "story" first, then "hamlet".
    store.add_annotator("script", None)
    store.submit_ranking("script", "hamlet", {"h0": 1, "h1": 2, "h2": 3})
    sock = bind_socket("127.0.0.1", 0)
    uvicorn_server = make_server(store, AppSettings(overlap=2, guidelines_html="<p>Prefer <em>helpful</em></p>"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", store
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    store.close()


def displayed(text: str) -> str:
    """The text as the page shows it: invisible bidi/zero-width controls become visible U+XXXX markers."""
    return re.sub("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]", lambda m: f"U+{ord(m[0]):04X}", text)


def shown_ids(page) -> list[str]:
    return page.eval_on_selector_all("#completions .completion", "cards => cards.map(c => c.dataset.id)")


def badges(page) -> list[str]:
    return [b.strip() for b in page.locator("#completions .rank-badge").all_inner_texts()]


def test_rank_skip_and_edit_in_the_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, store = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(10_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)

            # Sign in (a wrong password first).
            page.fill("#login-username", "alice")
            page.fill("#login-password", "wrong password")
            page.press("#login-password", "Enter")
            expect(page.locator("#login-error")).to_contain_text("wrong annotator name or password")
            page.fill("#login-password", PASSWORD)
            page.press("#login-password", "Enter")
            expect(page.locator("#rank-view")).to_be_visible()
            expect(page.locator("#progress")).to_contain_text("0 ranked")
            expect(page.locator("#toggle-stats")).to_be_hidden()  # alice is no admin

            # The guidelines panel opens with "?" and shows the owner's (trusted) formatting.
            page.keyboard.press("?")
            expect(page.locator("#guidelines em")).to_have_text("helpful")
            page.keyboard.press("?")
            expect(page.locator("#guidelines-panel")).to_be_hidden()

            # Rank the story by keyboard: B first, then A; a C picked by mistake is undone; C then ties
            # with A ("=" then its key), and D too (Shift+key).
            first = page.locator("#task-id").text_content()
            assert first == "story"
            ids = shown_ids(page)
            page.keyboard.press("b")
            page.keyboard.press("1")
            page.keyboard.press("3")
            assert badges(page) == ["rank 2", "rank 1", "rank 3", ""]
            page.keyboard.press("u")                      # undo the C
            page.keyboard.press("=")
            page.keyboard.press("3")                      # C ties with A
            assert badges(page) == ["rank 2 (tie)", "rank 1", "rank 2 (tie)", ""]
            if os.environ.get("RLHF_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=False)
            page.keyboard.press("Shift+D")                # D ties too
            expected_first = {ids[0]: 2, ids[1]: 1, ids[2]: 2, ids[3]: 2}
            page.keyboard.press("Enter")
            expect(page.locator("#toast")).to_contain_text("Ranking saved")
            expect(page.locator("#task-id")).to_have_text("hamlet")
            expect(page.locator("#progress")).to_contain_text("1 ranked")
            second = "hamlet"

            # Hostile text of both tasks was shown literally and nothing ran.
            texts_first = store.get_task(first)
            texts_second = store.get_task(second)
            shown = page.locator("#completions .body").all_inner_texts()
            assert sorted(shown) == sorted(displayed(c.text) for c in texts_second.completions)
            assert page.locator("#prompt").inner_text() == displayed(texts_second.prompt)
            assert page.locator("#completions img, #completions script, #completions b, #prompt script").count() == 0

            # Skip the second task with a reason, from the keyboard.
            page.keyboard.press("s")
            page.keyboard.type("not sure about the plot")
            page.keyboard.press("Enter")
            expect(page.locator("#done-view")).to_be_visible()
            expect(page.locator("#progress")).to_contain_text("1 skipped")

            # Go back to the first task from the history and change the ranking by click and drag-and-drop.
            page.click("#toggle-history")
            expect(page.locator("#history-list li")).to_have_count(2)
            page.click(f'#history-list button[data-task-id="{first}"]')
            expect(page.locator("#edit-banner")).to_be_visible()
            assert sorted(page.locator("#completions .body").all_inner_texts()) == \
                sorted(displayed(c.text) for c in texts_first.completions)
            assert page.locator("#prompt").inner_text() == displayed(texts_first.prompt)
            assert page.locator("#completions img, #prompt script").count() == 0
            assert badges(page) == ["rank 2 (tie)", "rank 1", "rank 2 (tie)", "rank 2 (tie)"]  # as stored
            page.keyboard.press("Escape")                 # clear
            cards = page.locator("#completions .completion header")
            cards.nth(2).click()                          # C first
            cards.nth(0).click()                          # A second
            # Drag B onto rank 1 (tie with C), D into the ranking's end, and D's chip back to "unranked"
            # and again to the end.
            completions = page.locator("#completions .completion")
            completions.nth(1).drag_to(page.locator('.rank-row[data-rank="1"]'))
            completions.nth(3).drag_to(page.locator(".ranking .gap").last)
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", "rank 3"]
            page.locator('.rank-row[data-rank="3"] .chip').drag_to(page.locator(".rank-row.unranked"))
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", ""]
            page.locator(".rank-row.unranked .chip").drag_to(page.locator(".ranking .gap").last)
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", "rank 3"]
            page.click("#submit")
            expect(page.locator("#toast")).to_contain_text("Ranking updated")
            expect(page.locator("#done-view")).to_be_visible()
            # The open history list follows the edit: the edited task is now the newest entry.
            expect(page.locator("#history-list li").first).to_contain_text("ranked")
            assert page.locator("#history-list button").first.get_attribute("data-task-id") == first

            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert errors == []
        finally:
            browser.close()

    # The stored rows: the edit replaced the first ranking; the skip kept its reason.
    expected_edit = {ids[0]: 2, ids[1]: 1, ids[2]: 1, ids[3]: 3}
    assert store.get_own_ranking("alice", first).ranks == expected_edit
    events = [e for e in store.events() if e["annotator"] == "alice"]
    assert [(e["kind"], e["task_id"]) for e in events] == [("submit", first), ("skip", second), ("edit", first)]
    assert events[0]["payload"]["ranks"] == expected_first
    assert events[1]["payload"]["reason"] == "not sure about the plot"
    assert store.get_own_ranking("alice", second) is None
