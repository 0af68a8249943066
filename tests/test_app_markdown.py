"""The ranker's safe Markdown renderer (labeling/static/markdown.js) and word diff (worddiff.js), run in
headless Chromium on hand-made inputs: the exact elements each construct gives, hostile HTML kept as text,
and the words marked as different. The whole app is driven in tests/test_app_browser.py."""

from __future__ import annotations

import os

import pytest

from labeling.gradio_ui import STATIC_DIR

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is missing (install it with `make browser` or `apt-get install chromium`)"),
]

# A compact picture of a rendered tree: tag(children...) with text in quotes, classes after a dot.
OUTLINE = """
window.outline = (node) => [...node.childNodes].map((child) => {
  if (child.nodeType === Node.TEXT_NODE) return JSON.stringify(child.data);
  const cls = child.className ? "." + child.className.split(" ")[0] : "";
  return child.tagName.toLowerCase() + cls + "(" + window.outline(child) + ")";
}).join(" ");
window.md = (text) => { const box = document.createElement("div"); renderMarkdown(box, text); return box; };
window.render = (text) => window.outline(window.md(text));
"""


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_content("<main></main>")
            scripts = "\n".join((STATIC_DIR / name).read_text(encoding="utf-8")
                                for name in ("markdown.js", "worddiff.js"))
            page.add_script_tag(content=scripts + OUTLINE)
            yield page
        finally:
            browser.close()


def render(page, text: str) -> str:
    return page.evaluate("text => render(text)", text)


@pytest.mark.parametrize("text, expected", [
    ("Hello *world*, **bold** and `x < y`\nsecond line",
     'p("Hello " em("world") ", " strong("bold") " and " code("x < y") "\\nsecond line")'),
    ("one\n\ntwo", 'p("one") p("two")'),
    ("- a\n- b *c*\n  - nested\n- d",
     'ul(li("a") li("b " em("c") ul(li("nested"))) li("d"))'),
    ("Steps:\n1. first\n2. second\n\n3. third",
     'p("Steps:") ol(li(p("first")) li(p("second")) li(p("third")))'),
    ("3) three\n4) four", 'ol(li("three") li("four"))'),
    ("```python\nif a < b:\n    print('<b>')\n```\nafter",
     'pre(code("if a < b:\\n    print(\'<b>\')")) p("after")'),
    ("~~~\nunclosed fence\n# not a heading", 'pre(code("unclosed fence\\n# not a heading"))'),
    ("| name | score |\n|:---|---:|\n| **x** | 1 |\n| y |",
     'div.rk-md-table(table(thead(tr(th("name") th("score"))) '
     'tbody(tr(td(strong("x")) td("1")) tr(td("y") td()))))'),
    ("# Title #\ntext\n\nSub\n---", 'p.rk-md-h("Title") p("text") p.rk-md-h("Sub")'),
    ("> quoted\n> > deeper\n\n***", 'blockquote(p("quoted") blockquote(p("deeper"))) hr()'),
    ("snake_case_name, _em_, ***both***, ~~gone~~, \\*literal\\*, 2*3*4",
     'p("snake_case_name, " em("em") ", " strong(em("both")) ", " del("gone") ", *literal*, 2" em("3") "4")'),
    ("`` a ` b `` and ``unclosed", 'p(code("a ` b") " and ``unclosed")'),
    ("** not bold ** and *", 'p("** not bold ** and *")'),
    ("zero\u200bwidth \u202eevil", 'p("zero" span.rk-ctrl("U+200B") "width " span.rk-ctrl("U+202E") "evil")'),
])
def test_markdown_constructs(page, text, expected):
    assert render(page, text) == expected


@pytest.mark.parametrize("text, expected", [
    ('<script>window.__pwned=1</script> <img src="/x" onerror="window.__pwned=1">',
     'p("<script>window.__pwned=1</script> <img src=\\"/x\\" onerror=\\"window.__pwned=1\\">")'),
    ("[click](javascript:alert(1)) and ![logo](/pwned.png)",
     'p(span.rk-md-link("click") span.rk-md-address(" (javascript:alert(1))") " and " '
     'span.rk-md-image("[image: logo]") span.rk-md-address(" (/pwned.png)"))'),
    ("&lt;b&gt; &amp; &#60;i&#62; <https://example.com>", 'p("&lt;b&gt; &amp; &#60;i&#62; <https://example.com>")'),
    ('[**bold** <iframe src="/f">](/u)',
     'p(span.rk-md-link(strong("bold") " <iframe src=\\"/f\\">") span.rk-md-address(" (/u)"))'),
])
def test_html_and_links_stay_text(page, text, expected):
    assert render(page, text) == expected


