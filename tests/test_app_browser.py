"""The Gradio labeling UI in headless Chromium: sign in, rank by keyboard (undo, ties), skip with a reason,
edit from the history by click and drag-and-drop, and check that hostile model output is shown as literal
text and never runs.

RLHF_SCREENSHOT=1 also saves the ranking screen to docs/screenshot-label.png (used by docs/labeling.md).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_helpers import serving

from labeling.auth import add_annotator
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
    "Lighthouse lighthouse light light light. Keeper keeps keeping the keeping. {{7*7}} ${7*7}",
    "**Old Tom** polished the lens for forty years. [Click me](javascript:window.__pwned=1) "
    "When they automated the light, he kept polishing anyway.",
]
OTHER_PROMPT = "Summarise the plot of Hamlet in one line. {{7*7}} ${7*7} <b>bold?</b>"
OTHER = [
    "<script>window.__pwned=1</script></div></pre><b>bold?</b>",
    "\u202eA prince avenges his father\u202c &lt;i&gt; &amp; " + "very long line " * 80,
    "A Danish prince hesitates, and almost everyone dies. [x](javascript:alert(1))",
]
RANKER = "#ranker"  # (its only link of its own: the sign-in link shown when the session has ended)
# What the page shows of the texts that hold Markdown (emphasis markers gone, a link's address as text);
# every other text is shown exactly as written.
RENDERED = {
    STORY[2]: "Lighthouse lighthouse light light light. Keeper keeps keeping the keeping. {{77}} ${77}",
    STORY[3]: "Old Tom polished the lens for forty years. Click me (javascript:window.__pwned=1) "
              "When they automated the light, he kept polishing anyway.",
    OTHER[1]: "U+202EA prince avenges his fatherU+202C &lt;i&gt; &amp; " + ("very long line " * 80).rstrip(),
    OTHER[2]: "A Danish prince hesitates, and almost everyone dies. x (javascript:alert(1))",
    OTHER_PROMPT: "Summarise the plot of Hamlet in one line. {{77}} ${77} <b>bold?</b>",
}


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
    add_annotator(store, "alice", PASSWORD)
    # The queue serves the least-ranked tasks first: one earlier ranking of "hamlet" (by a scripted
    # annotator who cannot sign in) makes alice see "story" first, then "hamlet".
    store.add_annotator("script")
    store.submit_ranking("script", "hamlet", {"h0": 1, "h1": 2, "h2": 3})
    add_annotator(store, "carol", PASSWORD)  # an admin (--admin carol)
    with serving(store, AppSettings(overlap=2, guidelines_html="<p>Prefer <em>helpful</em></p>",
                                    admins=frozenset({"carol"}))) as (host, port):
        yield f"http://{host}:{port}/", store
    store.close()


def displayed(text: str) -> str:
    """The text as the page shows it: invisible bidi/zero-width controls become visible U+XXXX markers."""
    return re.sub("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]", lambda m: f"U+{ord(m[0]):04X}", text)


def shown_ids(page) -> list[str]:
    return page.eval_on_selector_all(".rk-completions .rk-card", "cards => cards.map(c => c.dataset.id)")


def badges(page) -> list[str]:
    return [b.strip() for b in page.locator(".rk-completions .rk-badge").all_inner_texts()]


def assert_inert(page, task) -> None:
    """The task's prompt and completions are on the page as rendered Markdown, and no HTML in them became
    markup."""
    shown = page.locator(".rk-completions .rk-body").all_inner_texts()
    assert sorted(shown) == sorted(RENDERED.get(c.text, displayed(c.text)) for c in task.completions)
    assert page.locator(".rk-prompt").inner_text() == RENDERED.get(task.prompt, displayed(task.prompt))
    markup = f"{RANKER} img, {RANKER} script, {RANKER} b, {RANKER} a:not(.rk-session-link), {RANKER} i"
    assert page.locator(markup).count() == 0


def drag(page, source, target) -> None:
    """Drag `source` onto `target` with the mouse, as a person does: the drag starts first (the ranking's
    drop targets grow), then the pointer goes to where the target is now."""
    box = source.bounding_box()
    x, y = box["x"] + min(box["width"] / 2, 40), box["y"] + min(box["height"] / 2, 16)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 12, y + 12, steps=3)
    page.wait_for_function("() => document.querySelector('.rk-dragging-now .rk-ranking')")
    box = target.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=4)
    page.mouse.up()


def open_history(page):
    """The history dropdown's options (opening its list)."""
    page.locator("#history-list input").click()
    return page.locator("ul[role=listbox] li[role=option]")


