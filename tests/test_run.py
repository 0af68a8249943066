"""What every trainer runs in (rlhf/run.py) and the seeds it draws from (rlhf/seeds.py): the resume
rule, the checkpoints folder, the run logs, epoch batching, the prompt order, the learning-rate schedule. The
trainers' own resume tests (test_reward_model_train, test_policy_training, test_policy_dpo) run them end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from rlhf import seeds
from rlhf.checkpoint import save_checkpoint
from rlhf.errors import UserError
from rlhf.run import (
    CHECKPOINTS,
    OLD_CHECKPOINTS,
    EpochBatches,
    PromptSampler,
    epoch_order,
    has_checkpoint,
    lr_schedule,
    open_run,
    resume_settings,
    steps_per_epoch,
)


@dataclass
class _Config:
    lr: float = 0.1
    seed: int = 0
    steps: int = 3


def _checkpoint(folder, step=2, config=None, **extra):
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    return save_checkpoint(folder, step, {"weight": weight}, optimizer, config=config or {"lr": 0.1, "seed": 0},
                           **extra)


def test_a_fresh_run_and_the_resume_rule(tmp_path):
    out = tmp_path / "run"
    expected = resume_settings(_Config(), ("lr", "seed"), num_train_rankings=4)
    assert expected == {"num_train_rankings": 4, "lr": 0.1, "seed": 0}
    fresh = open_run(out, resume=False, expected=expected)
    assert fresh.resume_from is None and fresh.checkpoints == out / CHECKPOINTS and not out.exists()
    with pytest.raises(UserError, match="--resume: no checkpoint in .*checkpoints; run without --resume"):
        open_run(out, resume=True, expected=expected)

    _checkpoint(out / CHECKPOINTS, num_train_rankings=4)
    assert has_checkpoint(out)
    with pytest.raises(UserError, match="already holds checkpoints of an unfinished run: pass --resume"):
        open_run(out, resume=False, expected=expected)
    with pytest.raises(UserError, match="it was made with lr=0.1, this run has lr=0.2"):
        open_run(out, resume=True, expected={**expected, "lr": 0.2})
    with pytest.raises(UserError, match="num_train_rankings=4, this run has num_train_rankings=5"):
        open_run(out, resume=True, expected={**expected, "num_train_rankings": 5})
    resumed = open_run(out, resume=True, expected=expected)
    assert resumed.resume_from == out / CHECKPOINTS / "step-2"


def test_an_old_runs_checkpoint_folder_is_resumed_from_and_the_next_checkpoints_go_to_the_new_one(tmp_path):
    out = tmp_path / "old"
    _checkpoint(out / OLD_CHECKPOINTS, step=3)
    assert has_checkpoint(out)
    with pytest.raises(UserError, match="already holds checkpoints"):
        open_run(out, resume=False, expected={})
    run = open_run(out, resume=True, expected={"lr": 0.1})
    assert run.resume_from == out / OLD_CHECKPOINTS / "step-3" and run.checkpoints == out / CHECKPOINTS
    _checkpoint(run.checkpoints, step=4)
    assert open_run(out, resume=True, expected={"lr": 0.1}).resume_from == out / CHECKPOINTS / "step-4"


def test_restore_saves_and_logs_resume_at_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    fresh = open_run(out, resume=False, expected={})
    assert fresh.restore({"weight": weight}, optimizer) == {"step": 0}
    log = fresh.log("train_log.csv", 0)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step})
    with torch.no_grad():
        weight.fill_(7.0)
    fresh.save_checkpoint(2, {"weight": weight}, optimizer, config={"seed": 0}, keep=1, extra_fact=5)
    assert json.loads(fresh.save_config(_Config()).read_text()) == {"lr": 0.1, "seed": 0, "steps": 3}

    resumed = open_run(out, resume=True, expected={"seed": 0})
    with torch.no_grad():
        weight.zero_()
    state = resumed.restore({"weight": weight}, optimizer)
    assert state["step"] == 2 and state["extra_fact"] == 5 and weight.tolist() == [7.0, 7.0]
    assert [row["step"] for row in resumed.log("train_log.csv", state["step"]).rows] == [1, 2]  # step 3 is redone
    assert fresh.log("train_log.csv", 0).rows == []  # a fresh run starts its log afresh
    resumed.drop_checkpoints()
    assert not has_checkpoint(out)


def test_seeds_keep_the_formulas_of_their_streams():
    """seed * stream + index: the same numbers the trainers mixed by hand, so every figure stays as it was."""
    assert seeds.derived_seed(3, 2, seeds.EPOCH_ORDER) == 3 * 100_003 + 2
    assert seeds.derived_seed(3, 2, seeds.PROMPT_ORDER) == 3 * 7919 + 2
    assert seeds.derived_seed(3, 2, seeds.MINIBATCH_ORDER) == 3 * 104_729 + 2
    assert seeds.derived_seed(seeds.derived_seed(3, 5, seeds.SAMPLING), 1, 2) == (3 * 1_000_003 + 5) * 2 + 1
    assert seeds.derived_seed(3, seeds.EVAL_SAMPLES + 16, seeds.SAMPLING) == 3 * 1_000_003 + 99_991 + 16
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3 * 100_003 + 1))
    assert torch.equal(torch.randperm(20, generator=seeds.seeded_generator(3, 1, seeds.EPOCH_ORDER)), expected)


def test_epoch_order_is_reproducible_and_differs_by_epoch():
    assert epoch_order(20, 3, 0) == epoch_order(20, 3, 0)
    assert epoch_order(20, 3, 0) != epoch_order(20, 3, 1)
    assert sorted(epoch_order(20, 3, 1)) == list(range(20))


def test_epoch_batches_take_each_example_once_per_epoch():
    batches = EpochBatches(10, 4, seed=1)
    assert batches.steps_per_epoch == steps_per_epoch(10, 4) == 3
    steps = [batches.at(step) for step in range(6)]
    assert [(epoch, within) for epoch, within, _ in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [len(ids) for _, _, ids in steps] == [4, 4, 2, 4, 4, 2]  # the last step takes what is left
    for epoch in (0, 1):
        ids = [i for e, _, step_ids in steps if e == epoch for i in step_ids]
        assert ids == epoch_order(10, 1, epoch)
    assert EpochBatches(10, 4, seed=1).at(4) == steps[4]  # a resumed run starts mid-epoch on the same ids


def test_prompt_order_is_a_function_of_seed_and_step():
    sampler = PromptSampler([f"p{i}" for i in range(5)], seed=0)
    first_pass = sampler.batch(0, 5)
    assert sorted(first_pass) == [f"p{i}" for i in range(5)]  # every prompt once per pass
    assert sampler.batch(3, 2) == PromptSampler([f"p{i}" for i in range(5)], seed=0).batch(3, 2)


def test_prompts_are_shared_out_between_processes():
    sampler = PromptSampler([f"p{i}" for i in range(10)], seed=3)
    for step in range(4):
        whole = sampler.batch(step, 6)
        assert sampler.batch(step, 3, rank=0, world=2) + sampler.batch(step, 3, rank=1, world=2) == whole


def _todays_lr_factor(step, total_steps, final_fraction):
    """The hand-written schedule reward_model/train.py used before transformers' (kept here as the reference)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total_steps,final_fraction", [(12, 0.1), (1, 0.1), (7, 0.0), (50, 0.25), (3, 1.0)])
def test_learning_rate_per_step_is_the_cosine_decay_to_a_floor(total_steps, final_fraction):
    """Cosine decay from the peak to final_fraction of it over the run (InstructGPT appendix C.2), no
    warm-up: the learning rate of every step, both parameter groups, bit for bit as before."""
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [body], "lr": 3e-4}, {"params": [head], "lr": 9e-3}])
    scheduler = lr_schedule(optimizer, total_steps, final_fraction)
    for step in range(total_steps + 1):
        factor = _todays_lr_factor(step, total_steps, final_fraction)
        assert scheduler.get_last_lr() == [3e-4 * factor, 9e-3 * factor], step
        optimizer.step()
        scheduler.step()
