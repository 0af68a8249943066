"""The annotators' Gradio UI of `rlhf label`: a Blocks page around one custom ranker widget.

The ranker is a `gr.HTML` whose template is a fixed skeleton (static/ranker.html, no data in it) and whose
`js_on_load` (static/markdown.js, worddiff.js and ranker.js, joined by `widget_script`) builds the task's
conversation and cards as safe Markdown: elements made one by one and text set with textContent only, so
model output stays inert whatever it contains. The server sends the widget its view as a JSON string (the
component's value); the widget sends rankings back with `trigger('submit', {...})`, skips with
`trigger('skip', {...})`. History, guidelines and statistics are ordinary Gradio components.

Every event handler takes the annotator from `request.username`, which Gradio fills from the server-side
session (`auth_dependency` in labeling/app.py), never from what the browser sends; the payloads go to the
plain functions in `labeling.handlers`, which validate them (the store checks ranks against the task's
real completion ids, and request ids make a re-sent submit idempotent).
"""


import html
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

from labeling import handlers
from labeling.auth import is_admin
from labeling.handlers import AppSettings
from labeling.store import MAX_COMMENT_LENGTH, SQLLabelStore
from rlhf.errors import UserError

STATIC_DIR = Path(__file__).parent / "static"
_CONTROL_CHARS = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_nonce = itertools.count()


def ranker_value(task: dict | None, *, own: dict | None = None, editing: bool = False, notice: str | None = None,
                 error: str | None = None, draft: dict | None = None, flags: tuple[str, ...] = (),
                 notes: dict | None = None) -> str:
    """The ranker widget's value: its view as JSON (`task` None: the queue is finished; `draft`: the annotator's
    partial ranking of it kept by the server, {completion id: rank}; `flags`: the flags the server accepts, shown
    as toggles; `notes`: the annotator's own comment and flags on the task, {"comment", "flags"}, from their
    ranking or skip). Each value differs (a counter), so the widget hears every answer, even one equal to the
    last. '<', '>' and '&' are JSON-escaped: the value holds no markup at all, wherever it might end up."""
    view: dict[str, Any] = {"n": next(_nonce), "task": task, "own": own, "editing": editing, "notice": notice,
                            "error": error}
    if draft:
        view["draft"] = draft
    if flags:
        view["flags"] = list(flags)
    if notes:
        view["notes"] = notes
    return _json(view)


def refused_value(error: str, task_id: Any) -> str:
    """The widget's value when the server refused an answer (or could not store it): the widget keeps the
    annotator's work on the task and shows `error`."""
    return _json({"n": next(_nonce), "keep": True, "error": error,
                  "task_id": task_id if isinstance(task_id, str) else None})


