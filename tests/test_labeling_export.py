import json

import pytest
from labeling_helpers import make_tasks, order_ranks

from labeling.export import export, majority_pairs
from labeling.store import open_store
from rlhf.errors import UserError
from rlhf.prompts import split_by_prompt
from rlhf.records import Pair, RankedCompletion, RankedTask, Task


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def filled(tmp_path):
    """10 tasks of K=3 ranked by a and b (strict: 3 pairs each), plus task-0 tied by c ([1,1,2]: 2 pairs)."""
    store = open_store(tmp_path / "labels.db")
    tasks = make_tasks(10, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b", "c"):
        store.add_annotator(name)
    for task in tasks:
        store.submit_ranking("a", task.id, order_ranks(task, [0, 1, 2]))
        store.submit_ranking("b", task.id, order_ranks(task, [2, 1, 0]))
    store.submit_ranking("c", "task-0", {"task-0-0": 1, "task-0-1": 1, "task-0-2": 2})
    yield store, tasks
    store.close()


def test_export_counts_split_by_prompt_and_files(filled, tmp_path):
    store, tasks = filled
    out = tmp_path / "out"
    summary = export(store, out, test_fraction=0.2, seed=3)
    assert summary["rankings"] == 21
    assert (summary["train_prompts"], summary["test_prompts"]) == (8, 2)
    assert summary["train_pairs"] + summary["test_pairs"] == 10 * 2 * 3 + 2

    train, test, rankings = (read_jsonl(out / f"{n}.jsonl") for n in ("train", "test", "rankings"))
    assert len(train) == summary["train_pairs"] and len(test) == summary["test_pairs"]
    train_prompts, test_prompts = {p["prompt"] for p in train}, {p["prompt"] for p in test}
    assert len(test_prompts) == 2 and train_prompts.isdisjoint(test_prompts)
    assert test_prompts == split_by_prompt({t.prompt for t in tasks}, 0.2, 3)
    expected_test = sum(6 + (2 if t.id == "task-0" else 0) for t in tasks if t.prompt in test_prompts)
    assert len(test) == expected_test
    assert set(train[0]) == {"prompt", "chosen", "rejected", "task_id", "annotator", "rank_chosen", "rank_rejected"}
    assert all(Pair.from_dict(p).rank_chosen < p["rank_rejected"] for p in train + test)

    # rankings.jsonl: every ranking once, with the same prompt split as the pairs; RankedTask reads it back
    assert len(rankings) == 21
    for row in rankings:
        assert row["split"] == ("test" if row["prompt"] in test_prompts else "train")
        RankedTask.from_dict(row)
    tied = [r for r in rankings if r["annotator"] == "c"]
    assert [c["rank"] for c in tied[0]["completions"]] == [1, 1, 2]

    import pyarrow.parquet as pq
    for name, rows in (("train", train), ("test", test), ("rankings", rankings)):
        table = pq.read_table(out / f"{name}.parquet")
        assert table.to_pylist() == rows
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_datasets_reads_the_exported_files(filled, tmp_path):
    store, _ = filled
    out = tmp_path / "out"
    summary = export(store, out, test_fraction=0.2)
    import datasets

    cache = str(tmp_path / "hf-cache")
    ds = datasets.load_dataset("json", data_files={"train": str(out / "train.jsonl"), "test": str(out / "test.jsonl")},
                               cache_dir=cache)
    assert ds["train"].num_rows == summary["train_pairs"] and ds["test"].num_rows == summary["test_pairs"]
    assert {"prompt", "chosen", "rejected"} <= set(ds["train"].column_names)
    pq_ds = datasets.load_dataset("parquet", data_files={"train": str(out / "train.parquet")}, cache_dir=cache)
    assert pq_ds["train"].num_rows == summary["train_pairs"]
    rankings = datasets.load_dataset("json", data_files=str(out / "rankings.jsonl"), cache_dir=cache)["train"]
    assert rankings.num_rows == 21 and set(rankings.unique("split")) == {"train", "test"}


def test_same_prompt_in_two_tasks_lands_in_one_split(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        tasks = make_tasks(6, k=2)
        twin = Task.from_dict({"id": "twin", "prompt": tasks[0].prompt, "completions": ["x", "y"]})
        store.import_tasks(tasks + [twin])
        store.add_annotator("a")
        for task in tasks + [twin]:
            store.submit_ranking("a", task.id, order_ranks(task, [1, 0]))
        for seed in range(6):
            export(store, tmp_path / "out", test_fraction=0.5, seed=seed)
            train = {p["prompt"] for p in read_jsonl(tmp_path / "out" / "train.jsonl")}
            test = {p["prompt"] for p in read_jsonl(tmp_path / "out" / "test.jsonl")}
            assert train.isdisjoint(test) and len(train | test) == 6 and len(test) == 3


def test_majority_keeps_agreed_pairs_and_drops_contradicted(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        tasks = make_tasks(2, k=3)
        store.import_tasks(tasks)
        for name in ("a", "b", "c"):
            store.add_annotator(name)
        t0, t1 = tasks
        # task-0: a and b disagree only on (0, 1): that pair is dropped, (0, 2) and (1, 2) kept
        store.submit_ranking("a", t0.id, order_ranks(t0, [0, 1, 2]))
        store.submit_ranking("b", t0.id, order_ranks(t0, [1, 0, 2]))
        # task-1: 2 of 3 say 0 > 1 > 2, c says the reverse: all three pairs kept, oriented by the majority
        store.submit_ranking("a", t1.id, order_ranks(t1, [0, 1, 2]))
        store.submit_ranking("b", t1.id, order_ranks(t1, [0, 1, 2]))
        store.submit_ranking("c", t1.id, order_ranks(t1, [2, 1, 0]))
        summary = export(store, tmp_path / "out", test_fraction=0.0, aggregate="majority")
        assert summary["dropped_contradicted"] == 1
        assert (summary["train_pairs"], summary["test_pairs"]) == (5, 0)
        pairs = read_jsonl(tmp_path / "out" / "train.jsonl")
        text = {c.id: c.text for t in tasks for c in t.completions}
        got = {(p["task_id"], p["chosen"], p["rejected"]) for p in pairs}
        assert got == {
            ("task-0", text["task-0-0"], text["task-0-2"]), ("task-0", text["task-0-1"], text["task-0-2"]),
            ("task-1", text["task-1-0"], text["task-1-1"]), ("task-1", text["task-1-0"], text["task-1-2"]),
            ("task-1", text["task-1-1"], text["task-1-2"]),
        }
        assert all(p["annotator"] == "majority" for p in pairs)
        assert read_jsonl(tmp_path / "out" / "test.jsonl") == []
        import pyarrow.parquet as pq
        assert pq.read_table(tmp_path / "out" / "test.parquet").num_rows == 0
        # default aggregation keeps every annotator's pairs: 2*3 + 3*3
        assert export(store, tmp_path / "all", test_fraction=0.0)["train_pairs"] == 15


def test_majority_pairs_with_ties():
    def r(ranks, who):
        return RankedTask("t", who, "p", tuple(RankedCompletion(i, i.upper(), r) for i, r in zip("xyz", ranks)))
    pairs, dropped = majority_pairs([r([1, 1, 2], "a"), r([2, 1, 3], "b")])
    # (x,y): a ties, b says y > x -> y wins 1-0; (x,z), (y,z): both say x,y > z
    assert dropped == 0
    assert {(p.chosen, p.rejected) for p in pairs} == {("Y", "X"), ("X", "Z"), ("Y", "Z")}


def test_export_rejects_bad_options(filled, tmp_path):
    store, _ = filled
    with pytest.raises(UserError, match="test-fraction"):
        export(store, tmp_path / "o", test_fraction=1.0)
    with pytest.raises(UserError, match="aggregate"):
        export(store, tmp_path / "o", aggregate="mean")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        export(store, tmp_path / "file")


def test_split_by_prompt_is_deterministic_and_bounded():
    prompts = [f"p{i}" for i in range(20)]
    assert split_by_prompt(prompts, 0.1, 0) == split_by_prompt(list(reversed(prompts)), 0.1, 0)
    assert len(split_by_prompt(prompts, 0.1, 0)) == 2
    assert split_by_prompt(prompts, 0.1, 0) != split_by_prompt(prompts, 0.1, 1)
    assert len(split_by_prompt(["a", "b"], 0.01, 0)) == 1  # a non-zero fraction holds out at least one prompt
    assert split_by_prompt(["a"], 0.5, 0) == set()          # ... but never every prompt
    assert split_by_prompt(prompts, 0.0, 0) == set()


def test_export_json_names_its_files_relative_to_the_export_folder(filled, tmp_path, monkeypatch):
    """Written from anywhere, read from anywhere: the folder can be moved and its export.json still holds."""
    store, _ = filled
    monkeypatch.chdir(tmp_path)
    summary = export(store, "runs/pairs", test_fraction=0.2, seed=3)
    assert summary["files"]["train"] == ["runs/pairs/train.jsonl", "runs/pairs/train.parquet"]
    files = json.loads((tmp_path / "runs" / "pairs" / "export.json").read_text())["files"]
    assert files == {"rankings": ["rankings.jsonl", "rankings.parquet"], "train": ["train.jsonl", "train.parquet"],
                     "test": ["test.jsonl", "test.parquet"], "datasets": ["pairs_dataset", "rankings_dataset"],
                     "meta": "export.json"}
    assert all((tmp_path / "runs" / "pairs" / name).exists() for names in files.values()
               for name in ([names] if isinstance(names, str) else names))


def test_export_writes_datasets_that_load_from_disk(filled, tmp_path):
    import subprocess
    import sys

    from datasets import load_from_disk

    store, _ = filled
    out = tmp_path / "out"
    summary = export(store, out, test_fraction=0.2, seed=3)
    pairs, rankings = load_from_disk(str(out / "pairs_dataset")), load_from_disk(str(out / "rankings_dataset"))
    for split in ("train", "test"):
        assert pairs[split].to_list() == read_jsonl(out / f"{split}.jsonl")
        assert rankings[split].to_list() == [{k: v for k, v in row.items() if k != "split"}
                                             for row in read_jsonl(out / "rankings.jsonl") if row["split"] == split]
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "rlhf-export/1" and meta["train_pairs"] == summary["train_pairs"]
    assert summary["files"]["datasets"] == [str(out / "pairs_dataset"), str(out / "rankings_dataset")]
    script = (f"from datasets import load_from_disk; d = load_from_disk({str(out / 'pairs_dataset')!r}); "
              f"print(d['train'].num_rows, d['test'].num_rows, d['train'][0]['chosen'] != '')")
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert printed.split() == [str(summary["train_pairs"]), str(summary["test_pairs"]), "True"]

    export(store, out, test_fraction=0.0)  # again, over the earlier export: no held-out split, no empty one
    assert list(load_from_disk(str(out / "pairs_dataset"))) == ["train"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_push_to_hub_pushes_both_datasets_or_says_why_not(filled, tmp_path, capsys, monkeypatch):
    import datasets

    import rlhf.models
    from pipeline.cli import main

    store, _ = filled
    pushed = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, config_name="default", **kw: pushed.append((repo, config_name, list(self))))
    monkeypatch.setattr(rlhf.models, "hub_reachable", lambda: True)
    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    assert main(["export", "--db", db, "--out", str(out), "--test-fraction", "0.2", "--push-to-hub", "me/prefs"]) == 0
    assert "pushed to the hub dataset me/prefs" in capsys.readouterr().out
    assert pushed == [("me/prefs", "default", ["train", "test"]), ("me/prefs", "rankings", ["train", "test"])]

    monkeypatch.setattr(rlhf.models, "hub_reachable", lambda: False)
    assert main(["export", "--db", db, "--out", str(tmp_path / "o2"), "--push-to-hub", "me/prefs"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot push to 'me/prefs': the Hugging Face hub is not reachable" in err and len(err.splitlines()) == 1
    assert (tmp_path / "o2" / "pairs_dataset").is_dir()  # the local export is written first


def test_conversations_export_in_trl_conversational_and_flat_text_form(tmp_path):
    from datasets import load_from_disk

    from reward_model.data import find_data
    from rlhf.records import Message, Task

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "A colour?"}]
    tasks = [Task.from_dict({"id": f"c{i}", "messages": chat[:3] + [{"role": "user", "content": f"Colour {i}?"}],
                             "completions": [f"Red {i}", f"Blue {i}", f"Green {i}"]}) for i in range(4)]
    tasks.append(Task.from_dict({"id": "plain", "prompt": "Name a fruit.", "completions": ["Apple", "Stone"]}))
    with open_store(str(tmp_path / "l.db")) as store:
        store.import_tasks(tasks)
        store.add_annotator("ann")
        for task in tasks:
            store.submit_ranking("ann", task.id, {c.id: n + 1 for n, c in enumerate(task.completions)})
        summary = export(store, tmp_path / "out", test_fraction=0.2, seed=0)
    out = tmp_path / "out"
    assert summary["conversational"] and summary["train_pairs"] + summary["test_pairs"] == 4 * 3 + 1
    rows = [json.loads(line) for name in ("train", "test") for line in (out / f"{name}.jsonl").open()]
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task_id"], r)  # each task's first pair: its best against its second
    assert by_task["c1"]["prompt"] == chat[:3] + [{"role": "user", "content": "Colour 1?"}]
    assert by_task["c1"]["chosen"] == [{"role": "assistant", "content": "Red 1"}]
    assert by_task["plain"]["prompt"] == [{"role": "user", "content": "Name a fruit."}]  # one type per column
    pairs, text = load_from_disk(str(out / "pairs_dataset")), load_from_disk(str(out / "pairs_text_dataset"))
    assert sorted(pairs) == sorted(text) == ["test", "train"]
    flat = {}
    for r in (r for split in text.values() for r in split):
        flat.setdefault(r["task_id"], r)
    assert flat["c1"]["prompt"] == ("\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Colour 1?"
                                   "\n\nAssistant:")
    assert (flat["c1"]["chosen"], flat["plain"]["prompt"]) == ("Red 1", "\n\nHuman: Name a fruit.\n\nAssistant:")
    conv = [r for split in pairs.values() for r in split if r["task_id"] == "c2"]
    assert [r["rejected"] for r in conv] == [[{"role": "assistant", "content": t}] for t in ("Blue 2", "Green 2",
                                                                                          "Green 2")]
    # every form reads back as the same conversations
    for source in (out, out / "pairs_dataset", out / "rankings_dataset"):
        files = find_data(source)
        prompts = {r.prompt for r in files.train + files.test}
        assert (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                Message("user", "Colour 3?")) in prompts and len(prompts) == 5, source
