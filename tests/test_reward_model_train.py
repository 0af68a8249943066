"""Training the reward model end to end on a tiny model: learning, resume after a kill, NaN guard, CLI."""

import csv
import json
import random
from pathlib import Path

import pytest

from pipeline.cli import main
from reward_model import train as rmtrain
from reward_model.config import RewardTrainingConfig
from reward_model.train import train_reward_model
from rlhf.errors import UserError

WORDS = "sun sea sky tree fox bear moon star boat bird key snow".split()


def write_marker_rankings(path, n=40, test_from=32, k=4, seed=0):
    """Separable toy preference: the completion containing 'peppers' is ranked first, the rest tie."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            texts = [" ".join(rng.choices(WORDS, k=6)) for _ in range(k)]
            good = rng.randrange(k)
            texts[good] += " peppers"
            row = {"task_id": f"t{i}", "annotator": "ann", "prompt": f"Tell me about the {rng.choice(WORDS)} {i}.",
                   "completions": [{"id": f"c{j}", "text": t, "rank": 1 if j == good else 2}
                                   for j, t in enumerate(texts)]}
            if i >= test_from:
                row["split"] = "test"
            f.write(json.dumps(row) + "\n")
    return path


def read_log(out):
    with open(out / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_marker_rankings(tmp_path / "data" / "rankings.jsonl")
    return tmp_path / "data"


def test_learns_separable_preference(tiny_model_dir, data_dir, tmp_path):
    config = RewardTrainingConfig(data=str(data_dir), out=str(tmp_path / "rm"), model=tiny_model_dir,
                                  epochs=3, lr=3e-3, batch_rankings=8, checkpoint_every=0)
    summary = train_reward_model(config, progress=False)
    assert summary["train_rankings"] == 32 and summary["train_pairs"] == 32 * 3
    assert summary["steps"] == 3 * 4
    assert summary["test"]["pairs"] == 8 * 3
    assert summary["test_accuracy"] > 0.95
    # Normalisation: the stored bias makes the training completions' mean reward 0.
    from reward_model.data import DataStats, build_examples, find_data
    from reward_model.model import load_reward_model, score_texts
    rm, tok = load_reward_model(tmp_path / "rm")
    examples = build_examples(find_data(data_dir).train, DataStats())
    samples = {(ex.prompt, t) for ex in examples for t in ex.texts}
    rewards = score_texts(rm, tok, [p for p, _ in samples], [t for _, t in samples])
    assert sum(rewards) / len(rewards) == pytest.approx(0.0, abs=1e-4)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["reward_bias"] == pytest.approx(summary["reward_bias"])
    assert meta["training"]["per_prompt_mean_std"] >= 0 and meta["lora_r"] == config.lora_r == 16
    assert len(read_log(tmp_path / "rm")) == 12
    assert (tmp_path / "rm" / "train_curves.png").stat().st_size > 1000
    assert not (tmp_path / "rm" / "checkpoints").exists()


def test_resume_after_kill_continues_without_losing_steps(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    base = dict(data=str(data_dir), model=tiny_model_dir, epochs=1, lr=1e-3, batch_rankings=4,
                checkpoint_every=2)
    full = train_reward_model(RewardTrainingConfig(out=str(tmp_path / "full"), **base), progress=False)
    assert full["steps"] == 8

    real_loss, calls = rmtrain.ranking_loss, {"n": 0}

    def killed_at_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # the process dies in the middle of step 8
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(rmtrain, "ranking_loss", killed_at_step_8)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(RewardTrainingConfig(out=str(out), **base), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]  # last 2 kept
    assert [int(r["step"]) for r in read_log(out)] == list(range(1, 8))
    assert not (out / "reward_model.json").exists()

    monkeypatch.setattr(rmtrain, "ranking_loss", real_loss)
    with pytest.raises(UserError, match="--resume"):
        train_reward_model(RewardTrainingConfig(out=str(out), **base), progress=False)
    with pytest.raises(UserError, match="batch_rankings"):
        train_reward_model(RewardTrainingConfig(out=str(out), resume=True, **{**base, "batch_rankings": 8}),
                           progress=False)
    resumed = train_reward_model(RewardTrainingConfig(out=str(out), resume=True, **base), progress=False)
    rows, full_rows = read_log(out), read_log(tmp_path / "full")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # step 7 redone and logged once
    # Same data order and restored optimizer: the resumed run retraces the uninterrupted one.
    for a, b in zip(rows, full_rows):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-4)
    assert resumed["reward_bias"] == pytest.approx(full["reward_bias"], abs=1e-4)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    real_loss, calls = rmtrain.ranking_loss, {"n": 0}

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    monkeypatch.setattr(rmtrain, "ranking_loss", nan_at_step_5)
    out = tmp_path / "nan"
    config = RewardTrainingConfig(data=str(data_dir), out=str(out), model=tiny_model_dir, epochs=2,
                                  checkpoint_every=2)
    with pytest.raises(UserError, match=r"loss is nan at step 5.*checkpoints/step-4"):
        train_reward_model(config, progress=False)
    assert (out / "checkpoints" / "step-4" / "trainer_state.json").is_file()
    assert not (out / "reward_model.json").exists()


def test_cli_train_eval_score(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["train-rm", "--data", str(data_dir), "--out", str(out), "--model", tiny_model_dir,
                 "--epochs", "2", "--lr", "3e-3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 8 and "test" in summary

    # eval-rm on a pairs file with two annotators disagreeing on one comparison.
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Say hi.", "chosen": "sun peppers", "rejected": "sun sea", "annotator": "a"},
            {"prompt": "Say hi.", "chosen": "sun peppers", "rejected": "sun sea", "annotator": "b"},
            {"prompt": "Say hi.", "chosen": "sun sea", "rejected": "sun peppers", "annotator": "c"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval-rm", "--rm", str(out), "--data", str(pairs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 3 and result["multi_annotated_judgements"] == 1
    assert result["human_agreement"] == 0.0
    assert set(result) >= {"accuracy", "mean_margin", "ece", "by_rank_gap", "by_length", "reliability"}
    assert list(result["by_length"]) == ["same length"] and result["by_length"]["same length"]["pairs"] == 3
    assert result["longer_wins"] == 0.5 and list(result["by_rank_gap"]) == ["1 (adjacent)"]
    assert main(["eval-rm", "--rm", str(out), "--data", str(pairs)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy by rank gap" in printed and "calibration" in printed and "prefer the longer one" in printed

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Say hi.", "completion": "sun peppers"}) + "\n"
                      + json.dumps({"prompt": "Say hi.", "completion": "<script>alert(1)</script>"}) + "\n")
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--rm", str(out), "--input", str(inputs), "--out", str(scored)]) == 0
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [set(r) for r in lines] == [{"prompt", "completion", "reward"}] * 2
    assert lines[1]["completion"] == "<script>alert(1)</script>"
    assert lines[0]["reward"] > lines[1]["reward"]


def test_cli_bad_inputs(tiny_model_dir, tmp_path, capsys):
    assert main(["train-rm", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--model", tiny_model_dir]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "rankings.jsonl").write_text(json.dumps(
        {"prompt": "p", "completions": [{"text": "only one", "rank": 1}]}) + "\n")
    assert main(["train-rm", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err
    assert "rankings.jsonl:1:" in err and "at least 2" in err and len(err.strip().splitlines()) == 1
    write_marker_rankings(bad / "rankings.jsonl", n=4, test_from=99)
    assert main(["train-rm", "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "no-model")]) == 2
    assert "no-model" in capsys.readouterr().err
    assert main(["eval-rm", "--rm", str(tmp_path), "--data", str(bad / "rankings.jsonl")]) == 2
    assert "not a reward model directory" in capsys.readouterr().err
    assert main(["train-rm", "--data", str(bad), "--out", str(tmp_path / "o"), "--model", tiny_model_dir,
                 "--batch-rankings", "0"]) == 2
    assert "--batch-rankings must be >= 1" in capsys.readouterr().err
    bad_input = tmp_path / "in.jsonl"
    bad_input.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    assert main(["score", "--rm", str(tmp_path), "--input", str(bad_input)]) == 2
    assert "in.jsonl:2: 'completion' must be a string" in capsys.readouterr().err


def test_a_missing_model_folder_is_one_line_and_leaves_no_output_folder(data_dir, tmp_path, capsys):
    for model in (str(tmp_path / "no-model"), "./no-model", "models/sft/"):
        for command in (["train-rm"], ["dpo"]):
            out = tmp_path / "out"
            assert main([*command, "--data", str(data_dir), "--out", str(out), "--model", model]) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("dtype:", "WARNING"))]
            assert len(err) == 1 and f"the folder {Path(model).expanduser()} does not exist" in err[0], err
            assert not out.exists(), command


def test_a_pairs_file_without_a_test_split_says_it_has_no_held_out_evaluation(tiny_model_dir, tmp_path, caplog):
    write_marker_rankings(tmp_path / "train.jsonl", n=8, test_from=99)
    config = RewardTrainingConfig(data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "rm"), model=tiny_model_dir,
                                  epochs=1, batch_rankings=8, checkpoint_every=0)
    with caplog.at_level("WARNING"):
        summary = train_reward_model(config, progress=False)
    assert "test" not in summary
    said = [r.getMessage() for r in caplog.records if "no held-out" in r.getMessage()]
    assert said == [f"{tmp_path / 'train.jsonl'}: no held-out rankings or pairs (no test split, no rows marked "
                    "\"split\": \"test\"), so there is no held-out evaluation; `rlhf export` holds out a share of "
                    "the prompts"]


def test_readout_layer_is_checked_before_the_model_loads(tmp_path):
    for bad in (1.5, -1):
        with pytest.raises(UserError, match=f"--readout-layer must be .*got {bad}"):
            RewardTrainingConfig(data=str(tmp_path), out=str(tmp_path / "rm"), model="no-such-model",
                                 readout_layer=bad).check()
