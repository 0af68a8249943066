"""The preference data layer (reward_model/data.py): every source `datasets` reads (export folder, JSONL /
Parquet / CSV files in TRL's format, conversational rows, save_to_disk folders, hub ids), the checks that
give one clear line, tokenization through `Dataset.map` with its cache, and `rlhf train-rm` on each source."""

import json
import random
import time

import pytest

from pipeline.cli import main
from reward_model.data import DataStats, build_examples, find_data, read_records, tokenize_examples
from rlhf.errors import UserError
from rlhf.records import Pair, RankedTask

WORDS = "sun sea sky tree fox bear moon star boat bird key snow".split()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test its own `datasets` cache, so a test never reads rows another one cached."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def marker_pairs(n=24, seed=0):
    """Separable toy pairs: the chosen completion ends with 'peppers'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=5))
        rows.append({"prompt": f"Tell me about the {rng.choice(WORDS)} {i}.", "chosen": words + " peppers",
                     "rejected": words + " " + rng.choice(WORDS)})
    return rows


def conversational(row, implicit=False):
    """A text pair in TRL's conversational form (explicit prompt, or the prompt inside both conversations)."""
    user = [{"role": "user", "content": row["prompt"]}]
    chosen, rejected = ([{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected"))
    return {"chosen": user + chosen, "rejected": user + rejected} if implicit else \
        {"prompt": user, "chosen": chosen, "rejected": rejected}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def texts(records):
    return [(r.prompt, r.chosen, r.rejected) if isinstance(r, Pair) else (r.prompt, r.ranks) for r in records]


def test_parquet_csv_and_jsonl_pairs_read_the_same(tmp_path):
    import pandas as pd

    rows = marker_pairs(6)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    for name in ("pairs.jsonl", "pairs.parquet", "pairs.csv"):
        files = find_data(tmp_path / name)
        assert texts(files.train) == expected and files.test == [] and files.test_source is None, name
        assert files.train_source == str(tmp_path / name)


def test_conversational_rows_explicit_and_implicit_prompt(tmp_path):
    from rlhf.records import Message

    rows = marker_pairs(4)
    write_jsonl(tmp_path / "explicit.jsonl", [conversational(r) for r in rows])
    write_jsonl(tmp_path / "implicit.jsonl", [conversational(r, implicit=True) for r in rows])
    expected = [((Message("user", r["prompt"]),), r["chosen"], r["rejected"]) for r in rows]
    assert texts(find_data(tmp_path / "explicit.jsonl").train) == expected
    assert texts(find_data(tmp_path / "implicit.jsonl").train) == expected


def test_multi_turn_rows_keep_every_turn(tmp_path):
    from rlhf.records import Message

    chat = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"chosen": chat + [{"role": "assistant", "content": "c"}], "rejected": chat + [{"role": "assistant",
                                                                                        "content": "d"}]}])
    write_jsonl(tmp_path / "rankings.jsonl", [{"messages": chat, "completions": [{"text": "x", "rank": 2},
                                                                                {"text": "y", "rank": 1}]}])
    prompt = tuple(Message(m["role"], m["content"]) for m in chat)
    assert texts(find_data(tmp_path / "chat.jsonl").train) == [(prompt, "a", "b"), (prompt, "c", "d")]
    assert texts(find_data(tmp_path / "rankings.jsonl").train) == [(prompt, (2, 1))]


