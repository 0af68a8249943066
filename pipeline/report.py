"""The demo's report, written once as Markdown (`report.md`, its images the stages' own plots) and rendered
from it into a self-contained `report.html` (markdown-it, images embedded as data: URIs, a strict
Content-Security-Policy).

Model-written text (prompts and completions) is untrusted: it goes into fenced code blocks whose fence is
longer than any run of backticks in it, so neither Markdown nor HTML in it does anything, and the renderer
escapes raw HTML everywhere (`html: False`). Other text that is not ours (annotator names) is escaped."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from rlhf.bootstrap import cluster_bootstrap_interval
from rlhf.hardware import cpu_description, resolve_dtype, usable_cores
from rlhf.jsonl import atomic_write, read_jsonl
from rlhf.records import parse_prompt, transcript

PLOTS = [("rm/train_curves.png", "Reward model training curves"),
         ("ppo/plots/reward_vs_step.png", "Policy reward against step (rollouts and held-out prompts)"),
         ("ppo/plots/kl_vs_step.png", "KL to the reference against step"),
         ("ppo/plots/reward_vs_kl.png",
          "Held-out reward against KL (each point an evaluation, labelled with its step)"),
         ("dpo/plots/train_curves.png", "DPO training curves (train steps; held-out pairs as points)")]
BOOTSTRAP_RESAMPLES = 2000


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    if before:
        return f"{after - before:+.3f} ({(after - before) / abs(before) * 100:+.0f}%)"
    return f"{after - before:+.3f}"


def _escape(text: Any) -> str:
    """Text that is not ours, inert inside a line of Markdown (a table cell, a sentence): one line, every
    character that could start a link, image, emphasis, code span, HTML, entity or cell boundary escaped."""
    return re.sub(r"([\\`*_\[\]<>!#|&~])", r"\\\1", " ".join(str(text).split()))


def _fenced(text: Any, info: str = "") -> list[str]:
    """Literal text as a fenced code block; no line of the text can close it. A conversation prompt (its JSON
    list of messages) is shown as its transcript."""
    if not isinstance(text, str):
        text = transcript(parse_prompt(text))
    fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", text)), default=0))
    return [fence + info, text, fence, ""]


def _prompt_key(prompt: Any) -> str:
    """A sample's prompt as a dict key: the string, or a conversation's JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _mean_ci(values: list[float]) -> str:
    if not values:
        return "n/a"
    low, high = cluster_bootstrap_interval(values, [1.0] * len(values), BOOTSTRAP_RESAMPLES)
    return f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]"


def _side_values(samples: list[dict], side: str, key: str) -> list[float]:
    return [s[side][key] for s in samples if isinstance(s.get(side, {}).get(key), (int, float))]


def comparison_rows(ppo_samples: list[dict], dpo_samples: list[dict], reference: dict, ppo: dict, dpo: dict,
                    rm_accuracy: float | None, seconds: dict[str, Any]) -> list[tuple]:
    """The SFT / RM + PPO / DPO table: each policy's held-out samples (the same prompts, sampling seed, length
    and temperature) measured the same way. Oracle scores with their 95% bootstrap interval over the prompts,
    and each policy's change against the SFT model's sample of the same prompt (paired)."""
    sft_rows = ppo_samples or dpo_samples
    sft = {_prompt_key(s["prompt"]): s["reference"].get("oracle") for s in sft_rows}

    def paired(samples):
        diffs = [s["policy"]["oracle"] - sft[_prompt_key(s["prompt"])] for s in samples
                 if isinstance(s["policy"].get("oracle"), (int, float))
                 and isinstance(sft.get(_prompt_key(s["prompt"])), (int, float))]
        return _mean_ci(diffs) if diffs else "n/a"

    dpo_final = dpo.get("final", {}) or {}
    ppo_final = ppo.get("final", {}) or {}
    return [
        ("Oracle score, mean [95% CI]", _mean_ci(_side_values(sft_rows, "reference", "oracle")),
         _mean_ci(_side_values(ppo_samples, "policy", "oracle")),
         _mean_ci(_side_values(dpo_samples, "policy", "oracle"))),
        ("Change vs SFT on the same prompt [95% CI]", "0", paired(ppo_samples), paired(dpo_samples)),
        ("Reward-model score", _fmt(reference.get("objective/rm_score")), _fmt(ppo_final.get("objective/rm_score")),
         _fmt(dpo_final.get("objective/rm_score"))),
        ("KL to the SFT model, nats per response", "0", _fmt(ppo_final.get("objective/kl")),
         _fmt(dpo_final.get("objective/kl"))),
        ("Distinct-2", _fmt(reference.get("eval/distinct_2")), _fmt(ppo_final.get("eval/distinct_2")),
         _fmt(dpo_final.get("eval/distinct_2"))),
        ("Held-out pairwise accuracy (RM score; DPO's implicit reward)", "n/a", _fmt(rm_accuracy),
         _fmt(dpo_final.get("rewards/accuracies"))),
        ("Training seconds (RM + PPO; DPO)", "n/a", _fmt(_sum(seconds.get("reward_model"), seconds.get("policy")), 0),
         _fmt(seconds.get("dpo"), 0)),
        ("Held-out prompts", str(len(sft_rows)), str(len(ppo_samples)), str(len(dpo_samples))),
    ]


