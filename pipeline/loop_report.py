"""The report of `rlhf loop` across its rounds, in the demo's style (`pipeline.report`): written once as Markdown
(OUT/report.md) and rendered into a self-contained OUT/report.html. Model-written text goes into fenced code
blocks and annotator names are escaped, as in the demo's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.report import _escape, _fenced, _fmt, _table, render_html
from rlhf.jsonl import atomic_write, read_jsonl
from rlhf.runlog import Panel, plot, read_log

SAMPLE_PROMPTS = 4


def _round_summaries(out: Path) -> dict[int, dict[str, dict]]:
    """{round: {step: summary}} of the steps finished so far."""
    rounds: dict[int, dict[str, dict]] = {}
    for folder in sorted(out.glob("round-*/steps"), key=lambda p: int(p.parent.name.split("-")[1])):
        r = int(folder.parent.name.split("-")[1])
        rounds[r] = {marker.stem: json.loads(marker.read_text()) for marker in folder.glob("*.json")}
    return rounds


def _samples(out: Path, r: int) -> list[dict]:
    path = out / f"round-{r}" / "policy" / "samples.jsonl"
    return [obj for _, obj in read_jsonl(path)] if path.is_file() else []


def write_loop_report(out: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    frame = read_log(out / "rounds.csv")
    rows = frame.to_dict("records")
    rounds = _round_summaries(out)
    oracle = _escape(settings.get("oracle") or "no oracle")
    lines = ["# RLHF online loop report", "",
             f"{len(rows)} of {settings.get('rounds')} rounds done. Each round the annotators "
             f"({'scripted, by the ' + oracle + ' oracle' if settings.get('annotate') == 'simulate' else 'people'}) "
             f"ranked K = {settings.get('k')} completions of new prompts sampled from the current policy; the reward "
             f"model was retrained on every ranking so far and the policy ({_escape(settings.get('algo'))}) continued "
             "from its last weights, its KL always to the SFT model. Every evaluation uses the same held-out prompts "
             "and sampling seed.", "", "## Rounds", "",
             "RM accuracy *before* is the previous round's reward model on this round's new rankings (samples of the "
             "policy it trained); *after* is the retrained model on the round's held-out part of them (prompts it "
             "never trained on); *on policy samples* is the retrained model on K samples per held-out prompt from "
             "the round's policy, ranked by the oracle.", ""]
    lines += _table(("round", "rankings (total)", "RM acc. before, new", "before, held-out", "after, held-out",
                     "on policy samples", "RM score", "KL", f"oracle ({oracle})", "distinct-2"), [
        (int(row["step"]), f"{_count(row.get('rankings'))} ({_count(row.get('rankings_total'))})",
         _fmt(_num(row.get("rm_acc_before_new"))), _fmt(_num(row.get("rm_acc_before_held_out"))),
         _fmt(_num(row.get("rm_acc_after_held_out"))), _fmt(_num(row.get("rm_acc_policy_samples"))),
         _fmt(_num(row.get("rm_score"))), _fmt(_num(row.get("kl"))), _fmt(_num(row.get("oracle"))),
         _fmt(_num(row.get("distinct_2")))) for row in rows], align="---:")
    if rows:
        lines += [f"The SFT model's oracle score on the same prompts: {_fmt(_num(rows[0].get('oracle_sft')))}.", ""]
        # round 0: the SFT model, where every round's policy started from
        policy = pd.concat([pd.DataFrame([{"step": 0, "oracle": frame["oracle_sft"].iloc[0], "kl": 0.0}]),
                            frame[["step", "oracle", "kl"]]], ignore_index=True)
        figure = plot(out / "plots" / "rounds.png", [
            Panel([(policy, "step", "oracle", None, "o-")], title="Oracle score (held-out; round 0: SFT)",
                  xlabel="round"),
            Panel([(policy, "step", "kl", None, "o-")], title="KL to the SFT model", xlabel="round",
                  ylabel="nats / response"),
            Panel([(frame, "step", "rm_acc_before_new", "before retraining (new rankings)", "o-"),
                   (frame, "step", "rm_acc_after_held_out", "after (held-out new)", "o-"),
                   (frame, "step", "rm_acc_policy_samples", "on the policy's samples", "o-")],
                  title="Reward-model accuracy", xlabel="round")])
        lines += ["**Per round: the oracle score, KL and the reward model's accuracy**", "",
                  f"![rounds]({figure.relative_to(out).as_posix()})", ""]
    lines += ["## Labeling", ""]
    label_rows = []
    for r, steps in rounds.items():
        label, sample = steps.get("label", {}), steps.get("sample", {})
        if not sample:
            continue
        by_policy = ", ".join(f"{_escape(k)} {v}" for k, v in sample.get("completions_by_policy", {}).items())
        by_annotator = ", ".join(f"{_escape(k)} {v}" for k, v in sorted(label.get("by_annotator", {}).items()))
        label_rows.append((r, sample.get("tasks"), by_policy, f"{label.get('rankings', 'n/a')} / "
                           f"{label.get('wanted', 'n/a')}", by_annotator or "n/a"))
    lines += _table(("round", "tasks", "completions by policy", "ranked / wanted", "by annotator"), label_rows)
    samples = {r: _samples(out, r) for r in rounds}
    first = next((rows_ for rows_ in samples.values() if rows_), [])
    if first:
        lines += ["## Samples: the SFT model and each round's policy on held-out prompts", ""]
        for i, sample in enumerate(first[:SAMPLE_PROMPTS], 1):
            lines += [f"### Prompt {i}", ""] + _fenced(sample["prompt"])
            sides = [("SFT", sample["reference"])]
            for r, rows_ in samples.items():
                match = next((s for s in rows_ if s["prompt"] == sample["prompt"]), None)
                if match is not None:
                    sides.append((f"Round {r}", match["policy"]))
            for name, side in sides:
                scores = ", ".join(f"{_escape(k.split('/')[-1])} {_fmt(v, 2)}" for k, v in side.items()
                                   if isinstance(v, (int, float)))
                lines += [f"**{name}** ({scores})", ""] + _fenced(side.get("completion", ""))
    timed = [(f"round {r}: {step}", s["seconds"]) for r, steps in rounds.items() for step, s in steps.items()
             if isinstance(s.get("seconds"), (int, float))]
    if timed:
        lines += ["## Step timings", ""] + _table(("step", "seconds"), [(name, _fmt(sec, 0)) for name, sec in timed]
                                                  + [("**total**", _fmt(sum(s for _, s in timed), 0))], align="---:")
    lines += ["## Settings", ""] + _fenced(json.dumps(settings, indent=2), "json")
    markdown = "\n".join(lines)
    with atomic_write(out / "report.md") as handle:
        handle.write(markdown)
    with atomic_write(out / "report.html") as handle:
        handle.write(render_html(markdown, out, "RLHF online loop report"))
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"), "rounds": len(rows)}


def _num(value: Any) -> float | None:
    """A CSV cell as a float (None for a missing or NaN cell)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value


def _count(value: Any) -> str:
    number = _num(value)
    return "n/a" if number is None else str(int(number))