def test_nothing_runs_or_loads(page):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    hostile = "\n\n".join([
        '<script>window.__pwned = 1</script>', '<img src="/pwned-img" onerror="window.__pwned = 1">',
        '<iframe src="/pwned-frame"></iframe>', '<svg onload="window.__pwned = 1"></svg>',
        '<style>main { background: url(/pwned-css) }</style>', '![x](/pwned-md.png)',
        '[y](javascript:window.__pwned=1)',
        '| <img src=/pwned-cell onerror=window.__pwned=1> |\n|---|\n| <script>window.__pwned=1</script> |',
        '- <a href="/pwned-a">a</a>\n- `<b>code</b>`', '```\n<script>window.__pwned = 1</script>\n```'])
    tags = page.evaluate("""text => {
        const box = md(text);
        document.querySelector("main").append(box);
        return [...box.querySelectorAll("*")].map((node) => node.tagName.toLowerCase() + ":"
            + [...node.attributes].map((a) => a.name).join(","));
    }""", hostile)
    page.wait_for_timeout(300)  # time for any image or frame to start loading
    assert {tag.split(":")[0] for tag in tags} <= {"p", "span", "div", "table", "thead", "tbody", "tr", "th", "td",
                                                  "ul", "li", "code", "pre"}
    assert {tag.split(":")[1] for tag in tags} <= {"", "class"}
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert [url for url in requests if "pwned" in url] == []
    assert "<script>window.__pwned = 1</script>" in page.inner_text("main")


def test_hostile_nesting_stays_bounded(page):
    # Deep quotes and lists stop nesting at a fixed depth; the rest is shown as text, nothing lost.
    text = ">" * 5000 + " end"
    depth, shown = page.evaluate("""text => {
        const box = md(text);
        let depth = 0;
        for (let node = box.firstChild; node && node.tagName === "BLOCKQUOTE"; node = node.firstChild) depth++;
        return [depth, box.textContent];
    }""", text)
    assert depth == 12 and shown.endswith(">" * (5000 - 12) + " end")
    assert render(page, "******x*") == 'p("******x*")'  # runs of more than three delimiters stay literal
    # Link scans share a budget per text: a flood of "[" costs a bounded time, and the links after it show
    # as their source text.
    links = page.evaluate("""text => {
        const box = md(text);
        return [box.querySelectorAll(".rk-md-link").length, box.textContent.endsWith("[c](d)")];
    }""", "[a](b) " + "[" * 150 + " " + "[" * 250_000 + " [c](d)")
    assert links == [1, True]


def marks(page, texts: list[str]) -> list[list[str]]:
    """The marked runs of each text when their differences are highlighted."""
    return page.evaluate("""texts => {
        const bodies = texts.map((text) => md(text));
        const tooLong = highlightDifferences(bodies);
        if (tooLong) return tooLong;
        return bodies.map((body) => [...body.querySelectorAll("mark.rk-diff")].map((mark) => mark.textContent));
    }""", texts)


def test_word_diff_marks_what_differs(page):
    # Two: each side's words that the other lacks, adjacent ones in one mark.
    assert marks(page, ["The cat sat on the mat.", "The cat lay on the red mat."]) == [["sat"], ["lay", "red"]]
    assert marks(page, ["a b c d", "a x y d"]) == [["b c"], ["x y"]]
    assert marks(page, ["same words", "same words"]) == [[], []]
    # Markdown is compared on its rendered words: the emphasis markers are no difference; punctuation marks
    # are words of their own.
    assert marks(page, ["**Paris** is the capital.", "Paris is *the* capital city."]) == [[], ["city"]]
    assert marks(page, ["Yes, it works.", "Yes it works!"]) == [[",", "."], ["!"]]
    # Three or more: each against the first, whose words are not marked.
    assert marks(page, ["one two three", "one 2 three", "zero one two three four"]) == [[], ["2"], ["zero", "four"]]


def test_word_diff_keeps_text_and_refuses_huge_inputs(page):
    before, after = page.evaluate("""() => {
        const a = md("keep <b>this</b> `code` here"), b = md("keep <i>that</i> `code` here");
        const before = a.textContent;
        highlightDifferences([a, b]);
        return [before, a.textContent];
    }""")
    assert before == after == "keep <b>this</b> code here"
    words = [f"w{i}" for i in range(2100)]
    assert marks(page, [" ".join(words), " ".join(reversed(words))]) == 1  # 2100 x 2100 words: too long
    assert marks(page, [" ".join(words), " ".join(words[:-1] + ["end"])]) == [["w2099"], ["end"]]  # trimmed ends