def test_rank_skip_and_edit_in_the_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, store = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)  # no session yet: sent to the sign-in page

            # Sign in (a wrong password first).
            page.fill("#login-username", "alice")
            page.fill("#login-password", "wrong password")
            page.press("#login-password", "Enter")
            expect(page.locator("#login-error")).to_contain_text("wrong annotator name or password")
            page.fill("#login-password", PASSWORD)
            page.press("#login-password", "Enter")
            # The guidelines come first; the task waits until they are read.
            expect(page.locator("#guide-panel")).to_be_visible(timeout=30_000)  # on a busy CI machine
            expect(page.locator("#guide-text em")).to_have_text("helpful")
            expect(page.locator(".rk-layout")).to_be_hidden()
            page.click("#guide-ok")
            expect(page.locator(".rk-layout")).to_be_visible()
            expect(page.locator("#guide-panel")).to_be_hidden()
            expect(page.locator("#progress")).to_have_text("0 ranked · 2 tasks in all")
            expect(page.locator("#left")).to_have_text("2 left for you")
            expect(page.locator("#topbar-text")).to_contain_text("signed in as alice")
            expect(page.locator("#stats")).to_be_hidden()  # alice is no admin

            # The guidelines open with "?" and show the owner's (trusted) formatting.
            page.keyboard.press("?")
            expect(page.locator("#guidelines-text em")).to_have_text("helpful")
            page.keyboard.press("?")
            expect(page.locator("#guidelines-text em")).to_be_hidden()

            # Rank the story by keyboard: B first, then A; a C picked by mistake is undone; C then ties
            # with A ("=" then its key), and D too (Shift+key).
            first = page.locator(".rk-task-id").text_content()
            assert first == "story"
            first_task = store.get_task(first)
            assert_inert(page, first_task)
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
            expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
            expect(page.locator(".rk-task-id")).to_have_text("hamlet")
            expect(page.locator("#progress")).to_have_text("1 ranked · 2 tasks in all")
            expect(page.locator("#left")).to_have_text("1 left for you")
            second = "hamlet"
            assert_inert(page, store.get_task(second))

            # Skip the second task with a reason, from the keyboard.
            page.keyboard.press("s")
            page.keyboard.type("not sure about the plot")
            page.keyboard.press("Enter")
            expect(page.locator(".rk-done")).to_be_visible()
            expect(page.locator(".rk-toast")).to_have_text("Task skipped.")
            expect(page.locator("#progress")).to_have_text("1 ranked, 1 skipped · 2 tasks in all")

            # Go back to the first task from the history (its hostile prompt previews are plain text) and
            # change the ranking by click and drag-and-drop.
            page.locator("#history button.label-wrap").click()
            options = open_history(page)
            expect(options).to_have_count(2)
            assert options.nth(0).inner_text().startswith("skipped · hamlet · Summarise the plot of Hamlet")
            assert "<b>bold?</b>" in options.nth(0).inner_text()
            assert options.nth(1).inner_text().startswith("ranked · story · Write a two-sentence story")
            assert "keeper. <script>window.__pwned=1" in options.nth(1).inner_text()  # (preview cut)
            assert page.locator("#history script, #history b").count() == 0
            options.nth(1).click()
            expect(page.locator(".rk-banner")).to_be_visible()
            expect(page.locator(".rk-task-id")).to_have_text(first)
            assert_inert(page, first_task)
            assert badges(page) == ["rank 2 (tie)", "rank 1", "rank 2 (tie)", "rank 2 (tie)"]  # as stored
            page.keyboard.press("Escape")                 # clear (the keyboard is the ranker's again)
            assert badges(page) == ["", "", "", ""]
            cards = page.locator(".rk-completions .rk-card header")
            cards.nth(2).click()                          # C first
            cards.nth(0).click()                          # A second
            # Drag B onto rank 1 (asked: tie with C), D into the ranking's end, and D's chip back to "unranked"
            # and again to the end.
            completions = page.locator(".rk-completions .rk-card header")
            drag(page, completions.nth(1), page.locator('.rk-row[data-rank="1"]'))
            page.click(".rk-ask-tie")
            drag(page, completions.nth(3), page.locator(".rk-ranking .rk-gap").last)
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", "rank 3"]
            drag(page, page.locator('.rk-row[data-rank="3"] .rk-chip'), page.locator(".rk-row.rk-unranked"))
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", ""]
            drag(page, page.locator(".rk-row.rk-unranked .rk-chip"), page.locator(".rk-ranking .rk-gap").last)
            assert badges(page) == ["rank 2", "rank 1 (tie)", "rank 1 (tie)", "rank 3"]
            page.click(".rk-submit")
            expect(page.locator(".rk-toast")).to_have_text("Ranking updated.")
            expect(page.locator(".rk-done")).to_be_visible()
            expect(page.locator("#progress")).to_have_text("1 ranked, 1 skipped · 2 tasks in all")
            # The history follows the edit: the edited task is now the newest entry.
            options = open_history(page)
            expect(options.first).to_contain_text("ranked · story")

            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert errors == []

            # Signing out ends the session: the UI sends you to the sign-in page again.
            page.keyboard.press("Escape")
            page.click("#sign-out")
            expect(page.locator("#login-error")).to_have_text("Signed out.")
            page.goto(url)
            expect(page.locator("#login-form")).to_be_visible()

            # An admin sees the statistics view, with everyone's counts.
            page.fill("#login-username", "carol")
            page.fill("#login-password", PASSWORD)
            page.press("#login-password", "Enter")
            # (This browser has read these guidelines already: no panel.)
            expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)  # the first task, on a busy CI machine
            expect(page.locator("#guide-panel")).to_be_hidden()
            page.locator("#stats button.label-wrap").click()
            stats = page.locator("#stats-text textarea")
            expect(stats).to_have_value(re.compile(r"rankings: 2  skips: 1"))
            assert re.search(r"alice\s+1\s+1", stats.input_value())
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


# ------------------------------------------------------------------ a conversation, as Markdown, on two screens

# Every turn and every completion carries all of these; none may run, load, navigate or become markup.
HOSTILE = "\n\n".join([
    "<script>window.__pwned = 1</script>",
    '<img src="/pwned-img" onerror="window.__pwned = 1"> <iframe src="/pwned-frame"></iframe>',
    '<svg onload="window.__pwned = 1"></svg><style>body { background: url(/pwned-css) }</style>',
    "[click me](javascript:window.__pwned=1) ![logo](/pwned-md-image.png) <https://example.com/pwned-auto>",
    '<a href="/pwned-link">a link</a> <details open ontoggle="window.__pwned = 1">x</details>',
    "&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; &#60;img src=/pwned-entity&#62;",
    "`<img src=/pwned-code onerror=window.__pwned=1>`",
])
CHAT_TURNS = [
    {"role": "system", "content": "You are a *concise* Python tutor.\n\n" + HOSTILE},
    {"role": "user", "content": "How do I read a file?\n\n" + HOSTILE},
    {"role": "assistant", "content": "Use `open`:\n\n1. open it\n2. read it\n\n" + HOSTILE},
    {"role": "user", "content": "And a JSON file?\n\n" + HOSTILE},
    {"role": "assistant", "content": "`json.load(f)` reads it.\n\n" + HOSTILE},
    {"role": "user", "content": "Compare csv and json for me.\n\n" + HOSTILE},
]
MARKDOWN_REPLY = ("Here is a comparison:\n\n- **csv**: flat rows\n- *json*: nested values\n\n"
                  "```python\nimport json\nrows = json.load(open('data.json'))  # <b>not bold</b>\n```\n\n"
                  "| format | nests |\n|---|:-:|\n| csv | no |\n"
                  "| <img src=/pwned-cell onerror=window.__pwned=1> | yes |\n\n" + HOSTILE)
CHAT_REPLIES = [MARKDOWN_REPLY,
                "They differ in structure: csv is flat, json nests.\n\n" + HOSTILE,
                "They differ in speed: csv is flat, json is slower.\n\n" + HOSTILE]
PAIR_TURNS = [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "Which cat?"},
              {"role": "user", "content": "The one in the story."}]
PAIR_REPLIES = ["The cat sat on the mat.", "The cat lay on the red mat."]
# What content may become: the renderer's elements, with no attribute but a class (and a table cell's align).
CONTENT_TAGS = {"p", "span", "strong", "em", "del", "code", "pre", "ul", "ol", "li", "blockquote", "hr", "div",
                "table", "thead", "tbody", "tr", "th", "td", "mark", "section"}
PHONE = {"width": 390, "height": 844}