def _json(view: dict) -> str:
    text = json.dumps(view, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def topbar_html(annotator: str, progress: dict) -> str:
    """Who is signed in and their progress (with "N left for you" when the queue was counted), as escaped HTML."""
    line = f"{progress['ranked']} ranked"
    if progress["skipped"]:
        line += f", {progress['skipped']} skipped"
    line += f" · {progress['total_tasks']} tasks in all"
    left = (f'<span class="left" id="left">{int(progress["left"])} left for you</span>'
            if "left" in progress else "")
    return (f'<div class="topbar-text"><span class="brand">RLHF labeling</span>'
            f'<span class="progress" id="progress">{html.escape(line)}</span>{left}'
            f'<span class="who">signed in as <b>{html.escape(annotator)}</b></span></div>')


def history_choices(items: list[dict]) -> list[tuple[str, str]]:
    """(label, task id) per history item, whose prompt the store already cut to a one-line preview. Labels are
    shown as text by Gradio; invisible control characters become visible U+XXXX markers so a preview cannot
    disguise itself."""
    return [(f"{item['status']} · {item['task_id']} · " + _CONTROL_CHARS.sub(lambda m: f"U+{ord(m[0]):04X}",
                                                                              item["prompt"]), item["task_id"])
            for item in items]


# ------------------------------------------------------------------ what each event does (no Gradio here)

class LabelUI:
    """The UI's event logic over the store: plain methods of (annotator, payload), testable without Gradio.
    Each returns the ranker's new value (and what else the page shows)."""

    def __init__(self, store: SQLLabelStore, settings: AppSettings):
        self.store, self.settings = store, settings

    def next_view(self, annotator: str, notice: str | None = None) -> tuple[str, dict]:
        result = handlers.next_task(self.store, annotator, self.settings)
        proposal = result.get("proposal")  # --pre-rank: the task opens with the reward model's order set
        if proposal:
            notice = " ".join(filter(None, [notice, "The reward model's order is set: correct it, or submit it."]))
        return (ranker_value(result["task"], own={"ranks": proposal} if proposal else None, notice=notice,
                             draft=result.get("draft"), flags=self.settings.flags), result["progress"])

    def submit(self, annotator: str, payload: Any) -> tuple[str, dict | None]:
        """Store a ranking from the widget, then serve the next task. A refused ranking keeps the widget's work."""
        try:
            result = handlers.submit_ranking(self.store, annotator, self.settings, payload)
        except UserError as exc:
            return refused_value(str(exc), _task_id_of(payload)), None
        notice = {"edit": "Ranking updated.", "duplicate": "Ranking already saved."}.get(result["action"],
                                                                                        "Ranking saved.")
        return self.next_view(annotator, notice)

    def skip(self, annotator: str, payload: Any) -> tuple[str, dict | None]:
        try:
            handlers.skip_task(self.store, annotator, self.settings, payload)
        except UserError as exc:
            return refused_value(str(exc), _task_id_of(payload)), None
        return self.next_view(annotator, "Task skipped.")

    def open(self, annotator: str, task_id: Any) -> str:
        """A task from the history (or the undo of an answer), with the annotator's own ranking to edit, and the
        comment and flags of their ranking or skip."""
        try:
            result = handlers.open_task(self.store, annotator, self.settings, task_id)
        except UserError as exc:
            return refused_value(str(exc), task_id)
        ranked, skipped = result["own"], result["skipped"]
        own = ({"ranks": ranked["ranks"]} if ranked
               else {"ranks": result["proposal"]} if result.get("proposal") else None)
        notes = ({"comment": ranked["comment"], "flags": ranked["flags"]} if ranked
                 else {"comment": skipped["reason"], "flags": skipped["flags"]} if skipped else None)
        return ranker_value(result["task"], own=own, editing=True, draft=result.get("draft"),
                            flags=self.settings.flags, notes=notes)

    def history(self, annotator: str) -> list[tuple[str, str]]:
        return history_choices(handlers.history(self.store, annotator, self.settings)["items"])

    def stats_text(self, annotator: str) -> str:
        try:
            return handlers.stats(self.store, annotator, self.settings)["text"]
        except UserError as exc:
            return str(exc)


# ------------------------------------------------------------------ the admin view (plain functions, no Gradio)

DISAGREED_ROWS = 20
"""The admin view lists this many of the tasks whose rankings disagree most."""
NOTES_ROWS = 50
"""The admin view lists this many of the latest rankings and skips with a comment or flags."""


def ranking_text(ranks: dict[str, int], labels: dict[str, str]) -> str:
    """A ranking as one line, best first, ties joined: "B > A = C" (labels: completion id -> label)."""
    groups: dict[int, list[str]] = {}
    for cid, rank in ranks.items():
        groups.setdefault(rank, []).append(labels.get(cid, cid))
    return " > ".join(" = ".join(sorted(groups[r])) for r in sorted(groups))


def parse_ranking_text(text: Any, labels: dict[str, str]) -> dict[str, int]:
    """The ranking an admin typed as labels, best first, ties joined ("B > A = C"; labels: completion id ->
    label), as {completion id: rank}; RequestError naming the problem otherwise (every label exactly once)."""
    if not isinstance(text, str) or not text.strip():
        raise handlers.RequestError("type the ranking as labels, best first: B > A = C")
    ids = {label.upper(): cid for cid, label in labels.items()}
    ranks: dict[str, int] = {}
    for rank, group in enumerate(text.split(">"), start=1):
        for label in group.split("="):
            label = label.strip().upper()
            if label not in ids:
                raise handlers.RequestError(f"no completion is labelled {label[:20]!r} "
                                            f"(the labels: {', '.join(sorted(ids))})")
            if ids[label] in ranks:
                raise handlers.RequestError(f"{label} appears twice")
            ranks[ids[label]] = rank
    missing = sorted(label for label, cid in ids.items() if cid not in ranks)
    if missing:
        raise handlers.RequestError(f"rank every completion ({', '.join(missing)} missing)")
    return ranks


def admin_tables(store: SQLLabelStore, settings: AppSettings) -> dict:
    """What the admin view shows: the annotators table of `rlhf stats --by annotator` (every column it has: gold
    accuracy, flagged under the server's gold threshold, ...), and the review queue: the tasks whose rankings
    disagree most (`labeling.stats.review_queue`), with who resolved them; and the latest rankings and skips that
    carry a comment or flags (`SQLLabelStore.notes`)."""
    import pandas as pd

    from labeling.stats import annotator_table, review_queue

    disagreed = pd.DataFrame([{"task_id": item["task_id"], "rankings": len(item["rankings"]),
                               "annotators": ", ".join(r["annotator"] for r in item["rankings"]),
                               "agreement": item["agreement"],
                               "resolved_by": item["resolved"]["by"] if item["resolved"] else ""}
                              for item in review_queue(store, DISAGREED_ROWS)],
                             columns=["task_id", "rankings", "annotators", "agreement", "resolved_by"])
    notes = pd.DataFrame([{**note, "flags": ", ".join(note["flags"]), "comment": note["comment"] or ""}
                          for note in store.notes()[:NOTES_ROWS]],
                         columns=["task_id", "annotator", "status", "flags", "comment"])
    return {"annotators": annotator_table(store, settings.gold_threshold).round(3), "disagreed": disagreed.round(3),
            "notes": notes}


def review_table(store: SQLLabelStore, task_id: str):
    """One task's rankings for review: its completions labelled A, B, ... in their stored order (with the
    start of their text), each annotator's ranking in those labels with their flags and comment, and a line
    saying its gold answer and its resolved ranking, if it has them."""
    import pandas as pd

    task = store.get_task(task_id)
    labels = {c.id: handlers.completion_label(i) for i, c in enumerate(task.completions)}
    legend = pd.DataFrame([{"label": labels[c.id], "completion": c.id, "text": _preview(c.text)}
                           for c in task.completions])
    rankings = pd.DataFrame([{"annotator": r.annotator, "ranking": ranking_text(r.ranks, labels),
                              "flags": ", ".join(r.flags), "comment": r.comment or ""}
                             for r in store.export_rankings() if r.task_id == task_id],
                            columns=["annotator", "ranking", "flags", "comment"])
    gold = store.gold_answers().get(task_id)
    resolved = store.resolutions().get(task_id)
    notes = ["Not a gold question." if gold is None else f"Gold question: {ranking_text(gold[0], labels)}"
             + (f" (the ranking of {gold[1]})." if gold[1] else "."),
             "Not resolved." if resolved is None
             else f"Resolved: {ranking_text(resolved[0], labels)} (by {resolved[1]})."]
    return legend, rankings, " ".join(notes)


def _preview(text: str, limit: int = 120) -> str:
    line = _CONTROL_CHARS.sub(lambda m: f"U+{ord(m[0]):04X}", " ".join(text.split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _task_id_of(payload: Any) -> str | None:
    value = payload.get("task_id") if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------ the Blocks page

def theme():
    import gradio as gr

    # System fonts: the default theme fetches web fonts from Google, which an offline annotation
    # server cannot reach (and the Content-Security-Policy forbids).
    # Primary buttons a shade darker than the default: white text on them has a contrast of at least 4.5:1.
    return gr.themes.Default(primary_hue="blue",
                             font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]).set(
        button_primary_background_fill="*primary_700", button_primary_background_fill_hover="*primary_800",
        button_primary_background_fill_dark="*primary_700", button_primary_background_fill_hover_dark="*primary_800")


def css() -> str:
    return (STATIC_DIR / "ranker.css").read_text(encoding="utf-8")


WIDGET_SCRIPTS = ("markdown.js", "worddiff.js", "ranker.js")


def widget_script() -> str:
    """The ranker's `js_on_load`: the safe Markdown renderer and the word diff, then the widget that uses them
    (one function body: each file's top-level names are visible to the next)."""
    return "\n".join((STATIC_DIR / name).read_text(encoding="utf-8") for name in WIDGET_SCRIPTS)


def ranker_template() -> str:
    """The ranker's `html_template` (static/ranker.html), with the store's limit on a comment's length."""
    return (STATIC_DIR / "ranker.html").read_text(encoding="utf-8").replace(
        'maxlength="MAX_COMMENT_LENGTH"', f'maxlength="{MAX_COMMENT_LENGTH}"')


def build_ui(store: SQLLabelStore, settings: AppSettings):
    """The Blocks page. Mount it with `gr.mount_gradio_app(..., auth_dependency=...)` (labeling/app.py)."""
    # Gradio's queue rebuilds a pandas summary of its last (up to 10,000) events after every event, for a
    # monitoring page we do not serve: work on every submit that grows with the session. Read once, when the
    # Blocks' queue is made.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000000000")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
    import gradio as gr

    ui = LabelUI(store, settings)
    # The handlers' `request.username` comes from the session cookie checked by auth_dependency.
    events = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")

    with gr.Blocks(title="RLHF labeling", analytics_enabled=False) as demo:
        with gr.Row(elem_id="topbar", equal_height=True):
            topbar = gr.HTML("", elem_id="topbar-text", padding=False)
            gr.Button("Sign out", link="logout", size="sm", scale=0, min_width=100, elem_id="sign-out")
        # The guidelines before the first task, and again when they change: shown by the widget (ranker.js)
        # until the annotator confirms having read this version (remembered in the browser).
        with gr.Column(elem_id="guide-panel", visible=bool(settings.guidelines_html)):
            gr.HTML("<h2>Guidelines</h2>"
                    '<p id="guide-changed" hidden>The guidelines changed since you last read them.</p>',
                    padding=False)
            gr.HTML(settings.guidelines_html, elem_id="guide-text", padding=False)
            gr.Button("I have read them: start", variant="primary", elem_id="guide-ok", scale=0, min_width=220)
        ranker = gr.HTML(
            "", elem_id="ranker", apply_default_css=False, padding=False,
            html_template=ranker_template(),
            js_on_load=widget_script())
        with gr.Accordion("History: your earlier answers (open one to edit it)", open=False, elem_id="history"):
            history = gr.Dropdown(choices=[], value=None, label="Ranked and skipped tasks, newest first",
                                  filterable=True, interactive=True, elem_id="history-list")
        with gr.Accordion("Guidelines", open=False, elem_id="guidelines"):
            # The owner's Markdown, rendered by the server with raw HTML escaped (trusted text).
            gr.HTML(settings.guidelines_html or "<p>No guidelines were given for this project.</p>",
                    elem_id="guidelines-text", padding=True)
        with gr.Accordion("Statistics", open=False, visible=False, elem_id="stats") as stats_box:
            stats_text = gr.Textbox(show_label=False, lines=8, max_lines=40, interactive=False, elem_id="stats-text")
            refresh_stats = gr.Button("Refresh", size="sm")
        # Admins: the annotators at a glance and the tasks to review (cells are shown as text).
        with gr.Accordion("Admin: annotators and review", open=False, visible=False, elem_id="admin") as admin_box:
            admin_annotators = gr.Dataframe(label="Annotators", interactive=False, wrap=True,
                                            elem_id="admin-annotators")
            admin_disagreed = gr.Dataframe(label="Most disagreed tasks (lowest agreement first)", interactive=False,
                                           wrap=True, elem_id="admin-disagreed")
            admin_notes = gr.Dataframe(label="Comments and flags, newest first", interactive=False, wrap=True,
                                       elem_id="admin-notes")
            review_pick = gr.Dropdown(choices=[], value=None, label="Review a task", interactive=True,
                                      filterable=True, elem_id="admin-review-pick")
            with gr.Row():
                review_legend = gr.Dataframe(label="Its completions", interactive=False, wrap=True,
                                             elem_id="admin-review-legend", visible=False)
                review_rankings = gr.Dataframe(label="Its rankings", interactive=False, wrap=True,
                                               elem_id="admin-review-rankings", visible=False)
            with gr.Column(visible=False) as review_controls:
                # The resolved ranking (what `rlhf export --resolve review` takes), typed as labels.
                with gr.Row(equal_height=False):
                    resolve_text = gr.Textbox(label="Resolved ranking: the labels, best first (B > A = C)",
                                              max_length=200, elem_id="admin-resolve-text", scale=3)
                    resolve = gr.Button("Resolve", size="sm", scale=1, elem_id="admin-resolve")
                    unresolve = gr.Button("Remove the resolution", size="sm", scale=1, elem_id="admin-unresolve")
                # Gold questions: one annotator's ranking of the task becomes its known answer (or it stops being one).
                with gr.Row(equal_height=False):
                    gold_from = gr.Dropdown(choices=[], value=None, label="Make it a gold question: the answer is "
                                            "the ranking of", interactive=True, elem_id="admin-gold-from", scale=3)
                    make_gold = gr.Button("Make gold", size="sm", scale=1, elem_id="admin-make-gold")
                    drop_gold = gr.Button("No longer gold", size="sm", scale=1, elem_id="admin-drop-gold")
            review_status = gr.Textbox(show_label=False, interactive=False, visible=False,
                                       elem_id="admin-review-status")
            refresh_admin = gr.Button("Refresh", size="sm", elem_id="admin-refresh")

        def admin_outputs(annotator: str, reviewing: str | None = None):
            if not is_admin(store, annotator, settings.admins):  # checked on every request, not only at load
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            tables = admin_tables(store, settings)
            ids = [str(t) for t in tables["disagreed"]["task_id"]]
            if reviewing and reviewing not in ids:  # the task under review stays under review
                ids.append(reviewing)
            return (tables["annotators"], tables["disagreed"], gr.Dropdown(choices=ids, value=reviewing or None),
                    tables["notes"])

        def on_load(request: gr.Request):
            annotator = request.username
            value, progress = ui.next_view(annotator)
            admin = is_admin(store, annotator, settings.admins)
            return (topbar_html(annotator, progress), value, gr.Dropdown(choices=ui.history(annotator), value=None),
                    gr.Accordion(visible=admin), ui.stats_text(annotator) if admin else "",
                    gr.Accordion(visible=admin), *admin_outputs(annotator))

        def on_admin_refresh(reviewing, request: gr.Request):
            return admin_outputs(request.username, reviewing if isinstance(reviewing, str) else None)

        def review_outputs(task_id, note: str = ""):
            hidden = (gr.Dataframe(visible=False), gr.Dataframe(visible=False), gr.Column(visible=False),
                      gr.Dropdown(choices=[], value=None), gr.Textbox(visible=bool(note), value=note))
            if not task_id or not isinstance(task_id, str):  # (a page's input is whatever the browser sent)
                return hidden
            try:
                legend, rankings, gold_line = review_table(store, task_id)
            except UserError as exc:
                return (*hidden[:4], gr.Textbox(visible=True, value=str(exc)))
            status = " ".join(filter(None, [note, gold_line]))
            return (gr.Dataframe(legend, visible=True), gr.Dataframe(rankings, visible=True), gr.Column(visible=True),
                    gr.Dropdown(choices=list(rankings["annotator"]), value=None),
                    gr.Textbox(visible=True, value=status))

        def on_review(task_id, request: gr.Request):
            if not is_admin(store, request.username, settings.admins):
                return review_outputs(None)
            return review_outputs(task_id)

        def on_gold(task_id, source, request: gr.Request):
            payload = {"task_id": task_id, "from": source} if source else {"task_id": task_id, "ranks": None}
            try:  # the handler checks the admin role and every value
                handlers.set_gold(store, request.username, settings, payload)
            except UserError as exc:
                return (*review_outputs(task_id)[:4], gr.Textbox(visible=True, value=str(exc)))
            return review_outputs(task_id, "Saved.")

        def on_make_gold(task_id, source, request: gr.Request):
            if not source:
                note = "Pick whose ranking is the answer."
                return (*review_outputs(task_id)[:4], gr.Textbox(visible=True, value=note))
            return on_gold(task_id, source, request)

        def on_drop_gold(task_id, request: gr.Request):
            return on_gold(task_id, None, request)

        def on_resolve(task_id, text, request: gr.Request):
            try:  # the handler checks the admin role and the ranking against the task
                if text is None:  # "Remove the resolution"
                    ranks = None
                else:
                    task = store.get_task(task_id) if isinstance(task_id, str) and task_id else None
                    if task is None:
                        raise handlers.RequestError("pick a task first")
                    ranks = parse_ranking_text(text, {c.id: handlers.completion_label(i)
                                                      for i, c in enumerate(task.completions)})
                handlers.resolve_task(store, request.username, settings, {"task_id": task_id, "ranks": ranks})
            except UserError as exc:
                return (*review_outputs(task_id)[:4], gr.Textbox(visible=True, value=str(exc)))
            return review_outputs(task_id, "Saved.")

        def on_unresolve(task_id, request: gr.Request):
            return on_resolve(task_id, None, request)

        def after_answer(annotator: str, value: str, progress: dict | None):
            if progress is None:  # refused: only the widget changes
                return value, gr.skip(), gr.skip()
            return (value, topbar_html(annotator, progress),
                    gr.Dropdown(choices=ui.history(annotator), value=None))

        def on_submit(evt: gr.EventData, request: gr.Request):
            return after_answer(request.username, *ui.submit(request.username, evt._data))

        def on_skip(evt: gr.EventData, request: gr.Request):
            return after_answer(request.username, *ui.skip(request.username, evt._data))

        def on_back(request: gr.Request):
            return ui.next_view(request.username)[0]

        def on_reopen(evt: gr.EventData, request: gr.Request):  # "Undo the last answer": open it again
            return ui.open(request.username, _task_id_of(evt._data))

        def on_open(task_id, request: gr.Request):
            return ui.open(request.username, task_id), gr.Dropdown(value=None)

        def on_stats(request: gr.Request):
            return ui.stats_text(request.username)

        demo.load(on_load, outputs=[topbar, ranker, history, stats_box, stats_text, admin_box, admin_annotators,
                                    admin_disagreed, review_pick, admin_notes], **events)
        refresh_admin.click(on_admin_refresh, inputs=[review_pick], outputs=[admin_annotators, admin_disagreed,
                                                                             review_pick, admin_notes], **events)
        review_outputs_list = [review_legend, review_rankings, review_controls, gold_from, review_status]
        review_pick.input(on_review, inputs=[review_pick], outputs=review_outputs_list, **events)
        make_gold.click(on_make_gold, inputs=[review_pick, gold_from], outputs=review_outputs_list, **events)
        drop_gold.click(on_drop_gold, inputs=[review_pick], outputs=review_outputs_list, **events)
        resolve.click(on_resolve, inputs=[review_pick, resolve_text], outputs=review_outputs_list, **events)
        unresolve.click(on_unresolve, inputs=[review_pick], outputs=review_outputs_list, **events)
        ranker.submit(on_submit, outputs=[ranker, topbar, history], **events)
        ranker.skip(on_skip, outputs=[ranker, topbar, history], **events)
        ranker.back(on_back, outputs=[ranker], **events)
        ranker.reopen(on_reopen, outputs=[ranker], **events)
        history.input(on_open, inputs=[history], outputs=[ranker, history], **events)
        refresh_stats.click(on_stats, outputs=[stats_text], **events)
    return demo