@pytest.mark.parametrize("row, message", [
    # the conversation does not end with the assistant's reply
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "and?"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]},
     "'chosen' ends in a user turn: it must end in the assistant's reply"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "'prompt' ends in a assistant turn: a conversation to continue must end in a user turn"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "critic", "content": "Hello"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "'prompt' message 2 has the unknown role 'critic'"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "b"}]},
     "'chosen' and 'rejected' differ before their last assistant turn"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"},
     "'prompt' must be a string when 'chosen' and 'rejected' are strings"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     "'chosen' message 1 (assistant) must have a 'content' string"),
])
def test_odd_conversations_are_one_clear_line(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n", encoding="utf-8")  # a blank first line: the row is line 2
    with pytest.raises(UserError) as info:
        find_data(path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_wrong_columns_empty_splits_and_unknown_split_are_named(tmp_path):
    import pandas as pd

    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(tmp_path / "qa.parquet")
    with pytest.raises(UserError, match=r"qa.parquet: neither rankings nor pairs .*; its columns: question, answer"):
        find_data(tmp_path / "qa.parquet")
    pd.DataFrame({"prompt": ["p"], "chosen": ["a"], "answer": ["b"]}).to_parquet(tmp_path / "half.parquet")
    with pytest.raises(UserError, match=r"half.parquet: missing column rejected \(.*\); its columns: prompt, "
                                        r"chosen, answer"):
        find_data(tmp_path / "half.parquet")
    pd.DataFrame({"chosen": ["a"], "rejected": ["b"]}).to_csv(tmp_path / "noprompt.csv", index=False)
    with pytest.raises(UserError, match="missing column prompt"):
        find_data(tmp_path / "noprompt.csv")

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty.jsonl: no rankings or pairs in split 'train'"):
        find_data(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "all-test.jsonl", [{**marker_pairs(1)[0], "split": "test"}])
    with pytest.raises(UserError, match="no rankings or pairs in split 'train'"):
        find_data(tmp_path / "all-test.jsonl")
    write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(2))
    with pytest.raises(UserError, match=r"has no split 'validation' \(its splits: train\)"):
        find_data(tmp_path / "pairs.jsonl", "validation")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        find_data(tmp_path / "pairs.txt")


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(marker_pairs(1)[0]) + "\n\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: not valid JSON"):
        find_data(path)


def test_save_to_disk_folder_splits_and_data_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = marker_pairs(6)
    DatasetDict({"train": Dataset.from_list(rows[:4]), "validation": Dataset.from_list(rows[4:5]),
                 "test": Dataset.from_list(rows[5:])}).save_to_disk(str(tmp_path / "saved"))
    files = find_data(tmp_path / "saved")
    assert len(files.train) == 4 and texts(files.test) == [(rows[5]["prompt"], rows[5]["chosen"], rows[5]["rejected"])]
    assert files.train_source == f"{tmp_path / 'saved'} [train]" and files.test_source == f"{tmp_path / 'saved'} [test]"
    files = find_data(tmp_path / "saved", "validation")
    assert len(files.train) == 1 and len(files.test) == 1
    with pytest.raises(UserError, match=r"has no split 'dev' \(its splits: train, validation, test\)"):
        find_data(tmp_path / "saved", "dev")
    assert len(read_records(tmp_path / "saved")) == 6 and len(read_records(tmp_path / "saved", "test")) == 1
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))  # a Dataset, not a DatasetDict: split "train"
    assert len(find_data(tmp_path / "one").train) == 6


def test_export_folder_rankings_dataset_and_jsonl_give_the_same_examples(tmp_path):
    from labeling_helpers import make_tasks, order_ranks

    from labeling.export import export
    from labeling.store import open_store

    with open_store(tmp_path / "labels.db") as store:
        tasks = make_tasks(8, k=3)
        store.import_tasks(tasks)
        for name in ("a", "b"):
            store.add_annotator(name)
        for task in tasks:
            store.submit_ranking("a", task.id, order_ranks(task, [0, 1, 2]))
        store.submit_ranking("b", tasks[0].id, {c.id: r for c, r in zip(tasks[0].completions, (1, 1, 2))})  # a tie
        export(store, tmp_path / "out", test_fraction=0.25)
    folder = find_data(tmp_path / "out")
    assert folder.train_source == str(tmp_path / "out" / "rankings.jsonl")
    assert all(isinstance(r, RankedTask) for r in folder.train)
    held_out = {json.loads(line)["task_id"] for line in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "test"}
    assert {r.task_id for r in folder.test} == held_out and len(folder.train) + len(folder.test) == 9
    for source in ("rankings_dataset", "rankings.parquet"):
        other = find_data(tmp_path / "out" / source)
        assert list(other.train) == list(folder.train) and list(other.test) == list(folder.test), source
    pairs = find_data(tmp_path / "out" / "pairs_dataset")
    assert list(pairs.train) == list(find_data(tmp_path / "out" / "train.jsonl").train)

    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    (tmp_path / "out" / "export.json").write_text(json.dumps({**meta, "format": "rlhf-export/2"}))
    with pytest.raises(UserError, match=r"written by another version of `rlhf export` \(format 'rlhf-export/2'\)"):
        find_data(tmp_path / "out")