def _sum(*values: Any) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


def _readout(rm: dict[str, Any]) -> str:
    """"layer 10, mean (probe 0.71 cross-validated)" from a reward-model summary."""
    readout, search = rm.get("readout"), rm.get("readout_search")
    if not readout:
        return "n/a"
    text = f"layer {readout['layer'] or 'last'}, {readout['pool']}"
    return text + (f" (probe {search['cv_accuracy']:.2f} cross-validated)" if search else "")


def _held_out_accuracy(test: dict[str, Any]) -> str:
    """'0.768 [0.638, 0.888], 142 pairs of 19 prompts': the interval resamples prompts, since pairs of one prompt
    are not independent (reward_model.evaluate.prompt_bootstrap_interval)."""
    if test.get("accuracy") is None:
        return "n/a"
    interval = test.get("accuracy_interval")
    shown = f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else ""
    count = test.get("prompts")  # absent from summaries written before it was kept
    prompts = f" of {count} prompt{'s' * (count != 1)}" if count is not None else ""
    return f"{_fmt(test['accuracy'])}{shown}, {test.get('pairs')} pairs{prompts}"


def _table(header: tuple[str, ...], rows: list[tuple], align: str = "---") -> list[str]:
    return ([f"| {' | '.join(header)} |", "|---|" + f"{align}|" * (len(header) - 1)]
            + [f"| {' | '.join(map(str, row))} |" for row in rows] + [""])


