"""The end-to-end demo on a tiny model: every stage runs, the report is written, --resume skips done stages."""

import json
from html.parser import HTMLParser

import pytest

from pipeline.cli import main
from pipeline.demo import DemoConfig, run_demo
from pipeline.report import write_report
from rlhf.errors import UserError


def _config(tmp_path, model, **overrides):
    # The tiny model writes random tokens: word counts differ between its completions, word lists rarely match.
    settings = dict(out=str(tmp_path / "demo"), model=model, label_prompts=6, eval_prompts=3, max_new_tokens=8,
                    ppo_steps=2, ppo_batch_size=4, eval_every=1, oracle="length")
    settings.update(overrides)
    return DemoConfig.quick(**settings)


class _Page(HTMLParser):
    """The tags of a page, and the text of each <pre> block (entities decoded: what a browser shows)."""

    def __init__(self, html):
        super().__init__()
        self.tags, self.pre, self._in_pre = [], [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        self._in_pre = self._in_pre and tag != "pre"

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data


def test_demo_runs_every_stage_and_resumes(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    done = run_demo(cfg)
    assert list(done) == ["generate", "label", "export", "reward_model", "policy", "dpo", "report"]
    out = tmp_path / "demo"
    assert done["generate"]["tasks"] == 6
    prompts = {name: {json.loads(line)["prompt"] for line in (out / f"prompts_{name}.jsonl").read_text().splitlines()}
               for name in ("train", "eval")}
    tasks = {json.loads(line)["prompt"] for line in (out / "tasks.jsonl").read_text().splitlines()}
    assert prompts["eval"] and tasks <= prompts["train"] and not prompts["train"] & prompts["eval"]
    # every stored ranking's non-tied pairs, at most 6 tasks x overlap 2 x C(4,2)
    from labeling.store import open_store
    from rlhf.pairs import pair_indices

    with open_store(out / "labels.db") as store:
        expected = sum(len(pair_indices(r.ranks)) for r in store.export_ranked_tasks())
    assert 0 < done["export"]["train_pairs"] + done["export"]["test_pairs"] == expected <= 6 * 2 * 6
    assert (out / "rm" / "reward_model.json").is_file() and (out / "ppo" / "policy").is_dir()
    assert (out / "dpo" / "policy").is_dir()
    dpo_samples = [json.loads(line) for line in (out / "dpo" / "samples.jsonl").read_text().splitlines()]
    ppo_samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    # the three policies are compared on the same held-out prompts, the SFT side sampled identically
    assert [s["prompt"] for s in dpo_samples] == [s["prompt"] for s in ppo_samples]
    assert [s["reference"]["completion"] for s in dpo_samples] == [s["reference"]["completion"] for s in ppo_samples]
    html = (out / "report.html").read_text()
    assert "RLHF demo report" in html and "data:image/png;base64," in html
    assert "<script" not in html  # model text is escaped; the report runs no script
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    shown = [text.removesuffix("\n") for text in _Page(html).pre]
    for sample, dpo_sample in zip(samples, dpo_samples):  # every model text appears as literal text in a code block
        for text in (sample["prompt"], sample["reference"]["completion"], sample["policy"]["completion"],
                     dpo_sample["policy"]["completion"]):
            assert text in shown
    md = (out / "report.md").read_text()
    assert "## Samples" in md and "ppo/plots/reward_vs_kl.png" in md and "rm/train_curves.png" in md
    assert "## SFT, RM + PPO and DPO on the same held-out prompts" in md and "| SFT | RM + PPO | DPO |" in md
    test = done["reward_model"]["test"]
    low, high = test["accuracy_interval"]
    assert low <= test["accuracy"] <= high and test["prompts"] == len({r["prompt"] for r in _held_out_rows(out)})
    prompts = f"{test['prompts']} prompt{'s' * (test['prompts'] != 1)}"  # "1 prompt", not "1 prompts"
    assert (f"| Reward model held-out accuracy [95% interval over the held-out prompts] | {test['accuracy']:.3f} "
            f"[{low:.3f}, {high:.3f}], {test['pairs']} pairs of {prompts} |") in md
    assert html.count("data:image/png;base64,") == 5

    # --resume after a "crash" in PPO: earlier stages are skipped, not redone
    (out / "stages" / "policy.json").unlink()
    (out / "stages" / "report.json").unlink()
    capsys.readouterr()
    again = run_demo(_config(tmp_path, tiny_model_dir, resume=True))
    printed = capsys.readouterr().out
    for stage in ("generate", "label", "export", "reward_model", "dpo"):
        assert f"{stage}: done earlier, skipped" in printed
        assert again[stage]["seconds"] == done[stage]["seconds"]  # read back from its marker, not rerun
    assert printed.count("done earlier, skipped") == 5
    assert "policy done in" in printed


def _held_out_rows(out):
    rows = [json.loads(line) for line in (out / "pairs" / "rankings.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "test" and len({c["rank"] for c in r["completions"]}) > 1]


def test_demo_refuses_to_overwrite_and_names_the_failing_stage(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "something").write_text("keep me")
    with pytest.raises(UserError, match="already holds a run"):
        run_demo(_config(tmp_path, tiny_model_dir))
    assert (out / "something").read_text() == "keep me"

    code = main(["demo", "--quick", "--out", str(tmp_path / "other"), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stage 'generate' failed" in err and len(err.splitlines()) == 1


def test_report_renders_model_text_inert(tmp_path):
    """Raw HTML, links, images and headings written by a model show as literal text in both report.md and
    report.html, and the page loads nothing and runs nothing."""
    evil = ("<script>alert(1)</script> [x](javascript:alert(1)) ![i](http://evil/x.png)\n# heading\n"
            "```\n<img src=x onerror=alert(1)>\n````")
    out = tmp_path / "demo"
    (out / "ppo").mkdir(parents=True)
    side = {"completion": evil, "reward": 0.5, "kl": 1.25}
    (out / "ppo" / "samples.jsonl").write_text(json.dumps({"prompt": evil, "reference": side, "policy": side}) + "\n")
    done = {"label": {"stats": {"tasks": 1, "annotators": [{"name": "<b>[m](javascript:x)</b> | x", "ranked": 1,
                                                            "skipped": 0}]}},
            "policy": {"final": {"objective/oracle": 1.0}, "reference": {"objective/oracle": 0.5}}}
    write_report(out, {"oracle": "<i>descriptive</i>"}, done)
    page = _Page((out / "report.html").read_text())
    assert [text.removesuffix("\n") for text in page.pre].count(evil) == 3  # prompt, SFT and PPO, literal
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "a" not in tags and "img" not in tags and "i" not in tags and "b" not in tags
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert tags.count("h1") == 1 and ("meta", {"http-equiv": "Content-Security-Policy", "content": policy}) in page.tags
    html = (out / "report.html").read_text()
    assert "&lt;b&gt;[m](javascript:x)&lt;/b&gt; | x" in html  # the annotator's name, escaped, in one cell


def test_the_report_keys_and_shows_a_conversation_prompt():
    from pipeline.report import _fenced, _prompt_key

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "A poem?"}]
    assert _fenced(conversation) == ["```", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: A poem?\n\nAssistant:",
                                     "```", ""]
    assert _prompt_key(conversation) == _prompt_key([dict(m) for m in conversation]) != _prompt_key("A poem?")
    assert {_prompt_key(conversation): 1}  # hashable, unlike the list itself
