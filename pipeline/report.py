"""The demo's report: `report.md` (images beside it in report_files/) and a self-contained `report.html`
(images embedded). Every text that came from a model is escaped: it shows as text, whatever it holds."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    pass
            rows.append(parsed)
        return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _plots(eval_rows: list[dict[str, float]], files: Path, oracle: str) -> list[tuple[str, Path]]:
    """Reward model score, oracle score and KL against step; reward against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files.mkdir(parents=True, exist_ok=True)
    steps = [r.get("step", i) for i, r in enumerate(eval_rows)]
    made = []
    series = [("objective/rm_score", "reward model score"), ("objective/oracle", f"oracle score ({oracle})"),
              ("objective/kl", "KL to the reference (nats / response)")]
    present = [(k, t) for k, t in series if any(k in r for r in eval_rows)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.3))
        for ax, (key, title) in zip(axes if len(present) > 1 else [axes], present):
            ax.plot(steps, [r.get(key, math.nan) for r in eval_rows], marker="o")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PPO step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = files / "policy_vs_step.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(("Held-out evaluation against PPO step", path))
    if any("objective/kl" in r for r in eval_rows):
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        kl = [r.get("objective/kl", math.nan) for r in eval_rows]
        for key, label in [("objective/rm_score", "reward model"), ("objective/oracle", "oracle")]:
            if any(key in r for r in eval_rows):
                ax.plot(kl, [r.get(key, math.nan) for r in eval_rows], marker="o", label=label)
        ax.set_xlabel("KL to the reference (nats / response)")
        ax.set_ylabel("score")
        ax.set_title("Reward against KL", fontsize=10)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = files / "reward_vs_kl.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(("Reward against KL (each point an evaluation)", path))
    return made


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    if before:
        return f"{after - before:+.3f} ({(after - before) / abs(before) * 100:+.0f}%)"
    return f"{after - before:+.3f}"


def write_report(out: Path, settings: dict[str, Any], done: dict[str, dict]) -> dict[str, Any]:
    out = Path(out)
    files = out / "report_files"
    label, pairs, rm, policy = (done.get(k, {}) for k in ("label", "export", "reward_model", "policy"))
    stats = label.get("stats", {})
    eval_rows = _read_csv(out / "ppo" / "eval.csv")
    images = _plots(eval_rows, files, settings.get("oracle", "oracle"))
    if (out / "rm" / "train_curves.png").is_file():
        images.insert(0, ("Reward model training curves", out / "rm" / "train_curves.png"))
    final, reference = policy.get("final", {}) or {}, policy.get("reference", {}) or {}
    oracle_sft, oracle_ppo = reference.get("objective/oracle"), final.get("objective/oracle")
    rm_test = rm.get("test", {}) or {}

    headline = [
        (f"Oracle score ({settings.get('oracle', 'oracle')}), SFT policy", _fmt(oracle_sft)),
        ("Oracle score, PPO policy", _fmt(oracle_ppo)),
        ("Change", _change(oracle_sft, oracle_ppo)),
        ("Reward-model score, SFT -> PPO", f"{_fmt(reference.get('objective/rm_score'))} -> "
                                           f"{_fmt(final.get('objective/rm_score'))}"),
        ("KL(PPO || SFT), nats per response", _fmt(final.get("objective/kl"))),
        ("Distinct-2, SFT -> PPO", f"{_fmt(reference.get('eval/distinct_2'))} -> {_fmt(final.get('eval/distinct_2'))}"),
        ("Reward model held-out accuracy", _fmt(rm.get("test_accuracy"))),
        ("Reward model calibration error (ECE)", _fmt(rm_test.get("ece"))),
        ("Human agreement ceiling", _fmt(rm_test.get("human_agreement"))),
    ]
    agreement = stats.get("agreement", {})
    labeling_rows = [
        ("Tasks", stats.get("tasks")), ("Rankings", stats.get("rankings")),
        ("Tasks complete at overlap", f"{stats.get('complete')} / {stats.get('tasks')}"),
        ("Shared tasks", agreement.get("shared_tasks")),
        ("Pairwise agreement between annotators", _fmt(agreement.get("pairwise_agreement"))),
        ("Mean Kendall's tau", _fmt(agreement.get("mean_kendall_tau"))),
        ("Train pairs / test pairs (split by prompt)", f"{pairs.get('train_pairs', 'n/a')} / {pairs.get('test_pairs', 'n/a')}"),
    ]
    annotators = stats.get("annotators", [])
    samples = []
    samples_path = out / "ppo" / "samples.jsonl"
    if samples_path.is_file():
        samples = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = samples[:6]
    timings = [(name, done[name].get("seconds")) for name in done if isinstance(done[name], dict)]

    md = _markdown(headline, labeling_rows, annotators, images, samples, settings, timings, out)
    (out / "report.md").write_text(md, encoding="utf-8")
    page = _html(headline, labeling_rows, annotators, images, samples, settings, timings)
    (out / "report.html").write_text(page, encoding="utf-8")
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "oracle_sft": oracle_sft, "oracle_ppo": oracle_ppo, "kl": final.get("objective/kl"),
            "rm_test_accuracy": rm.get("test_accuracy")}