def test_tokenization_is_a_cached_dataset_map(tmp_path, tiny_model_dir):
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(5))
    examples = build_examples(find_data(tmp_path / "pairs.jsonl").train, DataStats())
    tokenize_examples(examples, tokenizer, 64, DataStats())
    cached = sorted(p.name for p in (tmp_path / "hf-datasets").rglob("cache-*.arrow"))
    assert len(cached) == 2  # the checked rows and their tokens, beside the source's own cache

    again = build_examples(find_data(tmp_path / "pairs.jsonl").train, DataStats())
    tokenize_examples(again, tokenizer, 64, DataStats())
    assert sorted(p.name for p in (tmp_path / "hf-datasets").rglob("cache-*.arrow")) == cached  # read back
    assert [ex.rows for ex in again] == [ex.rows for ex in examples]
    loose = build_examples([Pair(r["prompt"], r["chosen"], r["rejected"]) for r in marker_pairs(5)], DataStats())
    tokenize_examples(loose, tokenizer, 64, DataStats())  # records made in memory: the same tokens
    assert [ex.rows for ex in loose] == [ex.rows for ex in examples]


def test_hub_id_offline_fails_fast_in_one_line(tmp_path, capsys):
    started = time.time()
    assert main(["train-rm", "--data", "someone/preferences", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - started < 10
    assert "'someone/preferences' is not a local file or folder, and the Hugging Face hub is not reachable" in err
    assert len(err.splitlines()) == 1


def test_train_rm_on_parquet_conversational_jsonl_and_save_to_disk(tiny_model_dir, tmp_path, capsys, one_thread):
    import pandas as pd
    from datasets import Dataset, DatasetDict

    rows = marker_pairs(16)
    pd.DataFrame(rows[:12]).to_parquet(tmp_path / "train.parquet")
    write_jsonl(tmp_path / "chat.jsonl", [{**conversational(r), "split": "test" if i >= 12 else "train"}
                                          for i, r in enumerate(rows)])
    DatasetDict({"train": Dataset.from_list(rows[:12]), "test": Dataset.from_list(rows[12:])}).save_to_disk(
        str(tmp_path / "saved"))
    for data, held_out, flags in (("train.parquet", 0, ["--dataset-num-proc", "2"]), ("chat.jsonl", 4, []),
                                  ("saved", 4, [])):
        out = tmp_path / f"rm-{data}"
        assert main(["train-rm", "--data", str(tmp_path / data), "--out", str(out), "--model", tiny_model_dir,
                     "--epochs", "1", "--batch-rankings", "6", "--checkpoint-every", "0", "--json", *flags]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["train_rankings"], summary["train_pairs"], summary["steps"]) == (12, 12, 2), data
        assert summary.get("test", {}).get("pairs", 0) == held_out, data
        assert (out / "reward_model.json").is_file()


def test_a_broken_json_line_is_our_one_line_only(tmp_path, capfd):
    """The JSON builder logs its own error before raising; only our line, naming the line, reaches the terminal."""
    (tmp_path / "broken.jsonl").write_text(json.dumps(marker_pairs(1)[0]) + "\n" + '{"prompt": "b", "chosen": "x"\n')
    assert main(["train-rm", "--data", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert [line for line in err if not line.startswith("dtype:")] == [
        f"rlhf train-rm: error: {tmp_path / 'broken.jsonl'}:2: not valid JSON (Expecting ',' delimiter)"]


def test_a_missing_data_folder_gets_one_message_with_or_without_its_trailing_slash(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    heads = []
    for data in ("nodata", "nodata/", "./nodata"):
        assert main(["train-rm", "--data", data, "--out", str(tmp_path / "o")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("dtype:")]
        assert len(err) == 1, err
        heads.append(err[0].split(":")[2].strip())
    assert heads == ["data nodata does not exist", "data nodata/ does not exist", "data ./nodata does not exist"]
