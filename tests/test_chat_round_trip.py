"""A 3-turn conversation end to end, as a user runs it: HH-RLHF transcripts -> `rlhf import` -> the app's task
JSON -> rankings through the app's handlers -> `rlhf export` -> `rlhf train-rm` and `rlhf dpo` on a tiny model ->
`rlhf score` and `rlhf eval-rm` on conversations."""

import json
import math

import pytest
from test_reward_model_data import write_jsonl

from labeling import handlers
from labeling.auth import add_annotator
from labeling.store import open_store
from pipeline.cli import main
from rlhf.records import parse_prompt

TOPICS = ["the sea", "the moon", "a fox", "a key", "the beach", "a bear", "peppers", "a tree", "birds", "boats",
          "the snow", "a poem"]


def transcript_row(i, topic):
    history = (f"\n\nHuman: Tell me about {topic}.\n\nAssistant: It is lovely, {i}."
               f"\n\nHuman: Say more about {topic}, please.\n\nAssistant:")
    return {"chosen": history + f" {topic} sings softly by the silver sea {i}.",
            "rejected": history + f" no {i}."}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_a_three_turn_conversation_goes_from_import_to_score(tiny_model_dir, tmp_path, capsys, one_thread):
    write_jsonl(tmp_path / "chats.jsonl", [transcript_row(i, t) for i, t in enumerate(TOPICS)])
    db = str(tmp_path / "labels.db")
    assert main(["import", "--db", db, str(tmp_path / "chats.jsonl")]) == 0
    assert "imported 12 tasks" in capsys.readouterr().out

    settings = handlers.AppSettings(overlap=1, guidelines_html="", admins=frozenset())
    with open_store(db) as store:
        add_annotator(store, "ann", "correct horse")
        for _ in TOPICS:
            task = json.loads(json.dumps(handlers.next_task(store, "ann", settings)["task"]))  # as the page gets it
            assert [m["role"] for m in task["prompt"]] == ["user", "assistant", "user"]
            assert task["prompt"][2]["content"].startswith("Say more about")
            ranks = {c["id"]: 1 if "sings softly" in c["text"] else 2 for c in task["completions"]}
            handlers.submit_ranking(store, "ann", settings, {"task_id": task["id"], "ranks": ranks,
                                                             "request_id": f"r-{task['id']}"})
        assert handlers.next_task(store, "ann", settings)["task"] is None

    export = tmp_path / "export"
    assert main(["export", "--db", db, "--out", str(export), "--test-fraction", "0.25"]) == 0
    capsys.readouterr()
    row = json.loads((export / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["chosen"][0]["role"] == "assistant" and "sings softly" in row["chosen"][0]["content"]

    rm = tmp_path / "rm"
    assert main(["train-rm", "--data", str(export), "--out", str(rm), "--model", tiny_model_dir, "--epochs", "2",
                 "--lr", "3e-3", "--batch-rankings", "3", "--checkpoint-every", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_pairs"] == 9 and summary["test"]["pairs"] == 3

    dpo = tmp_path / "dpo"
    assert main(["dpo", "--data", str(export), "--out", str(dpo), "--model", tiny_model_dir, "--rm", str(rm),
                 "--batch-rankings", "3", "--epochs", "1", "--response-length", "6", "--lora-r", "4",
                 "--lora-alpha", "8"]) == 0
    capsys.readouterr()
    steps = (dpo / "train_log.csv").read_text().splitlines()[1:]
    assert len(steps) == 3
    samples = [json.loads(line) for line in (dpo / "samples.jsonl").read_text().splitlines()]
    assert samples and [m["role"] for m in samples[0]["prompt"]] == ["user", "assistant", "user"]

    chat = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": "It is lovely."},
            {"role": "user", "content": "Say more about the sea, please."}]
    write_jsonl(tmp_path / "in.jsonl", [{"messages": chat, "completion": "the sea sings softly."},
                                        {"prompt": chat, "completion": "no."}])
    assert main(["score", "--rm", str(rm), "--input", str(tmp_path / "in.jsonl"), "--out",
                 str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in scored] == [chat, chat] and all(math.isfinite(r["reward"]) for r in scored)

    from reward_model.model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(rm)  # the same reward from Python, on the parsed conversation
    direct = score_texts(model, tokenizer, [parse_prompt(chat)] * 2, ["the sea sings softly.", "no."],
                         max_length=model.meta["max_length"])
    assert direct == pytest.approx([r["reward"] for r in scored], abs=1e-5)

    assert main(["eval-rm", "--rm", str(rm), "--data", str(export), "--data-split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test"]["accuracy"]


def test_generate_and_ppo_continue_conversations(tiny_model_dir, rm_dir, tmp_path, capsys, one_thread):
    chats = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Tell me about {t}."},
              {"role": "assistant", "content": "Gladly."}, {"role": "user", "content": "More, please."}]
             for t in TOPICS[:4]]
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"c{i}", "messages": chat} for i, chat in enumerate(chats)])
    tasks = tmp_path / "tasks.jsonl"
    assert main(["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "--k", "2", "--out", str(tasks),
                 "--model", tiny_model_dir, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in tasks.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == chats and all(len(r["completions"]) == 2 for r in rows)

    out = tmp_path / "ppo"
    assert main(["ppo", "--rm", rm_dir, "--prompts", str(tmp_path / "prompts.jsonl"), "--model", tiny_model_dir,
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--response-length", "4",
                 "--eval-every", "0", "--eval-size", "1"]) == 0
    capsys.readouterr()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["prompt"] in chats and math.isfinite(samples[0]["policy"]["reward"])
