"""Active labeling: the uncertainty order, the reward model's proposed ranking stored apart from the annotator's,
the stats line, and the simulated label-retrain-reorder loop."""

import json

import pytest
from labeling_helpers import make_tasks, order_ranks

from labeling import handlers
from labeling.active import ActiveQueue, proposed_ranks, random_key, reward_margin
from labeling.commands import active_queue
from labeling.gradio_ui import LabelUI
from labeling.handlers import AppSettings
from labeling.stats import compute_stats, format_stats
from labeling.store import InvalidRanking, open_store
from pipeline.cli import main as cli_main
from rlhf.errors import UserError
from rlhf.pairs import proposal_moves


def test_margin_proposal_and_moves_on_hand_made_numbers():
    assert reward_margin([0.1, 2.0, 1.5, -1.0]) == pytest.approx(0.5)  # sorted 2.0, 1.5, 0.1, -1.0
    assert reward_margin([3.0, 3.0, 1.0]) == 0.0 and reward_margin([1.0]) == float("inf")
    assert proposed_ranks({"a": 0.2, "b": 1.5, "c": 0.2, "d": -3.0}) == {"a": 2, "b": 1, "c": 2, "d": 3}
    kept = {"a": 1, "b": 2, "c": 3, "d": 4}
    assert proposal_moves(kept, kept) == 0
    assert proposal_moves(kept, {"a": 2, "b": 1, "c": 3, "d": 4}) == 1           # one adjacent swap
    assert proposal_moves(kept, {"a": 4, "b": 3, "c": 2, "d": 1}) == 6           # reversed: every pair
    assert proposal_moves(kept, {"a": 1, "b": 1, "c": 2, "d": 3}) == 1           # a tie where there was an order


def _rewards(tasks, margins):
    """Rewards whose smallest adjacent gap is the given margin for each task."""
    return {t.id: dict(zip([c.id for c in t.completions], [0.0, margin, 100.0, 200.0]))
            for t, margin in zip(tasks, margins)}


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "labels.db") as s:
        yield s


def test_uncertainty_serves_the_smallest_margin_first_within_the_store_rules(store):
    tasks = make_tasks(4, k=4)
    store.import_tasks(tasks)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    # the smallest gaps: task-2 (0.1), task-0 (0.5), task-3 (2.0), task-1 (5.0)
    queue = ActiveQueue("uncertainty", rewards=_rewards(tasks, [0.5, 5.0, 0.1, 2.0]), task_ids=store.task_ids())
    assert queue.serving_order == ["task-2", "task-0", "task-3", "task-1"]
    first = queue.next_task(store, "a", overlap=1)
    assert first.id == "task-2"
    assert queue.next_task(store, "a", overlap=1).id == "task-2"          # a reload serves the same task
    assert queue.next_task(store, "b", overlap=1).id == "task-0"          # task-2's one place is held by a
    store.submit_ranking("a", "task-2", order_ranks(first, [0, 1, 2, 3]), require_assignment=True)
    store.skip_task("c", "task-3")
    assert queue.next_task(store, "c", overlap=1).id == "task-1"          # ranked, held or skipped: the next one
    third = queue.next_task(store, "a", overlap=1)
    assert third.id == "task-3"                                           # c's skip left its place free
    store.submit_ranking("a", "task-3", order_ranks(third, [0, 1, 2, 3]), require_assignment=True)
    assert queue.next_task(store, "a", overlap=1) is None                 # the rest are held by b and c
    # a task imported after scoring is served once the scored ones are done, in the store's order
    store.import_tasks(make_tasks(1, prefix="late"))
    assert queue.next_task(store, "a", overlap=1).id == "late-0"