@pytest.fixture()
def chat_server(tmp_path):
    store = open_store(tmp_path / "labels.db")
    store.import_tasks([
        Task.from_dict({"id": "chat", "prompt": CHAT_TURNS,
                        "completions": [{"id": f"c{i}", "text": t} for i, t in enumerate(CHAT_REPLIES)]}),
        Task.from_dict({"id": "pair", "messages": PAIR_TURNS,
                        "completions": [{"id": f"p{i}", "text": t} for i, t in enumerate(PAIR_REPLIES)]}),
    ])
    add_annotator(store, "alice", PASSWORD)
    store.add_annotator("script")  # one earlier ranking of "pair": alice sees "chat" first
    store.submit_ranking("script", "pair", {"p0": 1, "p1": 2})
    with serving(store, AppSettings(overlap=2)) as (host, port):
        yield f"http://{host}:{port}/", store
    store.close()


def content_elements(page) -> list[str]:
    """tag:attribute,... of every element that the conversation and completions were rendered into."""
    return page.evaluate("""() => [...document.querySelectorAll(
        ".rk-turns .rk-turn-body *, .rk-prompt *, .rk-completions .rk-body *")].map((node) =>
        node.tagName.toLowerCase() + ":" + [...node.attributes].map((a) => a.name).join(","))""")


def assert_nothing_ran(page, origin: str, requests: list[str], dialogs: list[str]) -> None:
    elements = content_elements(page)
    assert {e.split(":")[0] for e in elements} <= CONTENT_TAGS
    assert {e.split(":")[1] for e in elements} <= {"", "class", "style"}
    markup = f"{RANKER} img, {RANKER} iframe, {RANKER} script, {RANKER} svg, {RANKER} a:not(.rk-session-link)"
    assert page.locator(markup).count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []
    assert [u for u in requests if "pwned" in u or not u.startswith(origin)] == []


def marked(page) -> dict[str, list[str]]:
    return page.eval_on_selector_all(".rk-completions .rk-card", """cards => Object.fromEntries(cards.map((card) =>
        [card.dataset.id, [...card.querySelectorAll("mark.rk-diff")].map((mark) => mark.textContent)]))""")


@pytest.mark.parametrize("screen", ["desktop", "phone"])
def test_a_conversation_as_markdown_with_hostile_turns(chat_server, screen):
    from playwright.sync_api import expect, sync_playwright

    url, store = chat_server
    phone = screen == "phone"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(**(dict(viewport=PHONE, is_mobile=True, has_touch=True) if phone
                                       else dict(viewport={"width": 1400, "height": 1000})))
            page.set_default_timeout(20_000)
            errors, requests, dialogs = [], [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: requests.append(request.url))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(url)
            page.fill("#login-username", "alice")
            page.fill("#login-password", PASSWORD)
            page.press("#login-password", "Enter")
            expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)
            expect(page.locator(".rk-task-id")).to_have_text("chat")
            height = page.viewport_size["height"]

            # The last user turn is shown above the completions, with its role; five earlier turns are
            # long: collapsed behind a summary.
            expect(page.locator(".rk-prompt-title")).to_have_text("Conversation")
            expect(page.locator(".rk-prompt-role")).to_have_text("User")
            last = page.locator(".rk-prompt")
            expect(last).to_be_visible()
            assert last.inner_text().startswith("Compare csv and json for me.\n")
            assert last.bounding_box()["y"] + last.bounding_box()["height"] <= \
                page.locator(".rk-card").first.bounding_box()["y"]
            earlier = page.locator(".rk-earlier")
            expect(earlier.locator("summary")).to_have_text("5 earlier turns")
            assert earlier.evaluate("node => node.open") is False
            expect(page.locator(".rk-turns")).to_be_hidden()

            # Opened: every role shown, Markdown rendered, in a panel of bounded height scrolled to the most
            # recent turn.
            earlier.locator("summary").click()
            turns = page.locator(".rk-turn")
            expect(turns).to_have_count(5)
            assert page.locator(".rk-turn .rk-role").all_inner_texts() == [
                "SYSTEM", "USER", "ASSISTANT", "USER", "ASSISTANT"]  # (shown upper-case by the style)
            assert [t.split(" ")[-1] for t in turns.evaluate_all("ts => ts.map((t) => t.className)")] == [
                "rk-turn-system", "rk-turn-user", "rk-turn-assistant", "rk-turn-user", "rk-turn-assistant"]
            expect(turns.nth(0).locator("em")).to_have_text("concise")
            assert turns.nth(2).locator("ol > li").all_inner_texts() == ["open it", "read it"]
            panel = page.locator(".rk-turns")
            page.wait_for_function("() => document.querySelector('.rk-turns').scrollTop > 0")
            box = panel.evaluate("node => [node.clientHeight, node.scrollHeight]")
            assert box[0] <= 0.45 * height + 1 and box[1] > box[0]
            expect(last).to_be_visible()
            for k in range(5):
                shown = turns.nth(k).locator(".rk-turn-body").inner_text()
                assert "<script>window.__pwned = 1</script>" in shown and "&lt;script&gt;" in shown
                assert "click me (javascript:window.__pwned=1) [image: logo] (/pwned-md-image.png)" in shown

            # The completions as Markdown: a list, a code block in monospace, a table.
            reply = page.locator('.rk-card[data-id="c0"] .rk-body')
            assert reply.locator("ul > li").all_inner_texts() == ["csv: flat rows", "json: nested values"]
            assert reply.locator("li strong").inner_text() == "csv"
            code = reply.locator("pre > code")
            assert code.inner_text() == "import json\nrows = json.load(open('data.json'))  # <b>not bold</b>"
            assert "monospace" in code.evaluate("node => getComputedStyle(node).fontFamily")
            assert reply.locator("th").all_inner_texts() == ["format", "nests"]
            assert reply.locator("td").all_inner_texts() == [
                "csv", "no", "<img src=/pwned-cell onerror=window.__pwned=1>", "yes"]
            for body in page.locator(".rk-completions .rk-body").all_inner_texts():
                assert "<script>window.__pwned = 1</script>" in body and "<a href=\"/pwned-link\">a link</a>" in body
            assert_nothing_ran(page, url, requests, dialogs)
            if phone:  # one column, nothing wider than the screen
                assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
                xs = {round(b["x"]) for b in (c.bounding_box() for c in page.locator(".rk-card").all())}
                assert len(xs) == 1

            # Highlight differences: with three completions, the second and third against the first shown.
            ids = shown_ids(page)
            toggle = page.locator(".rk-diff-toggle")
            toggle.tap() if phone else toggle.click()
            expect(toggle).to_have_attribute("aria-pressed", "true")
            expect(page.locator(".rk-diff-note")).to_have_text("marked: words that A lacks")
            marks = marked(page)
            assert marks[ids[0]] == [] and marks[ids[1]] and marks[ids[2]]
            assert_nothing_ran(page, url, requests, dialogs)

            # Rank (the toggle left the keyboard to the ranker) and submit.
            if phone:
                for k in (1, 0, 2):
                    page.locator(".rk-card header").nth(k).tap()
                page.locator(".rk-submit").tap()
            else:
                for key in ("2", "1", "3"):
                    page.keyboard.press(key)
                page.keyboard.press("Enter")
            expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")

            # The short conversation opens with its earlier turns shown; the toggle stays on: "sat" against
            # "lay ... red".
            expect(page.locator(".rk-task-id")).to_have_text("pair")
            assert page.locator(".rk-earlier").evaluate("node => node.open") is True
            expect(page.locator(".rk-earlier summary")).to_have_text("2 earlier turns")
            assert page.locator(".rk-turn .rk-role").all_inner_texts() == ["USER", "ASSISTANT"]
            expect(page.locator(".rk-prompt")).to_have_text("The one in the story.")
            expect(page.locator(".rk-diff-note")).to_have_text("marked: words the other lacks")
            assert marked(page) == {"p0": ["sat"], "p1": ["lay", "red"]}
            toggle.tap() if phone else toggle.click()
            expect(toggle).to_have_attribute("aria-pressed", "false")
            assert marked(page) == {"p0": [], "p1": []}
            assert sorted(page.locator(".rk-completions .rk-body").all_inner_texts()) == sorted(PAIR_REPLIES)
            pair_ids = shown_ids(page)
            if phone:
                page.locator(".rk-card header").nth(1).tap()
                page.locator(".rk-card header").nth(0).tap()
                page.locator(".rk-submit").tap()
            else:
                page.keyboard.press("b")
                page.keyboard.press("a")
                page.keyboard.press("Enter")
            expect(page.locator(".rk-done")).to_be_visible()
            assert_nothing_ran(page, url, requests, dialogs)
            assert errors == []
        finally:
            browser.close()

    assert store.get_own_ranking("alice", "chat").ranks == {ids[1]: 1, ids[0]: 2, ids[2]: 3}
    assert store.get_own_ranking("alice", "pair").ranks == {pair_ids[1]: 1, pair_ids[0]: 2}