def _sample_text(side: dict) -> str:
    return side.get("completion", side.get("text", ""))


def _sample_scores(side: dict) -> str:
    parts = [f"{k.split('/')[-1]} {_fmt(v, 2)}" for k, v in side.items() if isinstance(v, (int, float))]
    return ", ".join(parts)


def _markdown(headline, labeling_rows, annotators, images, samples, settings, timings, out: Path) -> str:
    lines = ["# RLHF demo report", "",
             f"Scripted annotators ranked SFT completions by the `{settings.get('oracle')}` oracle; a LoRA reward "
             "model learned their preferences; PPO with a KL penalty optimised the policy against it.", "",
             "## Results", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline]
    lines += ["", "## Labeling", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in labeling_rows]
    if annotators:
        lines += ["", "| annotator | ranked | skipped | median s/task |", "|---|---:|---:|---:|"]
        lines += [f"| {a['name']} | {a['ranked']} | {a['skipped']} | {_fmt(a.get('median_seconds'), 1)} |"
                  for a in annotators]
    lines += ["", "## Plots", ""]
    for title, path in images:
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    if samples:
        lines += ["## Samples: SFT and PPO side by side (held-out prompts)", ""]
        for s in samples:
            prompt = s["prompt"].replace("\n", " ")
            lines += [f"**Prompt:** {_md_quote(prompt)}", "",
                      f"- SFT ({_sample_scores(s['reference'])}): {_md_quote(_sample_text(s['reference']))}",
                      f"- PPO ({_sample_scores(s['policy'])}): {_md_quote(_sample_text(s['policy']))}", ""]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(sec, 0)} |" for name, sec in timings]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)


def _md_quote(text: str) -> str:
    """Model text inside markdown: one line, in a code span so markdown and HTML in it stay literal."""
    flat = " ".join(text.split())
    fence = "``" if "`" in flat else "`"
    return f"{fence} {flat} {fence}"


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d232b; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde3ea; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #dde3ea; padding: .35em .7em; text-align: left; vertical-align: top; }
th { background: #f3f6f9; } .kv td:first-child { color: #566; } .num { text-align: right; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eef1f4; }
.samples td { width: 50%; } .text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 13px; }
.scores { color: #566; font-size: 12px; } .prompt { background: #f7f9fb; font-weight: 600; }
pre { background: #f7f9fb; padding: 1em; overflow-x: auto; }
"""


def _html(headline, labeling_rows, annotators, images, samples, settings, timings) -> str:
    e = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
             "<title>RLHF demo report</title><style>", _CSS, "</style></head><body>",
             "<h1>RLHF demo report</h1><p>Scripted annotators ranked SFT completions by the "
             f"<code>{e(str(settings.get('oracle')))}</code> oracle; a "
             "LoRA reward model learned their preferences; PPO with a KL penalty optimised the policy against it.</p>",
             "<h2>Results</h2><table class='kv'>"]
    parts += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in headline]
    parts += ["</table><h2>Labeling</h2><table class='kv'>"]
    parts += [f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in labeling_rows]
    parts += ["</table>"]
    if annotators:
        parts += ["<table><tr><th>annotator</th><th>ranked</th><th>skipped</th><th>median s/task</th></tr>"]
        parts += [f"<tr><td>{e(a['name'])}</td><td class='num'>{a['ranked']}</td><td class='num'>{a['skipped']}</td>"
                  f"<td class='num'>{e(_fmt(a.get('median_seconds'), 1))}</td></tr>" for a in annotators]
        parts += ["</table>"]
    parts += ["<h2>Plots</h2>"]
    for title, path in images:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts += [f"<figure><img alt='{e(title, quote=True)}' src='data:image/png;base64,{data}'>"
                  f"<figcaption>{e(title)}</figcaption></figure>"]
    if samples:
        parts += ["<h2>Samples: SFT and PPO side by side (held-out prompts)</h2><table class='samples'>",
                  "<tr><th>SFT policy</th><th>PPO policy</th></tr>"]
        for s in samples:
            parts += [f"<tr><td colspan='2' class='prompt text'>{e(s['prompt'])}</td></tr><tr>"]
            for side in (s["reference"], s["policy"]):
                parts += [f"<td><div class='text'>{e(_sample_text(side))}</div>"
                          f"<div class='scores'>{e(_sample_scores(side))}</div></td>"]
            parts += ["</tr>"]
        parts += ["</table>"]
    parts += ["<h2>Stage timings</h2><table><tr><th>stage</th><th>seconds</th></tr>"]
    parts += [f"<tr><td>{e(name)}</td><td class='num'>{e(_fmt(sec, 0))}</td></tr>" for name, sec in timings]
    parts += ["</table><h2>Settings</h2><pre>", e(json.dumps(settings, indent=2)), "</pre></body></html>"]
    return "".join(parts)