def write_report(out: Path, settings: dict[str, Any], done: dict[str, dict]) -> dict[str, Any]:
    out = Path(out)
    label, pairs, rm, policy, dpo = (done.get(k, {}) for k in ("label", "export", "reward_model", "policy", "dpo"))
    stats, agreement = label.get("stats", {}), label.get("stats", {}).get("agreement", {})
    final, reference = policy.get("final", {}) or {}, policy.get("reference", {}) or {}
    oracle_sft, oracle_ppo = reference.get("objective/oracle"), final.get("objective/oracle")
    rm_test = rm.get("test", {}) or {}
    oracle = _escape(settings.get("oracle", "oracle"))

    lines = ["# RLHF demo report", "",
             f"Scripted annotators ranked SFT completions by the {oracle} oracle; a LoRA reward model learned their "
             "preferences; PPO with a KL penalty optimised the policy against it; DPO trained another policy "
             "directly on the same rankings.", "", "## Results", ""]
    lines += _table(("", ""), [
        (f"Oracle score ({oracle}), SFT policy", _fmt(oracle_sft)),
        ("Oracle score, PPO policy", _fmt(oracle_ppo)),
        ("Change", _change(oracle_sft, oracle_ppo)),
        ("Reward-model score, SFT -> PPO",
         f"{_fmt(reference.get('objective/rm_score'))} -> {_fmt(final.get('objective/rm_score'))}"),
        ("KL(PPO \\|\\| SFT), nats per response", _fmt(final.get("objective/kl"))),
        ("Distinct-2, SFT -> PPO", f"{_fmt(reference.get('eval/distinct_2'))} -> {_fmt(final.get('eval/distinct_2'))}"),
        ("Reward model held-out accuracy [95% interval over the held-out prompts]", _held_out_accuracy(rm_test)),
        ("Reward model read-out (chosen by frozen probes on the training rankings)", _readout(rm)),
        ("Reward's correlation with completion length (within prompts, training completions)",
         _fmt(rm.get("length_correlation"))),
        ("Reward model calibration error (ECE)", _fmt(rm_test.get("ece"))),
        ("Human agreement ceiling", _fmt(rm_test.get("human_agreement")))])
    ppo_samples = _samples(out / "ppo" / "samples.jsonl")
    dpo_samples = _samples(out / "dpo" / "samples.jsonl")
    if ppo_samples or dpo_samples:
        seconds = {name: summary.get("seconds") for name, summary in done.items() if isinstance(summary, dict)}
        lines += ["## SFT, RM + PPO and DPO on the same held-out prompts", "",
                  f"One sample per held-out prompt from each policy (same prompts, sampling seed, length and "
                  f"temperature), scored by the {oracle} oracle (the annotators' preference). Intervals: 95% "
                  f"percentile bootstrap over the prompts ({BOOTSTRAP_RESAMPLES} resamples); the change is paired, "
                  "each policy's sample against the SFT model's sample of the same prompt.", ""]
        lines += _table(("", "SFT", "RM + PPO", "DPO"),
                        comparison_rows(ppo_samples, dpo_samples, reference, policy, dpo, rm.get("test_accuracy"),
                                        seconds), align="---:")
    lines += ["## Labeling", ""] + _table(("", ""), [
        ("Tasks", _fmt(stats.get("tasks"))), ("Rankings", _fmt(stats.get("rankings"))),
        ("Tasks complete at overlap", f"{_fmt(stats.get('complete'))} / {_fmt(stats.get('tasks'))}"),
        ("Shared tasks", _fmt(agreement.get("shared_tasks"))),
        ("Pairwise agreement between annotators", _fmt(agreement.get("pairwise_agreement"))),
        ("Mean Kendall's tau", _fmt(agreement.get("mean_kendall_tau"))),
        ("Train pairs / test pairs (split by prompt)",
         f"{pairs.get('train_pairs', 'n/a')} / {pairs.get('test_pairs', 'n/a')}")])
    if stats.get("annotators"):
        lines += _table(("annotator", "ranked", "skipped", "median s/task"), [
            (_escape(a["name"]), a["ranked"], a["skipped"], _fmt(a.get("median_seconds"), 1))
            for a in stats["annotators"]], align="---:")
    lines += ["## Plots", ""]
    for path, title in PLOTS:
        if (out / path).is_file():
            lines += [f"**{title}**", "", f"![{title}]({path})", ""]
    dpo_by_prompt = {_prompt_key(s["prompt"]): s["policy"] for s in dpo_samples}
    samples = (ppo_samples or [{**s, "policy": None} for s in dpo_samples])[:6]
    if samples:
        lines += ["## Samples: SFT, PPO and DPO on held-out prompts", ""]
        for i, sample in enumerate(samples, 1):
            lines += [f"### Prompt {i}", ""] + _fenced(sample["prompt"])
            sides = (("SFT", sample["reference"]), ("PPO", sample["policy"]),
                     ("DPO", dpo_by_prompt.get(_prompt_key(sample["prompt"]))))
            for name, side in sides:
                if side is None:
                    continue
                scores = ", ".join(f"{_escape(k.split('/')[-1])} {_fmt(v, 2)}" for k, v in side.items()
                                   if isinstance(v, (int, float)))
                lines += [f"**{name}** ({scores})", ""] + _fenced(side.get("completion", ""))
    dtype, why_dtype = resolve_dtype(settings.get("dtype", "auto"))
    threads, why_threads = usable_cores()
    timed = [(name, summary["seconds"]) for name, summary in done.items()
             if isinstance(summary, dict) and isinstance(summary.get("seconds"), (int, float))]
    lines += ["## Stage timings", "",
              f"On {_escape(cpu_description())}: models in {dtype} ({_escape(why_dtype)}), {threads} threads "
              f"({why_threads}).", ""]
    lines += _table(("stage", "seconds"), [(_escape(name), _fmt(seconds, 0)) for name, seconds in timed]
                    + [("**total before the report**", _fmt(sum(seconds for _, seconds in timed), 0))],
                    align="---:")
    lines += ["## Settings", ""] + _fenced(json.dumps(settings, indent=2), "json")
    markdown = "\n".join(lines)

    with atomic_write(out / "report.md") as handle:
        handle.write(markdown)
    with atomic_write(out / "report.html") as handle:
        handle.write(render_html(markdown, out, "RLHF demo report"))
    dpo_final = dpo.get("final", {}) or {}
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "oracle_sft": oracle_sft, "oracle_ppo": oracle_ppo, "kl": final.get("objective/kl"),
            "oracle_dpo": dpo_final.get("objective/oracle"), "kl_dpo": dpo_final.get("objective/kl"),
            "rm_test_accuracy": rm.get("test_accuracy"), "dpo_test_accuracy": dpo_final.get("rewards/accuracies")}


def _samples(path: Path) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)] if path.is_file() else []


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d232b; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde3ea; padding-bottom: .2em; }
h3 { margin: 1.4em 0 .3em; font-size: 1em; color: #566; }
table { border-collapse: collapse; margin: .6em 0; }
td, th { border: 1px solid #dde3ea; padding: .35em .7em; text-align: left; }
th { background: #f3f6f9; } img { max-width: 100%; border: 1px solid #eef1f4; }
pre { background: #f7f9fb; padding: .7em 1em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; }
"""


def render_html(markdown: str, base: Path, title: str) -> str:
    """`markdown` as a self-contained page: CommonMark (+ tables) with raw HTML escaped, every image read
    from `base` and embedded as a data: URI, nothing loaded from anywhere (Content-Security-Policy)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                data = base64.b64encode((base / str(child.attrGet("src"))).read_bytes()).decode("ascii")
                child.attrSet("src", f"data:image/png;base64,{data}")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{title}</title><style>{_CSS}</style></head><body>\n"
            f"{md.renderer.render(tokens, md.options, {})}</body></html>\n")
