"""The documentation's links and code pointers resolve (docs/development.md, "Tests").

Checked in README.md and docs/*.md, outside fenced code blocks:
- every relative link (and image) names a file or folder that exists, and its `#anchor` names a heading of
  the target page under GitHub's rule (lower case, punctuation dropped, spaces to '-', '-1', '-2' for repeats);
- every repository path written in backticks (`labeling/active.py`, `bench/`) exists;
- every dotted pointer into our packages (`rlhf.hardware.resolve_dtype`) names a module file that exists and
  a name written in it.
And in the Python sources: every reference to a page section, written as the page's path, a comma and the
section's title in quotes, names a page that exists and a heading on it; the same for the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("rlhf", "labeling", "reward_model", "policy", "pipeline", "bench")
TOP_DIRS = (*PACKAGES, "tests", "data", "docs", ".ci")
SOURCE_DIRS = (*PACKAGES, "tests")
FILE_SUFFIXES = (".py", ".md", ".json", ".jsonl", ".csv", ".parquet", ".pt", ".png", ".db", ".html", ".yaml",
                 ".txt", ".toml", ".safetensors")

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """The text with fenced code blocks blanked out (line numbers kept)."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and marker:
            fence = marker.group(1)[0] * len(marker.group(1))
            out.append("")
        elif fence is not None:
            if stripped.startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("**", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def page_links(page: Path):
    for n, line in enumerate(prose(page.read_text(encoding="utf-8")).splitlines(), 1):
        for m in LINK.finditer(re.sub(CODE_SPAN, lambda c: " " * len(c.group(0)), line)):
            yield n, m.group(1)


def code_spans(page: Path):
    for n, line in enumerate(prose(page.read_text(encoding="utf-8")).splitlines(), 1):
        for m in CODE_SPAN.finditer(line):
            yield n, m.group(2).strip()


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    for name in ("README.md", "labeling.md", "api.md", "data-formats.md", "formulas.md", "metrics.md",
                 "benchmarks.md", "scaling-out.md", "development.md"):
        assert name in names, f"docs/{name} is missing"


def test_readme_is_short_and_keeps_the_test_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "make test" in text and "make demo" in text


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_resolve(page):
    bad = []
    for n, target in page_links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{rel(page)}:{n}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{rel(page)}:{n}: {target}: no heading with that anchor in {rel(dest)}")
    assert not bad, "\n".join(bad)


def looks_like_repo_path(token: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", token)) and "/" in token and token.split("/")[0] in TOP_DIRS


def dotted_pointer(token: str) -> list[str] | None:
    if not re.fullmatch(r"\w+(\.\w+)+", token) or token.endswith(FILE_SUFFIXES):
        return None
    parts = token.split(".")
    return parts if parts[0] in PACKAGES else None


def resolve_pointer(parts: list[str]) -> str | None:
    """Why a dotted pointer does not resolve, or None: the longest module prefix must be a file, and the
    first name after it must be written in that file."""
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not module.is_file():
            continue
        if i == len(parts):
            return None
        if re.search(rf"\b{re.escape(parts[i])}\b", module.read_text(encoding="utf-8")):
            return None
        return f"{parts[i]} is not in {rel(module)}"
    return f"no module {parts[0]}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_code_pointers_resolve(page):
    bad = []
    for n, token in code_spans(page):
        if looks_like_repo_path(token):
            if not (ROOT / token.rstrip("/")).exists():
                bad.append(f"{rel(page)}:{n}: `{token}`: no such path in the repository")
        elif (parts := dotted_pointer(token)) is not None:
            why = resolve_pointer(parts)
            if why:
                bad.append(f"{rel(page)}:{n}: `{token}`: {why}")
    assert not bad, "\n".join(bad)


def python_sources():
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != Path(__file__).name:
                yield path


# A section reference: a page, a comma, the section's title in quotes ("..." or '...', maybe escaped).
SECTION_REF = re.compile(r"""(docs/[\w-]+\.md|README(?:\.md)?)\s*,\s*(?:\\?"([^"\\]+)\\?"|'([^'\\]+)')""")
PAGE_MENTION = re.compile(r"docs/[\w-]+\.(?:md|png)")
README_MENTION = re.compile(r"\bREADME(?:\.md)?\s*,")


def test_source_references_name_existing_sections():
    bad, found = [], 0
    for path in python_sources():
        text = re.sub(r"\n\s*#", " ", path.read_text(encoding="utf-8"))  # a reference may wrap over lines,
        text = " ".join(text.split())  # comment lines included
        for m in PAGE_MENTION.finditer(text):
            if not (ROOT / m.group(0)).exists():
                bad.append(f"{rel(path)}: {m.group(0)}: no such page")
        refs = list(SECTION_REF.finditer(text))
        for m in refs:
            found += 1
            page = ROOT / ("README.md" if m.group(1).startswith("README") else m.group(1))
            section = m.group(2) or m.group(3)
            if page.exists() and slug(section) not in anchors(page):
                bad.append(f'{rel(path)}: {m.group(1)}, "{section}": no such heading in {rel(page)}')
        starts = {m.start() for m in refs}
        for m in README_MENTION.finditer(text):  # "README, Benchmarks, ..." and the like: not a heading
            if m.start() not in starts:
                bad.append(f"{rel(path)}: {text[m.start():m.start() + 60]!r}: name a heading in quotes")
    assert not bad, "\n".join(bad)
    assert found, "no section reference found: is the pattern still right?"


def test_slug_follows_github():
    assert slug("PPO, RLOO and GRPO side by side") == "ppo-rloo-and-grpo-side-by-side"
    assert slug("Exported model folders (`rlhf export-model`)") == "exported-model-folders-rlhf-export-model"
    assert slug("Security: what the server guarantees") == "security-what-the-server-guarantees"
    assert slug("The ML engineer's flow, command by command") == "the-ml-engineers-flow-command-by-command"