# ------------------------------------------------------------------ a phone, the keyboard, drop targets, contrast

WIDE = ["An unbroken word: " + "x" * 300,
        "```\n" + "wide_code_line = " + "0123456789" * 20 + "\n```",
        "| " + " | ".join(f"column number {k}" for k in range(8)) + " |\n|" + "---|" * 8 + "\n| "
        + " | ".join(f"value {k}" for k in range(8)) + " |"]
GUIDELINES = "<p>Prefer <em>helpful</em> answers.</p>"


@pytest.fixture()
def team_server(tmp_path):
    store = open_store(tmp_path / "labels.db")
    store.import_tasks([Task.from_dict({"id": f"t{k}", "prompt": f"Prompt number {k}: " + "long prompt text " * 20,
                                        "completions": [{"id": f"t{k}-{i}", "text": text}
                                                        for i, text in enumerate(WIDE)]})
                        for k in range(3)])
    add_annotator(store, "alice", PASSWORD)
    with serving(store, AppSettings(overlap=1, guidelines_html=GUIDELINES)) as (host, port):
        yield f"http://{host}:{port}/", store
    store.close()


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


@contextmanager
def browser_page(**page_options):
    """A headless Chromium page (desktop size unless `page_options` say otherwise) and the list of script errors
    it raises; the browser closes after the block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(**(page_options or {"viewport": {"width": 1400, "height": 1000}}))
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def sign_in(page, url: str, read_guidelines: bool = True) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    page.fill("#login-username", "alice")
    page.fill("#login-password", PASSWORD)
    page.press("#login-password", "Enter")
    if read_guidelines:
        expect(page.locator("#guide-panel")).to_be_visible(timeout=30_000)
        page.click("#guide-ok")
    expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)


def in_view(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + min(box["height"], 40) <= page.viewport_size["height"]


def test_a_phone_ranks_with_taps_and_the_action_bar(team_server):
    from playwright.sync_api import expect

    url, store = team_server
    with browser_page(viewport=PHONE, is_mobile=True, has_touch=True) as (page, errors):
        page.goto(url)
        page.fill("#login-username", "alice")
        page.fill("#login-password", PASSWORD)
        page.press("#login-password", "Enter")
        # The guidelines first, in view; then the task. A reload does not show them again (read).
        expect(page.locator("#guide-panel")).to_be_visible(timeout=30_000)
        assert in_view(page, "#guide-ok")
        expect(page.locator("#guide-changed")).to_be_hidden()  # (read for the first time)
        expect(page.locator(".rk-layout")).to_be_hidden()
        expect(page.locator(".rk-bar")).to_be_hidden()
        page.locator("#guide-ok").tap()
        expect(page.locator(".rk-layout")).to_be_visible()
        page.reload()
        expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)
        expect(page.locator("#guide-panel")).to_be_hidden()
        # Guidelines other than the version read (as after the owner changed the file): shown again, saying so.
        page.evaluate("localStorage.setItem('rlhf-label-guidelines-read', 'an older version')")
        page.reload()
        expect(page.locator("#guide-panel")).to_be_visible(timeout=30_000)
        expect(page.locator("#guide-changed")).to_have_text("The guidelines changed since you last read them.")
        expect(page.locator(".rk-layout")).to_be_hidden()
        page.locator("#guide-ok").tap()
        expect(page.locator(".rk-layout")).to_be_visible()
        expect(page.locator("#left")).to_have_text("3 left for you")

        # No keyboard hints on a touch screen.
        for hint in (".rk-keys", ".rk-card .rk-key", ".rk-submit kbd"):
            expect(page.locator(hint).first).to_be_hidden()
        # Each card fits its column (an unbroken word, a wide code line and a wide table scroll inside),
        # and nothing is wider than the screen.
        column = page.locator(".rk-completions").bounding_box()
        assert column["x"] >= 0 and column["x"] + column["width"] <= PHONE["width"]
        for card in page.locator(".rk-card").all():
            box = card.bounding_box()
            assert column["x"] - 0.5 <= box["x"] and box["x"] + box["width"] <= column["x"] + column["width"] + 0.5
            assert card.evaluate("node => node.scrollWidth <= node.clientWidth + 1")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

        # The action bar stays at the bottom of the screen wherever the page is scrolled.
        bar = page.locator(".rk-bar")
        for scroll in (0, 100_000):
            page.evaluate(f"window.scrollTo(0, {scroll})")
            box = bar.bounding_box()
            assert abs(box["y"] + box["height"] - PHONE["height"]) <= 1 and box["width"] == PHONE["width"]
            for button in (".rk-bar-submit", ".rk-bar-skip", ".rk-bar-tie"):
                assert page.locator(button).bounding_box()["height"] >= 44  # a finger's size
        expect(page.locator(".rk-bar-submit")).to_be_disabled()

        # Ties by tapping: B, then "Tie next" and A (tied with B), then C.
        page.evaluate("window.scrollTo(0, 0)")
        ids = shown_ids(page)
        headers = page.locator(".rk-card header")
        headers.nth(1).tap()
        page.locator(".rk-bar-tie").tap()
        expect(page.locator(".rk-bar-tie")).to_have_attribute("aria-pressed", "true")
        headers.nth(0).tap()
        expect(page.locator(".rk-bar-tie")).to_have_attribute("aria-pressed", "false")  # one tie per tap
        headers.nth(2).tap()
        assert badges(page) == ["rank 1 (tie)", "rank 1 (tie)", "rank 2"]
        expect(page.locator(".rk-bar-summary")).to_have_text("B = A > C")

        # Submitted from the bottom of the page: the next task opens with its prompt in view.
        page.evaluate("window.scrollTo(0, 100_000)")
        first = page.locator(".rk-task-id").text_content()
        assert not in_view(page, ".rk-prompt")
        page.locator(".rk-bar-submit").tap()
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
        expect(page.locator(".rk-task-id")).not_to_have_text(first)
        page.wait_for_function("() => document.querySelector('.rk-prompt').getBoundingClientRect().top >= 0")
        assert in_view(page, ".rk-prompt") and in_view(page, ".rk-task-id")
        expect(page.locator("#left")).to_have_text("2 left for you")
        second = page.locator(".rk-task-id").text_content()

        # Skip from the bar.
        page.evaluate("window.scrollTo(0, 100_000)")
        page.locator(".rk-bar-skip").tap()
        expect(page.locator(".rk-toast")).to_have_text("Task skipped.")
        expect(page.locator(".rk-task-id")).not_to_have_text(second)
        expect(page.locator("#left")).to_have_text("1 left for you")
        assert errors == []
    assert store.get_own_ranking("alice", first).ranks == {ids[1]: 1, ids[0]: 1, ids[2]: 2}
    assert [(e["kind"], e["task_id"]) for e in store.events()] == [("submit", first), ("skip", second)]


def test_cards_by_tab_with_visible_focus_and_drops_that_ask(team_server):
    from playwright.sync_api import expect

    url, store = team_server
    with browser_page() as (page, errors):
        sign_in(page, url)
        ids = shown_ids(page)
        expect(page.locator(".rk-keys")).to_be_visible()  # a desktop shows the keyboard hints

        # Tab reaches every card, and the focused card has a visible focus ring.
        reached = []
        for _ in range(40):
            page.keyboard.press("Tab")
            focused = page.evaluate("""() => { const n = document.activeElement;
                if (!n.classList.contains('rk-card')) return null;
                const s = getComputedStyle(n);
                return [n.dataset.id, s.outlineStyle, parseFloat(s.outlineWidth)]; }""")
            if focused:
                assert focused[1] == "solid" and focused[2] >= 2
                if focused[0] not in reached:
                    reached.append(focused[0])
            if len(reached) == len(ids):
                break
        assert reached == ids
        # Space picks the focused card; Shift+Enter on the next one ties it.
        def tab_back_to(card_id: str) -> None:
            for _ in range(20):
                if page.evaluate("document.activeElement.dataset.id") == card_id:
                    return
                page.keyboard.press("Shift+Tab")
            raise AssertionError(f"Shift+Tab never reached {card_id}")

        tab_back_to(ids[0])
        page.keyboard.press("Space")                   # A
        tab_back_to(ids[0])
        while page.evaluate("document.activeElement.dataset.id") != ids[1]:
            page.keyboard.press("Tab")
        page.keyboard.press("Shift+Enter")             # B, tied with A
        assert badges(page) == ["rank 1 (tie)", "rank 1 (tie)", ""]

        # While dragging, every place between ranks is a drop target of at least 32 px; a drop on a
        # rank row asks: tie, or a new rank above or below (Esc: nothing changes).
        cards = page.locator(".rk-card header")
        drag(page, cards.nth(2), page.locator('.rk-row[data-rank="1"]'))
        expect(page.locator(".rk-ask")).to_be_visible()
        assert page.locator(".rk-ask button").all_inner_texts() == [
            "tie with rank 1", "new rank above", "new rank below", "cancel"]
        page.keyboard.press("Escape")
        expect(page.locator(".rk-ask")).to_have_count(0)
        assert badges(page) == ["rank 1 (tie)", "rank 1 (tie)", ""]
        box = cards.nth(2).bounding_box()
        page.mouse.move(box["x"] + 40, box["y"] + 16)
        page.mouse.down()
        page.mouse.move(box["x"] + 52, box["y"] + 28, steps=3)
        page.wait_for_function("() => document.querySelector('.rk-dragging-now .rk-ranking')")
        targets = page.locator(".rk-ranking .rk-gap, .rk-ranking .rk-row").all()
        heights = [target.bounding_box()["height"] for target in targets]
        assert len(heights) == 4 and min(heights) >= 32
        row = page.locator('.rk-row[data-rank="1"]').bounding_box()
        page.mouse.move(row["x"] + row["width"] / 2, row["y"] + row["height"] / 2, steps=4)
        page.mouse.up()
        page.click(".rk-ask-above")                    # C alone at rank 1, A and B at rank 2
        assert badges(page) == ["rank 2 (tie)", "rank 2 (tie)", "rank 1"]
        assert page.locator(".rk-gap").first.bounding_box()["height"] < 32  # thin again at rest
        drag(page, page.locator('.rk-row[data-rank="2"] .rk-chip').first, page.locator('.rk-row[data-rank="2"]'))
        assert page.locator(".rk-ask button").all_inner_texts() == ["new rank above", "new rank below", "cancel"]
        page.click(".rk-ask-below")                    # A out of the tie, below B
        assert badges(page) == ["rank 3", "rank 2", "rank 1"]
        drag(page, page.locator('.rk-row[data-rank="3"] .rk-chip'), page.locator('.rk-row[data-rank="1"]'))
        page.click(".rk-ask-tie")                      # A tied with C
        assert badges(page) == ["rank 1 (tie)", "rank 2", "rank 1 (tie)"]

        # A clicked card keeps Enter for submitting.
        cards.nth(1).click()
        cards.nth(1).click()                           # (B out and in again: rank 2)
        assert badges(page) == ["rank 1 (tie)", "rank 2", "rank 1 (tie)"]
        page.keyboard.press("Enter")
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")

        # The session ends (signed out everywhere) while a task is open: the answer is refused and a
        # message links to the sign-in page.
        store.end_sessions("alice")
        for key in ("1", "2", "3", "Enter"):
            page.keyboard.press(key)
        expect(page.locator(".rk-session")).to_be_visible(timeout=15_000)
        expect(page.locator(".rk-session")).to_contain_text("Your session has ended")
        page.click(".rk-session-link")
        expect(page.locator("#login-form")).to_be_visible()
        assert errors == []
    first = store.events()[0]["task_id"]
    assert len(store.events()) == 1
    assert store.get_own_ranking("alice", first).ranks == {ids[0]: 1, ids[1]: 2, ids[2]: 1}


CONTRAST = (Path(__file__).resolve().parent / "contrast.js").read_text(encoding="utf-8")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_has_a_contrast_of_at_least_4_5(team_server, scheme):
    """WCAG 2 contrast of each visible text against the background it is drawn on (its own and its ancestors'
    colours composited; text in a disabled control is exempt, as in WCAG), on the guidelines panel, a task with
    ranks, tie mode, an error and marked differences, the tie-or-insert question, the history and the toast:
    desktop and phone. (tests/contrast.js found Gradio's primary button at 3.7:1 and the dark header at 3.3:1.)"""
    from playwright.sync_api import expect, sync_playwright

    url, store = team_server
    with sync_playwright() as p:
        browser = launch(p)
        try:
            for phone in (False, True):
                context = browser.new_context(color_scheme=scheme, **(
                    dict(viewport=PHONE, is_mobile=True, has_touch=True) if phone
                    else dict(viewport={"width": 1400, "height": 1000})))
                page = context.new_page()
                page.set_default_timeout(20_000)
                checked: list[dict] = []

                def check(what: str, page=page, where=f"{scheme}, {'phone' if phone else 'desktop'}",
                          checked=checked) -> None:
                    texts = page.evaluate(CONTRAST)
                    assert [t for t in texts if "unknown" in t] == [], what
                    low = [t for t in texts if t["ratio"] < 4.5]
                    assert low == [], f"{where}, {what}: {low}"
                    checked.extend(texts)

                page.goto(url)
                page.fill("#login-username", "alice")
                page.fill("#login-password", PASSWORD)
                page.press("#login-password", "Enter")
                expect(page.locator("#guide-panel")).to_be_visible(timeout=30_000)
                assert page.evaluate("document.body.classList.contains('dark')") == (scheme == "dark")
                check("guidelines")
                page.click("#guide-ok")
                expect(page.locator(".rk-layout")).to_be_visible()
                page.click(".rk-diff-toggle")
                page.click(".rk-submit", force=True)       # disabled: nothing happens
                page.keyboard.press("Enter")               # "Rank every completion first"
                expect(page.locator(".rk-error")).not_to_be_empty()
                page.keyboard.press("1")
                page.keyboard.press("=")
                check("a task")
                page.keyboard.press("2")
                page.keyboard.press("3")
                if not phone:
                    drag(page, page.locator(".rk-card header").nth(2), page.locator('.rk-row[data-rank="1"]'))
                    expect(page.locator(".rk-ask")).to_be_visible()
                    check("the tie-or-insert question")
                    page.keyboard.press("Escape")
                page.locator("#history button.label-wrap").click()
                check("history")
                page.locator(".rk-bar-submit").tap() if phone else page.click(".rk-submit")
                expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
                check("the toast")
                assert len(checked) > 100 and {t["cls"] for t in checked} >= {"rk-badge rk-r1", "rk-title", "progress"}
                context.close()
        finally:
            browser.close()


EVIL_ID = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture()
def review_server(tmp_path):
    store = open_store(tmp_path / "labels.db")
    store.import_tasks([Task.from_dict({"id": tid, "prompt": "Which is better?",
                                        "completions": [{"id": f"{tid}-{i}", "text": f"{EVIL_ID} answer {i}"}
                                                        for i in range(3)]}) for tid in ("calm", EVIL_ID, "open")])
    add_annotator(store, "carol", PASSWORD)
    add_annotator(store, "alice", PASSWORD)
    for name in ("ann1", "ann2"):
        store.add_annotator(name)
    store.submit_ranking("ann1", "calm", {"calm-0": 1, "calm-1": 2, "calm-2": 3}, seconds=10)
    store.submit_ranking("ann2", "calm", {"calm-0": 3, "calm-1": 2, "calm-2": 1}, seconds=20)
    store.submit_ranking("ann1", EVIL_ID, {f"{EVIL_ID}-0": 1, f"{EVIL_ID}-1": 2, f"{EVIL_ID}-2": 3})
    store.submit_ranking("ann2", EVIL_ID, {f"{EVIL_ID}-0": 1, f"{EVIL_ID}-1": 3, f"{EVIL_ID}-2": 2},
                         comment="see <b>B</b>", flags=["off-topic"])
    with serving(store, AppSettings(overlap=2, admins=frozenset({"carol"}))) as (host, port):
        yield f"http://{host}:{port}/", store
    store.close()


def table_rows(page, selector: str) -> list[list[str]]:
    """The cells of a Gradio Dataframe's rows (drawn as div rows of grid cells)."""
    return page.eval_on_selector_all(f"{selector} .virtual-row[role=row]", """rows => rows.map((row) =>
        [...row.querySelectorAll("[role=gridcell]")].map((cell) => cell.innerText.trim()))""")


def test_the_admin_view_shows_annotators_and_the_most_disagreed_tasks(review_server):
    from playwright.sync_api import expect

    url, store = review_server
    with browser_page() as (page, errors):
        page.goto(url)
        page.fill("#login-username", "alice")  # no admin: no admin view
        page.fill("#login-password", PASSWORD)
        page.press("#login-password", "Enter")
        expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)
        expect(page.locator("#admin")).to_be_hidden()
        # alice flags her task unsafe (by the keyboard) and comments with markup: stored as given, shown as text.
        expect(page.locator(".rk-task-id")).to_have_text("open")
        page.locator('.rk-flag[data-flag="unsafe"]').focus()
        page.keyboard.press("Space")
        expect(page.locator('.rk-flag[data-flag="unsafe"]')).to_have_attribute("aria-pressed", "true")
        page.fill(".rk-comment", EVIL_ID)
        page.locator(".rk-comment").blur()
        for key in ("3", "1", "2", "Enter"):
            page.keyboard.press(key)
        expect(page.locator(".rk-done")).to_be_visible()
        mine = store.get_own_ranking("alice", "open")
        assert (mine.comment, mine.flags) == (EVIL_ID, ("unsafe",))
        page.click("#sign-out")
        page.goto(url)
        page.fill("#login-username", "carol")
        page.fill("#login-password", PASSWORD)
        page.press("#login-password", "Enter")
        expect(page.locator(".rk-layout")).to_be_visible(timeout=30_000)
        page.locator("#admin button.label-wrap").click()
        expect(page.locator("#admin-annotators .virtual-row[role=row]")).to_have_count(4)
        rows = {row[0]: row[1:3] for row in table_rows(page, "#admin-annotators")}
        assert rows == {"ann1": ["2", "0"], "ann2": ["2", "0"], "alice": ["1", "0"], "carol": ["0", "0"]}
        # Comments and flags, newest first, the comments as text.
        assert table_rows(page, "#admin-notes") == [["open", "alice", "ranked", "unsafe", EVIL_ID],
                                                    [EVIL_ID, "ann2", "ranked", "off-topic", "see <b>B</b>"]]
        # The reversed task first; the hostile task id is shown as text.
        disagreed = table_rows(page, "#admin-disagreed")
        assert [row[0] for row in disagreed] == ["calm", EVIL_ID]
        page.locator("#admin-review-pick input").click()
        page.locator("ul[role=listbox] li[role=option]").nth(1).click()
        expect(page.locator("#admin-review-rankings .virtual-row[role=row]")).to_have_count(2)
        assert table_rows(page, "#admin-review-rankings") == [["ann1", "A > B > C", "", ""],
                                                              ["ann2", "A > C > B", "off-topic", "see <b>B</b>"]]
        assert [row[2] for row in table_rows(page, "#admin-review-legend")] == [
            f"{EVIL_ID} answer {i}" for i in range(3)]
        expect(page.locator("#admin-review-status textarea")).to_have_value("Not a gold question. Not resolved.")
        # The picker's list fades out after a pick: measure once it is gone, not mid-fade.
        expect(page.locator("ul[role=listbox]")).to_have_count(0)
        texts = page.evaluate(CONTRAST)  # the admin view's text is as legible as the ranker's
        assert len(texts) > 50 and [t for t in texts if "unknown" in t or t["ratio"] < 4.5] == []

        # A resolved ranking, typed as labels (a wrong one is refused with a reason, nothing stored).
        page.fill("#admin-resolve-text textarea", "C > A > D")
        page.click("#admin-resolve")
        expect(page.locator("#admin-review-status textarea")).to_have_value(
            "no completion is labelled 'D' (the labels: A, B, C)")
        assert store.resolutions() == {}
        page.fill("#admin-resolve-text textarea", "C > a = B")
        page.click("#admin-resolve")
        expect(page.locator("#admin-review-status textarea")).to_have_value(
            "Saved. Not a gold question. Resolved: C > A = B (by carol).")
        assert store.resolutions()[EVIL_ID][:2] == (
            {f"{EVIL_ID}-2": 1, f"{EVIL_ID}-0": 2, f"{EVIL_ID}-1": 2}, "carol")
        page.click("#admin-refresh")
        expect(page.locator("#admin-disagreed")).to_contain_text("carol")
        page.click("#admin-unresolve")
        expect(page.locator("#admin-review-status textarea")).to_have_value(
            "Saved. Not a gold question. Not resolved.")
        assert store.resolutions() == {}

        # ann1's ranking becomes the task's gold answer: ann2 (one pair of three the other way) is flagged.
        page.locator("#admin-gold-from input").click()
        page.locator("ul[role=listbox] li[role=option]", has_text="ann1").click()
        page.click("#admin-make-gold")
        expect(page.locator("#admin-review-status textarea")).to_have_value(
            "Saved. Gold question: A > B > C (the ranking of ann1). Not resolved.")
        page.click("#admin-refresh")
        columns = page.eval_on_selector_all("#admin-annotators [role=columnheader]",
                                            "cells => cells.map((c) => c.innerText.trim())")
        expect(page.locator("#admin-annotators")).to_contain_text("0.667")
        rows = {row[0]: dict(zip(columns, row)) for row in table_rows(page, "#admin-annotators")}
        assert (rows["ann2"]["gold_tasks"], rows["ann2"]["gold_accuracy"], rows["ann2"]["flagged"]) == (
            "1", "0.667", "true")
        assert rows["ann1"]["gold_tasks"] == "0"
        assert store.gold_answers()[EVIL_ID] == ({f"{EVIL_ID}-0": 1, f"{EVIL_ID}-1": 2, f"{EVIL_ID}-2": 3},
                                                 "ann1")
        page.click("#admin-drop-gold")
        expect(page.locator("#admin-review-status textarea")).to_have_value(
            "Saved. Not a gold question. Not resolved.")
        assert store.gold_answers() == {}
        assert page.locator("#admin img, #admin script").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert errors == []


