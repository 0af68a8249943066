"""`rlhf loop` on a tiny model: two rounds in simulate mode, resuming after a kill between any two steps, round 2's
tasks written by round 1's policy, the labeling app serving a new round's tasks while the loop waits for people,
and the report across rounds."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.loop import STEPS, Loop, LoopConfig, policy_tag, round_of, run_loop
from rlhf.errors import UserError


def _config(out, model, **overrides):
    # the tiny model writes random tokens: the length oracle still orders its completions
    settings = dict(out=str(out), model=model, rounds=2, prompts_per_round=6, eval_prompts=3, k=4, max_new_tokens=8,
                    policy_steps=2, batch_size=4, rm_epochs=1, oracle="length", mix="reference", mix_k=2,
                    policy_lr=3e-3)
    settings.update(overrides)
    return LoopConfig(**settings)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """An uninterrupted two-round run."""
    cfg = _config(tmp_path_factory.mktemp("loop") / "run", tiny_model_dir)
    return cfg, run_loop(cfg)


class Interrupted(Exception):
    pass


def test_two_rounds_in_simulate_mode(finished):
    cfg, rounds = finished
    out = Path(cfg.out)
    assert sorted(rounds) == [1, 2] and all(list(steps) == list(STEPS) for steps in rounds.values())
    from labeling.store import open_store

    with open_store(out / "labels.db") as store:
        ranked = list(store.export_ranked_tasks())
        assert store.count_tasks() == 12  # 6 new prompts a round
    by_round = {r: [t for t in ranked if round_of(t.task_id) == r] for r in (1, 2)}
    assert {r: len(t) for r, t in by_round.items()} == {1: rounds[1]["label"]["rankings"],
                                                         2: rounds[2]["label"]["rankings"]}
    # every round's prompts are new, none of them held out for evaluation
    prompts = {r: {t["prompt"] for t in _lines(out / f"round-{r}" / "tasks.jsonl")} for r in (1, 2)}
    held_out = {row["prompt"] for row in _lines(out / "prompts_eval.jsonl")}
    assert len(prompts[1]) == len(prompts[2]) == 6 and not prompts[1] & prompts[2]
    assert not (prompts[1] | prompts[2]) & held_out
    # round 2's reward model trained on both rounds' rankings (less the held-out prompts'), from round 1's
    data = _lines(out / "round-2" / "rm_data" / "rankings.jsonl")
    assert len(data) == len(ranked)
    assert sum(row["split"] == "train" for row in data) == rounds[2]["reward-model"]["train_rankings"]
    rm_config = json.loads((out / "round-2" / "rm" / "reward_model.json").read_text())["config"]
    assert rm_config["init_rm"] == str(out / "round-1" / "rm")
    # round 2's policy continued from round 1's; both keep the SFT model as the reference
    policy_config = json.loads((out / "round-2" / "policy" / "config.json").read_text())
    assert policy_config["init_policy"] == str(out / "round-1" / "policy" / "policy")
    rows = _lines_csv(out / "rounds.csv")
    assert [row["step"] for row in rows] == ["1", "2"]
    assert rows[0]["rm_acc_before_new"] == "nan" and 0 <= float(rows[1]["rm_acc_before_new"]) <= 1
    assert rows[0]["oracle_sft"] == rows[1]["oracle_sft"]  # the same held-out prompts and seed every round
    for row in rows:
        assert float(row["kl"]) == rounds[int(row["step"])]["policy"]["final"]["objective/kl"]


def _lines_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_round_two_tasks_come_from_round_one_policy(finished, tiny_model_dir):
    import torch

    from policy import core
    from policy.roles import ACTOR, build_roles
    from reward_model.model import encode_sample_ids, map_samples

    cfg, _ = finished
    out = Path(cfg.out)
    tasks = _lines(out / "round-2" / "tasks.jsonl")
    assert all(t["id"].startswith("r2-") for t in tasks)
    tags = [[c["model"] for c in t["completions"]] for t in tasks]
    assert all(sorted(tag) == sorted([policy_tag(1)] * 2 + [policy_tag(0)] * 2) for tag in tags)
    assert all(c["model"] == "reference" for t in _lines(out / "round-1" / "tasks.jsonl") for c in t["completions"])

    # Re-scored at the sampling temperature: the log-likelihood ratio log p_round1 - log p_reference is higher for
    # the completions round 1's policy wrote than for those the reference wrote (the difference of the two means
    # estimates KL(p1 || p0) + KL(p0 || p1), > 0 once round 1's policy has moved).
    roles, tokenizer = build_roles(tiny_model_dir, None, critic=False, lora_r=16, lora_alpha=32,
                                   init_actor=str(out / "round-1" / "policy" / "policy"))
    rows, writers = [], []
    for task in tasks:
        for c in task["completions"]:
            rows.append(encode_sample_ids(tokenizer, task["prompt"], c["text"], 384))
            writers.append(c["model"])

    def logps(adapter):
        def completion_logps(input_ids, attention_mask, completion_mask):
            n = int(completion_mask.sum(1).max())
            logits = roles.response_logits(adapter, input_ids, attention_mask, n)
            logp = core.logprobs_from_logits(logits, input_ids[:, -n:], cfg.temperature)
            return (logp * completion_mask[:, -n:].to(logp.dtype)).sum(1)
        with torch.no_grad():
            return map_samples(completion_logps, rows, tokenizer.pad_token_id, "cpu", 16).tolist()

    ratio = [p - q for p, q in zip(logps(ACTOR), logps(None))]
    by_policy = [g for g, w in zip(ratio, writers) if w == policy_tag(1)]
    by_reference = [g for g, w in zip(ratio, writers) if w == policy_tag(0)]
    assert len(by_policy) == len(by_reference) == 12
    assert sum(by_policy) / 12 > sum(by_reference) / 12


def test_resume_after_a_kill_between_any_two_steps(finished, tmp_path, tiny_model_dir):
    """Interrupted after each step in turn (the step's summary stored, the next not begun), rerun with --resume
    each time: the same tasks, rankings and round results as the uninterrupted run."""
    reference_cfg, reference = finished
    cfg = _config(tmp_path / "run", tiny_model_dir)
    boundaries = [(r, step) for r in (1, 2) for step in STEPS][:-1]
    for stop_at in boundaries:
        def stop(r, step, stop_at=stop_at):
            if (r, step) == stop_at:
                raise Interrupted
        with pytest.raises(Interrupted):
            run_loop(cfg, after_step=stop)
        cfg = replace(cfg, resume=True)
    rounds = run_loop(cfg)
    for r in (1, 2):
        for name in ("tasks.jsonl", "rankings.jsonl"):
            assert (Path(cfg.out) / f"round-{r}" / name).read_text() == \
                (Path(reference_cfg.out) / f"round-{r}" / name).read_text()
        got, want = rounds[r]["evaluate"]["row"], reference[r]["evaluate"]["row"]
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert len(_lines_csv(Path(cfg.out) / "rounds.csv")) == 2


def test_a_killed_policy_step_continues_from_its_checkpoint(finished, tmp_path):
    """A kill inside round 2's policy training after its checkpoint at step 1 (the finished run's folder, moved,
    with round 2's policy taken back to that point): the rerun resumes the trainer, not the round."""
    reference_cfg, reference = finished
    out = tmp_path / "moved"
    shutil.copytree(reference_cfg.out, out)
    for step in ("policy", "evaluate"):
        (out / "round-2" / "steps" / f"{step}.json").unlink()
    shutil.rmtree(out / "round-2" / "policy")
    cfg = replace(reference_cfg, out=str(out), resume=True)
    Loop(replace(cfg, policy_steps=1)).policy(2)  # what the kill leaves: a checkpoint at step 1, no step summary
    assert (out / "round-2" / "policy" / "checkpoints" / "step-1").is_dir()
    rounds = run_loop(cfg)
    assert [row["step"] for row in _lines_csv(out / "round-2" / "policy" / "train_log.csv")] == ["1", "2"]
    got, want = rounds[2]["evaluate"]["row"], reference[2]["evaluate"]["row"]
    for key in ("kl", "oracle", "rm_score", "rm_acc_before_new"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key


def test_the_app_serves_a_new_rounds_tasks_while_the_loop_waits(tiny_model_dir, tmp_path, capsys):
    """annotate=people: while the loop waits, a person in the app (its handlers over the same store) is served the
    round's new tasks, in the order of the last round's reward model; the loop goes on once the budget is met."""
    from labeling import handlers
    from labeling.active import ActiveQueue
    from labeling.store import open_store

    cfg = _config(tmp_path / "run", tiny_model_dir, annotate="people", rankings_per_round=3, order="uncertainty",
                  mix="none", poll_seconds=1.0, db=str(tmp_path / "labels.db"))  # the store a server shares
    queue = ActiveQueue(cfg.order, seed=0)
    settings = handlers.AppSettings(overlap=1, active=queue)
    served: list[tuple[int, str]] = []
    orders: dict[int, list[str]] = {}
    store = open_store(tmp_path / "labels.db")
    store.add_annotator("ann")

    def person(seconds):
        """What happens in the app between two looks of the loop: a person ranks one task."""
        task = handlers.next_task(store, "ann", settings)["task"]
        assert task is not None
        current = max(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("round-*"))
        orders.setdefault(current, queue.serving_order)  # the order the round's import set
        served.append((current, task["id"]))
        ranks = {c["id"]: i + 1 for i, c in enumerate(task["completions"])}
        handlers.submit_ranking(store, "ann", settings, {"task_id": task["id"], "ranks": ranks,
                                                         "request_id": f"req-{len(served)}"})

    loop = Loop(cfg, sleep=person, queue=queue)
    try:
        rounds = loop.run()
    finally:
        store.close()
    assert [r for r, _ in served] == [1, 1, 1, 2, 2, 2]
    assert all(round_of(task_id) == r for r, task_id in served)  # each round's own tasks, served at once
    assert rounds[2]["label"]["rankings"] == 3 and rounds[2]["label"]["by_annotator"] == {"ann": 3}
    # round 2's tasks come first, the one round 1's reward model is least sure how to order (smallest margin) first
    from labeling.active import reward_margin

    round_two = orders[2][:6]
    assert all(round_of(t) == 2 for t in round_two) and served[3][1] == round_two[0]
    margins = [reward_margin(list(queue.rewards[t].values())) for t in round_two]
    assert margins == sorted(margins)
    printed = capsys.readouterr().out
    assert "[loop] round 2: 0/3 ranked" in printed and "[loop] round 2: 2/3 ranked (ann 2)" in printed


def test_report_across_rounds(finished):
    from pathlib import Path

    cfg, rounds = finished
    out = Path(cfg.out)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "# RLHF online loop report" in md and "2 of 2 rounds done" in md
    assert "| round | rankings (total) |" in md and "plots/rounds.png" in md
    assert "**SFT**" in md and "**Round 1**" in md and "**Round 2**" in md
    assert "data:image/png;base64," in html and "<script" not in html
    samples = _lines(out / "round-2" / "policy" / "samples.jsonl")
    assert samples[0]["policy"]["completion"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html


def test_settings_are_checked(tmp_path, tiny_model_dir, finished):
    with pytest.raises(UserError, match="--mix-k must be between 1 and --k - 1"):
        _config(tmp_path / "x", tiny_model_dir, mix_k=4).check()
    with pytest.raises(UserError, match="needs --oracle"):
        _config(tmp_path / "x", tiny_model_dir, oracle=None).check()
    cfg, _ = finished
    with pytest.raises(UserError, match="already holds a run"):
        run_loop(replace(cfg, resume=False))
    with pytest.raises(UserError, match="--k was 4 in this run, now 3"):
        run_loop(replace(cfg, resume=True, k=3))
    with pytest.raises(UserError, match="only 0 unused prompts are left"):
        Loop(cfg).round_prompts(10_000)
    with pytest.raises(UserError, match="no loop run"):
        run_loop(replace(cfg, out=str(tmp_path / "empty"), resume=True))


def test_warm_started_reward_model_holds_the_earlier_weights(finished, tiny_model_dir):
    import torch

    from reward_model.model import create_reward_model, load_reward_model
    from reward_model.train import load_trained_weights

    cfg, _ = finished
    saved = f"{cfg.out}/round-1/rm"
    trained, _ = load_reward_model(saved, dtype="float32")
    fresh, _ = create_reward_model(tiny_model_dir, 16, 32, readout_layer=0.33, readout_pool="mean")
    load_trained_weights(fresh, saved)
    want = {n.replace(".default", ""): p for n, p in trained.named_parameters() if "lora_" in n or "score_head" in n}
    got = {n.replace(".default", ""): p for n, p in fresh.named_parameters() if "lora_" in n or "score_head" in n}
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[n], got[n]) for n in want)
    with pytest.raises(UserError, match="LoRA rank/alpha"):
        load_trained_weights(create_reward_model(tiny_model_dir, 8, 16, readout_layer=0.33, readout_pool="mean")[0],
                             saved)


def test_online_demo_settings():
    from pipeline.loop import DEMO_ONLINE, online_demo_config

    cfg = online_demo_config({})
    assert (cfg.out, cfg.rounds, cfg.prompts_per_round, cfg.policy_steps) == ("runs/demo-online", 3, 64, 4)
    assert cfg.annotate == "simulate" and cfg.oracle == "descriptive"
    cfg = online_demo_config({"label_prompts": 100, "ppo_lr": 1e-4, "ppo_steps": 5, "out": "x"}, quick=True)
    assert (cfg.prompts_per_round, cfg.policy_lr, cfg.policy_steps, cfg.out, cfg.rounds) == (50, 1e-4, 5, "x", 2)
    assert DEMO_ONLINE["rounds"] * DEMO_ONLINE["prompts_per_round"] >= 192  # about the demo's 200 labeled prompts
    with pytest.raises(UserError, match="--dpo-beta do not apply"):
        online_demo_config({"dpo_beta": 0.2})


def test_dpo_rounds_continue_the_policy(tiny_model_dir, tmp_path):
    """--algo dpo: each round's DPO trains on that round's rankings, from the last round's policy."""
    cfg = _config(tmp_path / "run", tiny_model_dir, algo="dpo", mix="none")
    rounds = run_loop(cfg)
    out = Path(cfg.out)
    config = json.loads((out / "round-2" / "policy" / "config.json").read_text())
    assert config["init_policy"] == str(out / "round-1" / "policy" / "policy")
    data = _lines(out / "round-2" / "dpo_data" / "rankings.jsonl")
    assert len(data) == rounds[2]["label"]["rankings"] and all(round_of(row["task_id"]) == 2 for row in data)
    row = rounds[2]["evaluate"]["row"]
    assert row["kl"] == rounds[2]["policy"]["final"]["objective/kl"] and row["oracle"] is not None


def test_which_policy_writes_the_mixed_completions():
    from pipeline.loop import mix_source

    assert [mix_source(r, "none") for r in (1, 2, 3)] == [None, None, None]
    assert [mix_source(r, "reference") for r in (1, 2, 3)] == [None, 0, 0]  # round 1 samples the SFT model anyway
    assert [mix_source(r, "previous") for r in (1, 2, 3, 4)] == [None, 0, 1, 2]  # the policy before the current one
