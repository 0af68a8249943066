"""`rlhf ppo --algo grpo` on tiny models: the oracle and a reward model, the variants, learning."""

import csv
import json
import math

import pytest
import torch
from policy_helpers import PROMPTS

from pipeline.cli import main as cli_main
from policy import core
from policy.config import PPOConfig
from policy.roles import build_roles
from policy.rollout import reward_function, rollout
from policy.trainer import grpo_update, train_policy
from rlhf.errors import UserError
from rlhf.models import eos_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


GRPO_KEYS = ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/kl", "loss/total",
             "policy/approx_kl", "policy/clipfrac", "policy/ratio", "policy/epochs", "policy/advantage_std",
             "policy/zero_std_groups", "policy/entropy")


def test_cli_grpo_with_an_oracle(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "oracle"
    assert cli_main(["ppo", "--algo", "grpo", "--reward", "length", "--model", tiny_model_dir,
                     "--prompts", prompts_file, "--out", str(out), "--steps", "2", "--batch-size", "4",
                     "--grpo-k", "2", "--response-length", "5", "--eval-every", "0", "--eval-size", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["kl_coef"], config["kl_estimator"], config["ppo_epochs"]) == (0.04, "k3", 1)  # Shao et al.
    rows = _rows(out / "train_log.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    for key in GRPO_KEYS:
        assert math.isfinite(float(rows[-1][key])), key
    assert "loss/value" not in rows[-1] and "val/mean" not in rows[-1]
    assert float(rows[0]["policy/ratio"]) == pytest.approx(1.0)  # one on-policy step: pi_old = pi
    assert float(rows[0]["objective/kl"]) == pytest.approx(0.0, abs=1e-5)
    assert "objective/oracle" in _rows(out / "eval.csv")[0]
    assert json.loads((out / "policy" / "policy.json").read_text())["algo"] == "grpo"


def test_cli_grpo_with_a_reward_model_and_the_dr_grpo_variant(tiny_model_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "rm"
    assert cli_main(["ppo", "--algo", "grpo", "--rm", rm_dir, "--prompts", prompts_file, "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--grpo-k", "2", "--response-length", "5",
                     "--no-grpo-scale-rewards", "--grpo-loss-norm", "constant", "--ppo-epochs", "2",
                     "--minibatch-size", "2", "--micro-batch-size", "1", "--kl-estimator", "k2",
                     "--eval-every", "1", "--eval-size", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert not config["grpo_scale_rewards"] and config["grpo_loss_norm"] == "constant"
    rows = _rows(out / "train_log.csv")
    for key in GRPO_KEYS:
        assert math.isfinite(float(rows[-1][key])), key
    assert 1 <= int(rows[-1]["policy/epochs"]) <= 2
    evals = _rows(out / "eval.csv")
    assert [r["step"] for r in evals] == ["0", "1", "2"] and "objective/rm_score" in evals[0]


def test_grpo_config_errors(tiny_model_dir, prompts_file, tmp_path, capsys):
    with pytest.raises(UserError, match="multiple of --grpo-k"):
        PPOConfig(algo="grpo", reward="length", batch_size=6, grpo_k=4).check()
    with pytest.raises(UserError, match="grpo-loss-norm"):
        PPOConfig(algo="grpo", reward="length", grpo_loss_norm="mean").check()
    assert cli_main(["ppo", "--algo", "grpo", "--reward", "length", "--model", tiny_model_dir, "--prompts",
                     prompts_file, "--out", str(tmp_path / "x"), "--grpo-k", "1", "--batch-size", "4"]) == 2
    assert "--grpo-k" in capsys.readouterr().err


def test_on_policy_grpo_update_uses_the_rollouts_logprobs(tiny_model_dir):
    """The single-update path computes pi_old in the update's own forward pass: the same numbers as a
    rollout that computes them, and the same parameter change."""
    from accelerate import Accelerator

    config = PPOConfig(algo="grpo", reward="length", response_length=5, grpo_k=2, micro_batch_size=2, lr=1e-2)
    results = []
    for with_logprobs in (False, True):
        torch.manual_seed(0)
        roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=False)
        eos = eos_token_ids(roles.model, tokenizer)
        batch = rollout(roles, tokenizer, PROMPTS[:2], 2, config, reward_function(config, tokenizer), eos,
                        generator_seed=5, with_values=False, with_logprobs=with_logprobs)
        batch.scores = torch.tensor([1.0, 0.0, 0.2, 0.7])
        params = list(roles.parameters_of("actor").values())
        optimizer = torch.optim.Adam(params, lr=config.lr)
        update = grpo_update(roles, Accelerator(cpu=True), optimizer, batch, 0.04, config, 1)
        results.append((update.logprobs.clone(), update.entropy.clone(), [p.detach().clone() for p in params],
                        update.metrics))
    (lp0, ent0, p0, m0), (lp1, ent1, p1, m1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(ent0, ent1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p0, p1))
    assert m0["loss/policy"] == pytest.approx(m1["loss/policy"], abs=1e-5)
    expected_std = core.grpo_advantages(torch.tensor([1.0, 0.0, 0.2, 0.7]), 2, scale=False).std().item()
    assert m0["policy/advantage_std"] == pytest.approx(expected_std)
    # with several passes the rollout must provide pi_old
    with pytest.raises(ValueError, match="logprobs"):
        batch.logprobs = None
        grpo_update(roles, Accelerator(cpu=True), optimizer, batch, 0.04,
                    PPOConfig(algo="grpo", reward="length", grpo_k=2, ppo_epochs=2), 2)


def test_grpo_raises_a_toy_reward_with_finite_kl(peaked_model_dir, prompts_file, tmp_path):
    summary = train_policy(PPOConfig(
        model=peaked_model_dir, reward="policy_helpers:e_fraction", prompts=prompts_file, out=str(tmp_path / "grpo"),
        algo="grpo", steps=8, batch_size=16, grpo_k=4, response_length=8, lr=1e-2, kl_coef=0.01, eval_every=0,
        eval_fraction=0, eval_size=4, seed=0))
    scores = [float(r["objective/scores"]) for r in _rows(summary["train_log"])]
    assert len(scores) == 8
    assert summary["final"]["objective/oracle"] > summary["reference"]["objective/oracle"] + 0.2
    assert sum(scores[-3:]) / 3 > scores[0] + 0.2
    assert math.isfinite(summary["final"]["objective/kl"]) and summary["final"]["objective/kl"] < 50