def drafts_in(page, expected: dict[str, list]) -> bool:
    """Whether the browser's drafts become `expected` ({"annotator/task id": groups}) within 10 s."""
    for _ in range(100):
        drafts = page.evaluate("""() => Object.fromEntries(Object.keys(localStorage)
            .filter((k) => k.startsWith("rlhf-label-draft"))
            .map((k) => [k.split("\\u0000").slice(1).join("/"), JSON.parse(localStorage.getItem(k)).groups]))""")
        if drafts == expected:
            return True
        page.wait_for_timeout(100)
    raise AssertionError(f"drafts {drafts} != {expected}")


def test_a_half_ranked_task_comes_back_after_a_reload_and_a_new_sign_in(team_server):
    from playwright.sync_api import expect

    url, store = team_server
    with browser_page() as (page, errors):
        sign_in(page, url)
        first = page.locator(".rk-task-id").text_content()
        ids = shown_ids(page)
        page.keyboard.press("2")
        page.keyboard.press("Shift+1")                 # A tied with B; C not ranked yet
        expect(page.locator(".rk-badge").nth(0)).to_have_text("rank 1 (tie)")
        assert drafts_in(page, {f"alice/{first}": [[ids[1], ids[0]]]})
        for _ in range(100):  # the server keeps it too, shortly after the last change
            if store.draft("alice", first) == {ids[1]: 1, ids[0]: 1}:
                break
            page.wait_for_timeout(100)
        assert store.draft("alice", first) == {ids[1]: 1, ids[0]: 1}

        # Another browser (another device, nothing stored there): the server's draft comes back.
        other = page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
        other_page = other.new_page()
        sign_in(other_page, url)
        expect(other_page.locator(".rk-toast")).to_have_text("Your unsent ranking of this task is back.")
        expect(other_page.locator(".rk-task-id")).to_have_text(first)
        assert badges(other_page) == ["rank 1 (tie)", "rank 1 (tie)", ""]
        other.close()

        page.reload()                                  # a reload: the same task, the same half ranking
        expect(page.locator(".rk-toast")).to_have_text("Your unsent ranking of this task is back.",
                                                       timeout=30_000)
        expect(page.locator(".rk-task-id")).to_have_text(first)
        assert badges(page) == ["rank 1 (tie)", "rank 1 (tie)", ""]
        page.keyboard.press("u")                       # undo goes back to how the task opened
        assert badges(page) == ["", "", ""]
        assert drafts_in(page, {})
        page.keyboard.press("2")
        page.keyboard.press("1")

        # The session ends: the answer is not sent, the draft stays; after signing in again it is back.
        store.end_sessions("alice")
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        expect(page.locator(".rk-session")).to_be_visible(timeout=15_000)
        assert drafts_in(page, {f"alice/{first}": [[ids[1]], [ids[0]], [ids[2]]]})
        page.click(".rk-session-link")
        page.fill("#login-username", "alice")
        page.fill("#login-password", PASSWORD)
        page.press("#login-password", "Enter")
        expect(page.locator(".rk-toast")).to_have_text("Your unsent ranking of this task is back.",
                                                       timeout=30_000)
        expect(page.locator(".rk-task-id")).to_have_text(first)
        assert badges(page) == ["rank 2", "rank 1", "rank 3"]
        page.keyboard.press("Enter")
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
        expect(page.locator(".rk-task-id")).not_to_have_text(first)
        assert drafts_in(page, {})  # stored: the draft is gone
        assert store.draft("alice", first) is None
        assert errors == []
    assert store.get_own_ranking("alice", first).ranks == {ids[1]: 1, ids[0]: 2, ids[2]: 3}