def test_random_order_is_a_seeded_permutation(store):
    store.import_tasks(make_tasks(12))
    ids = store.task_ids()
    orders = [ActiveQueue("random", seed=seed, task_ids=ids).serving_order for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(ids) and orders[0] != ids
    # without scores yet, uncertainty tries the tasks in the same random order (a shared first round)
    assert ActiveQueue("uncertainty", seed=0, task_ids=ids).serving_order == orders[0]
    with pytest.raises(UserError, match="order must be one of"):
        ActiveQueue("hardest")


def test_pre_ranked_task_stores_the_proposal_apart_and_stats_report_it(store):
    tasks = make_tasks(3, k=4)
    store.import_tasks(tasks)
    store.add_annotator("alice")
    rewards = {t.id: {c.id: float(i) for i, c in enumerate(t.completions)} for t in tasks}  # the last one best
    settings = AppSettings(overlap=1, active=ActiveQueue(proposal_rewards=rewards))
    kept_moves = []
    for changed in (False, True, True):
        served = handlers.next_task(store, "alice", settings)
        task_id, proposal = served["task"]["id"], served["proposal"]
        assert proposal == proposed_ranks(rewards[task_id])
        ranks = dict(proposal)
        if changed:  # the annotator swaps the top two
            top, second = sorted(ranks, key=ranks.get)[:2]
            ranks[top], ranks[second] = ranks[second], ranks[top]
        result = handlers.submit_ranking(store, "alice", settings, {"task_id": task_id, "ranks": ranks})
        assert result["ranks"] == ranks  # the ranking itself is the annotator's
        kept_moves.append((task_id, not changed))
    assert handlers.next_task(store, "alice", settings) == {
        "task": None, "proposal": None, "draft": None,
        "progress": {"ranked": 3, "skipped": 0, "total_tasks": 3, "left": 0}}
    submits = [e for e in store.events() if e["kind"] == "submit"]
    assert [(e["task_id"], e["payload"]["proposal_kept"]) for e in submits] == kept_moves
    assert [e["payload"]["proposal_moves"] for e in submits] == [0, 1, 1]
    assert all("proposal" not in r.ranks for r in store.export_rankings())
    # an edit records no proposal: the annotator saw their own ranking
    handlers.submit_ranking(store, "alice", settings,
                            {"task_id": tasks[0].id, "ranks": order_ranks(tasks[0], [0, 1, 2, 3])})
    assert "proposal" not in store.events()[-1]["payload"]
    stats = compute_stats(store, overlap=1)
    assert stats["proposals"] == {"shown": 3, "kept": 1, "kept_fraction": pytest.approx(1 / 3), "mean_moves":
                                  pytest.approx(2 / 3)}
    assert "reward-model proposals: kept as is in 1 of 3 rankings (33%), 0.67 pairs moved on average" in \
        format_stats(stats)


def test_a_proposal_that_does_not_fit_the_task_stores_nothing(store):
    task = make_tasks(1, k=3)[0]
    store.import_tasks([task])
    store.add_annotator("alice")
    with pytest.raises(InvalidRanking, match="proposal: ranking must cover exactly"):
        store.submit_ranking("alice", task.id, order_ranks(task, [0, 1, 2]), proposal={"nope": 1, "other": 2})
    assert store.export_rankings() == [] and store.events() == []


def test_the_ui_opens_a_task_with_the_proposal_set(store):
    tasks = make_tasks(1, k=3)
    store.import_tasks(tasks)
    store.add_annotator("alice")
    rewards = {tasks[0].id: {c.id: -float(i) for i, c in enumerate(tasks[0].completions)}}
    ui = LabelUI(store, AppSettings(overlap=1, active=ActiveQueue(proposal_rewards=rewards)))
    value, _ = ui.next_view("alice")
    view = json.loads(value)
    assert view["own"] == {"ranks": proposed_ranks(rewards[tasks[0].id])} and not view["editing"]
    assert "order is set" in view["notice"]
    plain, _ = LabelUI(store, AppSettings(overlap=1)).next_view("alice")
    assert json.loads(plain)["own"] is None  # without --pre-rank nothing is set


def test_label_options_score_the_store_with_the_reward_model(store, rm_dir):
    from reward_model.model import load_reward_model, score_texts

    tasks = make_tasks(3, k=3)
    store.import_tasks(tasks)
    queue = active_queue(store, "uncertainty", rm_dir, rm_dir)
    rm, tokenizer = load_reward_model(rm_dir)
    task = tasks[1]
    expected = score_texts(rm, tokenizer, [task.prompt] * 3, [c.text for c in task.completions])
    assert list(queue.rewards[task.id].values()) == pytest.approx(expected, abs=1e-5)
    assert queue.proposal(task.id) == proposed_ranks(dict(zip([c.id for c in task.completions], expected)))
    assert sorted(queue.serving_order) == sorted(store.task_ids())
    assert active_queue(store, "fewest-rankings", None, None) is None
    with pytest.raises(UserError, match="--order uncertainty needs --rm"):
        active_queue(store, "uncertainty", None, rm_dir)
    with pytest.raises(UserError, match="does not exist"):
        active_queue(store, "uncertainty", str(rm_dir) + "-missing", None)


def test_information_order_ranks_the_open_tasks_by_the_posterior(store, rm_dir):
    import torch

    from reward_model.model import load_reward_model, readout_texts, score_texts
    from reward_model.posterior import information_order, pair_matrix

    tasks = make_tasks(6, k=3)
    store.import_tasks(tasks)
    store.add_annotator("a")
    store.submit_ranking("a", tasks[0].id, order_ranks(tasks[0], [2, 0, 1]))
    store.submit_ranking("a", tasks[1].id, {c.id: r for c, r in zip(tasks[1].completions, [1, 2, 1])})  # a tie
    queue = active_queue(store, "information", rm_dir, rm_dir, overlap=1)
    open_tasks = tasks[2:]
    assert sorted(queue.rewards) == sorted(t.id for t in open_tasks)  # full tasks are not scored
    rm, tokenizer = load_reward_model(rm_dir)
    for task in open_tasks:
        expected = score_texts(rm, tokenizer, [task.prompt] * 3, [c.text for c in task.completions])
        assert list(queue.rewards[task.id].values()) == pytest.approx(expected, abs=1e-5)
    assert queue.proposal(tasks[3].id) == proposed_ranks(queue.rewards[tasks[3].id])

    def features(task):
        return readout_texts(rm, tokenizer, [task.prompt] * 3, [c.text for c in task.completions])

    # the ranked pairs, preferred minus other: task-0's three, task-1's two (its tie gives none)
    ranked = torch.cat([pair_matrix(features(tasks[0]), [(2, 0), (2, 1), (0, 1)]),
                        pair_matrix(features(tasks[1]), [(0, 1), (2, 1)])])
    candidates = [pair_matrix(features(t), [(0, 1), (0, 2), (1, 2)]) for t in open_tasks]
    order = information_order(candidates, ranked, rm.score_head.weight.detach().flatten())
    full = sorted([tasks[0].id, tasks[1].id], key=lambda t: random_key(0, t))  # unscored: last, in the random order
    assert queue.serving_order == [open_tasks[i].id for i in order] + full
    # at overlap 2 the ranked tasks are open too: every task is a candidate, and tasks 0 and 1 still count as ranked
    candidates = [pair_matrix(features(t), [(0, 1), (0, 2), (1, 2)]) for t in tasks]
    order = information_order(candidates, ranked, rm.score_head.weight.detach().flatten())
    assert active_queue(store, "information", rm_dir, None, overlap=2).serving_order == [tasks[i].id for i in order]
    with pytest.raises(UserError, match="--order information needs --rm"):
        active_queue(store, "information", None, None)


def test_simulate_loop_retrains_and_reorders(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "labels.db"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in make_tasks(7, k=3)))
    assert cli_main(["import", "--db", str(db), str(tasks)]) == 0
    assert cli_main(["simulate", "--db", str(db), "--oracle", "length", "--annotators", "1", "--overlap", "1",
                     "--strategy", "uncertainty", "--rm-every", "3", "--rm-out", str(tmp_path / "rms"),
                     "--model", tiny_model_dir, "--rm-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 reward models trained along the way" in out and "7 rankings by 1 annotators" in out
    for round_ in (1, 2):
        rows = (tmp_path / "rms" / f"round-{round_}" / "data" / "rankings.jsonl").read_text().splitlines()
        assert len(rows) == 3 * round_  # each retraining sees every ranking so far
        assert (tmp_path / "rms" / f"round-{round_}" / "rm" / "reward_model.json").is_file()
    # bad combinations: one line each, nothing stored
    for flags, message in [(["--strategy", "uncertainty"], "needs a reward model"),
                           (["--rm-every", "2"], "--rm-every needs --rm-out"),
                           (["--rm-every", "2", "--rm-out", str(tmp_path / "rms")], "is not empty"),
                           (["--rm", str(tmp_path), "--strategy", "random"], "only with --strategy uncertainty")]:
        assert cli_main(["simulate", "--db", str(db), "--oracle", "length", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (flags, err)


def test_simulate_information_loop_serves_each_round_in_the_retrained_models_order(tiny_model_dir, tmp_path, capsys):
    from labeling.active import information_order
    from reward_model.model import load_reward_model
    from rlhf.records import RankedTask

    db, tasks = tmp_path / "labels.db", tmp_path / "tasks.jsonl"
    made = make_tasks(8, k=3, seed=1)
    tasks.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in made))
    assert cli_main(["import", "--db", str(db), str(tasks)]) == 0
    assert cli_main(["simulate", "--db", str(db), "--oracle", "length", "--annotators", "1", "--overlap", "1",
                     "--strategy", "information", "--rm-every", "3", "--rm-out", str(tmp_path / "rms"),
                     "--model", tiny_model_dir, "--rm-epochs", "1"]) == 0
    assert "2 reward models trained along the way" in capsys.readouterr().out
    with open_store(db) as store:
        served = [e["task_id"] for e in store.events() if e["kind"] in ("submit", "skip")]
        ranked = [e["task_id"] for e in store.events() if e["kind"] == "submit"]
    first_round = served[:served.index(ranked[2]) + 1]  # up to the third ranking: the random order
    rows = [RankedTask.from_dict(json.loads(line))
            for line in (tmp_path / "rms" / "round-1" / "data" / "rankings.jsonl").read_text().splitlines()]
    rm, tokenizer = load_reward_model(tmp_path / "rms" / "round-1" / "rm")
    open_tasks = [t for t in made if t.id not in ranked[:3]]
    _, order = information_order(rm, tokenizer, open_tasks, rows)
    # the second round: round 1's information order, less the tasks the annotator already skipped
    expected = [t for t in order if t not in first_round]
    assert served[len(first_round):len(first_round) + 3] == expected[:3]


def test_random_strategy_ranks_every_task_in_the_seeded_order(tmp_path, capsys):
    db = tmp_path / "labels.db"
    tasks = tmp_path / "tasks.jsonl"
    made = make_tasks(6, k=3)
    tasks.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in made))
    assert cli_main(["import", "--db", str(db), str(tasks)]) == 0
    assert cli_main(["simulate", "--db", str(db), "--oracle", "length", "--annotators", "1", "--overlap", "1",
                     "--strategy", "random", "--seed", "3"]) == 0
    with open_store(db) as store:
        ranked = [e["task_id"] for e in store.events() if e["kind"] in ("submit", "skip")]
    assert ranked == sorted((t.id for t in made), key=lambda t: random_key(3, t))
