"""`--report-to`: the rows of the CSV run logs also reach the tracker (TensorBoard here, read back from its event
files), and a tracker whose package is missing is one clear line."""

import json
import random

import pandas as pd
import pytest

from pipeline.cli import main as cli_main
from policy.config import PPOConfig
from policy.trainer import train_policy
from reward_model.config import RewardTrainingConfig
from reward_model.train import train_reward_model


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_rows(scalars, tag: str, frame: pd.DataFrame, column: str) -> None:
    steps, values = zip(*scalars[tag])
    assert list(steps) == list(frame["step"]), tag
    assert list(values) == pytest.approx(list(frame[column]), rel=1e-6, abs=1e-7), tag  # stored as float32


def test_reward_model_log_reaches_tensorboard(tiny_model_dir, tmp_path, one_thread):
    rng = random.Random(0)
    with (tmp_path / "rankings.jsonl").open("w") as handle:
        for i in range(8):
            completions = [{"id": f"c{j}", "text": " ".join(rng.choices(["ab", "cd", "ef", "gh"], k=4)), "rank": j + 1}
                           for j in range(3)]
            handle.write(json.dumps({"task_id": f"t{i}", "annotator": "a", "prompt": f"Say something {i}.",
                                     "completions": completions}) + "\n")
    out = tmp_path / "rm"
    train_reward_model(RewardTrainingConfig(data=str(tmp_path / "rankings.jsonl"), out=str(out), model=tiny_model_dir,
                                            epochs=1, batch_rankings=4, checkpoint_every=0, dtype="float32",
                                            report_to="tensorboard"), progress=False)
    scalars = tensorboard_scalars(out / "tensorboard" / "rlhf-reward-model")
    log = pd.read_csv(out / "train_log.csv")
    assert len(log) == 2
    for column in ("loss", "accuracy", "margin", "grad_norm", "lr"):
        assert_same_rows(scalars, f"train/{column}", log, column)


def test_policy_logs_reach_tensorboard(tiny_model_dir, rm_dir, prompts_file, tmp_path, one_thread):
    out = tmp_path / "ppo"
    train_policy(PPOConfig(rm=rm_dir, prompts=prompts_file, out=str(out), steps=2, batch_size=2, response_length=4,
                           eval_every=1, eval_size=1, report_to="tensorboard"))
    scalars = tensorboard_scalars(out / "tensorboard" / "rlhf-policy")
    train, held_out = pd.read_csv(out / "train_log.csv"), pd.read_csv(out / "eval.csv")
    for column in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/entropy"):
        assert_same_rows(scalars, column, train, column)
    for column in ("objective/kl", "objective/rm_score", "eval/distinct_1"):
        assert_same_rows(scalars, f"held_out/{column}", held_out, column)
    assert [step for step, _ in scalars["held_out/objective/kl"]] == [0, 1, 2]


@pytest.mark.parametrize("command,tracker", [("train-rm", "wandb"), ("ppo", "trackio")])
def test_missing_tracker_package_is_one_clear_line(prompts_file, tmp_path, monkeypatch, capsys, command, tracker):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # as if not installed
    args = (["train-rm", "--data", str(tmp_path / "none.jsonl")] if command == "train-rm"
            else ["ppo", "--reward", "length", "--prompts", prompts_file])
    assert cli_main([*args, "--out", str(tmp_path / "out"), "--report-to", tracker]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhf {command}: error: --report-to {tracker}: the {tracker} package is not installed "
                   f"(pip install {tracker})")