def test_a_submit_refused_over_the_request_budget_can_be_sent_again(tmp_path, monkeypatch):
    """Over the annotator's request budget the submit's event is refused (429, the server's message in Gradio's
    toast): within seconds the ranker lets the annotator send again, the ranking still on screen, and once the
    budget refills the same answer is stored, once."""
    import httpx
    from playwright.sync_api import expect

    import labeling.guards

    monkeypatch.setattr(labeling.guards, "REFUSAL_PAUSE_SECONDS", 0.05)
    store = open_store(tmp_path / "labels.db")
    store.import_tasks([Task.from_dict({"id": f"t{k}", "prompt": f"prompt {k}", "completions": ["a", "b"]})
                        for k in range(2)])
    add_annotator(store, "alice", PASSWORD)
    with serving(store, AppSettings(overlap=1, request_rate=0.2)) as (host, port), \
            browser_page() as (page, errors), httpx.Client(base_url=f"http://{host}:{port}") as script:
        sign_in(page, f"http://{host}:{port}/", read_guidelines=False)
        first = page.locator(".rk-task-id").text_content()
        ids = shown_ids(page)
        page.keyboard.press("2")
        page.keyboard.press("1")
        for _ in range(100):  # the draft is saved (a budgeted request) before the budget is spent
            if store.draft("alice", first) == {ids[1]: 1, ids[0]: 2}:
                break
            page.wait_for_timeout(100)
        # The same annotator's script spends the rest of the budget: one request each 5 s from now on.
        script.post("/api/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        while script.get("/api/session").status_code != 429:
            pass
        page.keyboard.press("Enter")
        expect(page.get_by_text(re.compile("too many requests"))).to_be_visible(timeout=5_000)
        expect(page.locator(".rk-error")).to_have_text(re.compile("No answer from the server yet"), timeout=8_000)
        assert store.get_own_ranking("alice", first) is None  # refused before any handler
        assert badges(page) == ["rank 2", "rank 1"]  # still on screen
        for _ in range(6):  # send again once a token is back (one each 5 s; the page's own requests spend too)
            page.wait_for_timeout(5_500)
            page.keyboard.press("Enter")
            for _ in range(60):
                if page.locator(".rk-toast").text_content() == "Ranking saved.":
                    break
                page.wait_for_timeout(100)
            if page.locator(".rk-toast").text_content() == "Ranking saved.":
                break
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
        assert errors == []
    assert store.get_own_ranking("alice", first).ranks == {ids[1]: 1, ids[0]: 2}
    assert [e["kind"] for e in store.events()] == ["submit"]
    store.close()


def test_undo_the_last_submit_and_the_last_skip(team_server):
    from playwright.sync_api import expect

    url, store = team_server
    with browser_page() as (page, errors):
        sign_in(page, url)
        undo = page.locator(".rk-undo-answer")
        expect(undo).to_be_hidden()
        first = page.locator(".rk-task-id").text_content()
        ids = shown_ids(page)
        for key in ("1", "2", "3", "Enter"):
            page.keyboard.press(key)
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
        expect(page.locator(".rk-task-id")).not_to_have_text(first)
        # Undo: the task opens again with the stored ranking; changed and submitted, it is an edit.
        undo.click()
        expect(page.locator(".rk-task-id")).to_have_text(first)
        expect(page.locator(".rk-banner")).to_be_visible()
        assert badges(page) == ["rank 1", "rank 2", "rank 3"]
        expect(undo).to_be_hidden()
        for key in ("Escape", "3", "2", "1", "Enter"):
            page.keyboard.press(key)
        expect(page.locator(".rk-toast")).to_have_text("Ranking updated.")
        second = page.locator(".rk-task-id").text_content()
        assert second != first

        # Undo a skip flagged broken-prompt: the task opens again with its reason and flag, and can be ranked.
        page.click('.rk-flag[data-flag="broken-prompt"]')
        page.keyboard.press("s")
        page.keyboard.type("the prompt is cut off")
        page.keyboard.press("Enter")
        expect(page.locator(".rk-toast")).to_have_text("Task skipped.")
        expect(page.locator(".rk-task-id")).not_to_have_text(second)
        expect(page.locator(".rk-comment")).to_have_value("")  # the next task: no comment, no flag
        expect(page.locator('.rk-flag[aria-pressed="true"]')).to_have_count(0)
        undo.click()
        expect(page.locator(".rk-task-id")).to_have_text(second)
        expect(page.locator(".rk-comment")).to_have_value("the prompt is cut off")
        expect(page.locator('.rk-flag[data-flag="broken-prompt"]')).to_have_attribute("aria-pressed", "true")
        second_ids = shown_ids(page)
        for key in ("2", "1", "3", "Enter"):
            page.keyboard.press(key)
        expect(page.locator(".rk-toast")).to_have_text("Ranking saved.")
        # The offer lasts a short while only.
        expect(undo).to_be_visible()
        expect(undo).to_be_hidden(timeout=15_000)
        assert errors == []
    assert [(e["kind"], e["task_id"]) for e in store.events()] == [
        ("submit", first), ("edit", first), ("skip", second), ("submit", second)]
    assert store.get_own_ranking("alice", first).ranks == {ids[2]: 1, ids[1]: 2, ids[0]: 3}
    assert store.get_own_ranking("alice", second).ranks == {second_ids[1]: 1, second_ids[0]: 2, second_ids[2]: 3}
    assert store.events()[2]["payload"] == {"reason": "the prompt is cut off", "flags": ["broken-prompt"]}
    assert store.get_own_ranking("alice", second).flags == ("broken-prompt",)
