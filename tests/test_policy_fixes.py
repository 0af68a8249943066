"""Correctness of the policy stage on tiny models: role switching, early stopping, the logged metrics,
RLOO's reward, roles without a critic, the missing-EOS penalty."""

import logging
import math

import pytest
import torch
from policy_helpers import PROMPTS

from pipeline.cli import main as cli_main
from policy import core, trainer
from policy.config import PPOConfig
from policy.roles import ACTOR, CRITIC, REWARD, build_roles
from policy.rollout import reward_function, rollout
from policy.trainer import ppo_update, rloo_update, train_policy
from rlhf.errors import UserError
from rlhf.models import eos_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

def _move_actor(roles, seed=0, std=0.3):
    """Make the actor differ from the reference (a fresh LoRA is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in roles.parameters_of(ACTOR).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def test_activate_reselects_the_actor_and_restores_requires_grad_even_on_error(tiny_model_dir, rm_dir):
    roles, _ = build_roles(tiny_model_dir, rm_dir, lora_r=4, lora_alpha=8)
    _move_actor(roles)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        actor_logits = roles.response_logits(ACTOR, ids, mask, 3)
        roles.values(ids, mask, 3)  # the critic was active last
        assert roles.model.active_adapter == ACTOR
        # a forward outside any role's block (as `generate` under `actor()`) runs the actor
        plain = roles.model(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
    assert torch.allclose(plain, actor_logits, atol=1e-5)

    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="boom"):
        with roles._activate(REWARD):
            assert any(p.requires_grad for p in roles.parameters_of(REWARD).values())  # peft's doing
            raise RuntimeError("boom")
    assert roles.model.active_adapter == ACTOR
    assert {n for n, p in roles.named_parameters() if p.requires_grad} == trainable == set(roles._trainable)
    assert not any(p.requires_grad for p in roles.parameters_of(REWARD).values())
    with pytest.raises(RuntimeError, match="boom"):
        with roles.reference:
            raise RuntimeError("boom")
    with torch.no_grad():
        again = roles.model(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
    assert torch.allclose(again, actor_logits, atol=1e-5)  # adapters enabled again


class _CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, *args, **kwargs):
        type(self).steps += 1
        return super().step(*args, **kwargs)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_stop_kl_measures_the_current_policy_before_each_step(tiny_model_dir, algo):
    """One minibatch, four epochs, a tiny stop_kl: the first step moves the policy, so the KL measured
    in the second epoch's forward pass is above it and no second step is taken."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = PPOConfig(algo=algo, reward="length", response_length=6, ppo_epochs=4, stop_kl=1e-6, lr=5e-2,
                       grpo_k=2, micro_batch_size=4)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=algo == "ppo")
    eos = eos_token_ids(roles.model, tokenizer)
    batch = rollout(roles, tokenizer, PROMPTS[:2], 2, config, reward_function(config, tokenizer), eos,
                    generator_seed=3, with_values=algo == "ppo")
    batch.scores = torch.tensor([0.0, 1.0, 2.0, 0.5])  # distinct rewards in every group
    _CountingAdam.steps = 0
    optimizer = _CountingAdam(roles.trainable_parameters(), lr=config.lr)
    update = ppo_update if algo == "ppo" else trainer.grpo_update
    result = update(roles, Accelerator(cpu=True), optimizer, batch, 0.05, config, 1)
    metrics = result.metrics
    assert result.skipped == 0
    assert _CountingAdam.steps == 1 and metrics["policy/epochs"] == 1
    assert metrics["policy/approx_kl"] > 0  # the stopping measurement is logged
    config.stop_kl = None
    _CountingAdam.steps = 0
    metrics = update(roles, Accelerator(cpu=True), optimizer, batch, 0.05, config, 2).metrics
    assert _CountingAdam.steps == 4 and metrics["policy/epochs"] == 4


def test_ppo_logs_the_advantage_spread_before_whitening(tiny_model_dir):
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = PPOConfig(reward="length", response_length=5, ppo_epochs=1)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8)
    eos = eos_token_ids(roles.model, tokenizer)
    batch = rollout(roles, tokenizer, PROMPTS, 1, config, reward_function(config, tokenizer), eos,
                    generator_seed=1, with_values=True)
    kl = core.kl_estimate(batch.logprobs, batch.ref_logprobs, "k1")
    rewards = core.per_token_rewards(batch.scores, kl, batch.mask, 0.05)
    advantages, _ = core.compute_gae(rewards, batch.values, batch.mask, config.gamma, config.lam)
    expected = core.masked_var(advantages, batch.mask).sqrt().item()
    optimizer = torch.optim.Adam(roles.trainable_parameters(), lr=1e-3)
    metrics = ppo_update(roles, Accelerator(cpu=True), optimizer, batch, 0.05, config, 1).metrics
    assert metrics["policy/advantage_std"] == pytest.approx(expected, rel=1e-5) and expected > 0


def test_rloo_reward_is_score_minus_beta_sum_of_k1(tiny_model_dir):
    from accelerate import Accelerator

    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=False)
    _move_actor(roles)
    # kl_estimator k3 set directly (check() refuses it for RLOO): the update must still use k1
    config = PPOConfig(algo="rloo", reward="length", response_length=5, rloo_k=2, kl_estimator="k3")
    eos = eos_token_ids(roles.model, tokenizer)
    batch = rollout(roles, tokenizer, PROMPTS[:2], 2, config, reward_function(config, tokenizer), eos,
                    generator_seed=1, with_values=False, with_logprobs=False)
    optimizer = torch.optim.Adam(list(roles.parameters_of(ACTOR).values()), lr=1e-3)
    update = rloo_update(roles, Accelerator(cpu=True), optimizer, batch, 0.5, config)
    metrics = update.metrics
    assert batch.logprobs is None  # the update returns pi_old's logprobs; the rollout is left as it was
    k1 = ((update.logprobs - batch.ref_logprobs) * batch.mask).sum(1)
    k3 = (core.kl_estimate(update.logprobs, batch.ref_logprobs, "k3") * batch.mask).sum(1)
    assert not torch.allclose(k1, k3, atol=1e-3)
    assert metrics["objective/rlhf_reward"] == pytest.approx((batch.scores - 0.5 * k1).mean().item(), rel=1e-5)
    with pytest.raises(UserError, match="k1"):
        config.check()
    with pytest.raises(UserError, match="k1"):
        PPOConfig(algo="grpo", reward="length", kl_estimator="k1").check()


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_critic_free_algorithms_load_no_critic(tiny_model_dir, rm_dir, prompts_file, tmp_path, monkeypatch, algo):
    built = []

    def spy(*args, **kwargs):
        roles, tokenizer = build_roles(*args, **kwargs)
        built.append(roles)
        return roles, tokenizer

    monkeypatch.setattr(trainer, "build_roles", spy)
    train_policy(PPOConfig(algo=algo, rm=rm_dir, prompts=prompts_file, out=str(tmp_path / algo), steps=1,
                           batch_size=2, rloo_k=2, grpo_k=2, response_length=4, eval_every=0, eval_size=1))
    roles = built[0]
    assert roles.value_head is None and not roles.parameters_of(CRITIC)
    assert roles.parameters_of(REWARD)  # the reward model is still there
    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ACTOR}." in n for n in trainable)
    with pytest.raises(RuntimeError, match="no critic"):
        roles.values(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), 1)


def test_missing_eos_penalty_is_off_by_default_and_warns_when_most_responses_are_cut(
        tiny_model_dir, prompts_file, tmp_path, caplog):
    assert PPOConfig().missing_eos_penalty is None
    with pytest.raises(UserError, match=">= 0"):
        PPOConfig(reward="length", missing_eos_penalty=-1.0).check()
    common = dict(model=tiny_model_dir, reward="length", prompts=prompts_file, steps=1, batch_size=2,
                  response_length=4, eval_every=0, eval_size=1)
    with caplog.at_level(logging.WARNING, logger="policy.trainer"):
        train_policy(PPOConfig(out=str(tmp_path / "off"), **common))
    assert "missing-eos-penalty" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="policy.trainer"):
        summary = train_policy(PPOConfig(out=str(tmp_path / "on"), missing_eos_penalty=1.0, **common))
    assert "end with EOS" in caplog.text and "--missing-eos-penalty" in caplog.text
    import csv

    with open(summary["train_log"]) as handle:
        row = next(csv.DictReader(handle))
    assert float(row["response/finished"]) < 0.5  # a random tiny model almost never stops in 4 tokens
    penalty = float(row["objective/scores"]) - float(row["objective/scores_penalized"])
    assert penalty == pytest.approx(1.0 - float(row["response/finished"]), abs=1e-5)
    assert math.isfinite(float(row["objective/scores"]))


def test_cli_parses_the_new_options(tiny_model_dir, prompts_file, tmp_path, capsys):
    assert cli_main(["ppo", "--reward", "length", "--model", tiny_model_dir, "--prompts", prompts_file,
                     "--out", str(tmp_path / "a"), "--missing-eos-penalty", "-1"]) == 2
    assert ">= 0" in capsys.readouterr().err
    assert cli_main(["ppo", "--reward", "length", "--model", tiny_model_dir, "--prompts", prompts_file,
                     "--out", str(tmp_path / "b"), "--algo", "rloo", "--rloo-k", "2", "--kl-estimator", "k3"]) == 2
    assert "k1" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rollout_logprobs_from_the_sampler_equal_an_actor_forward(tiny_model_dir, algo):
    """The old logprobs and entropy come from generate's own logits (no second actor forward); they must be
    what a forward pass of the actor over the sampled sequences gives, up to float error."""
    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=algo == "ppo")
    _move_actor(roles)
    config = PPOConfig(algo=algo, reward="length", response_length=7, temperature=0.8, ppo_epochs=2)
    eos = eos_token_ids(roles.model, tokenizer)
    batch = rollout(roles, tokenizer, PROMPTS[:3], 2, config, reward_function(config, tokenizer), eos,
                    generator_seed=3, with_values=algo == "ppo")
    T = batch.response_length
    with torch.no_grad():
        logits = roles.response_logits(ACTOR, batch.input_ids, batch.attention_mask, T)
    forward = core.logprobs_from_logits(logits, batch.responses, config.temperature)
    real = batch.mask.bool()
    assert (forward[real] - batch.ref_logprobs[real]).abs().max() > 0.05  # the actor really differs
    assert torch.allclose(batch.logprobs[real], forward[real], atol=1e-4)
    assert torch.allclose(batch.entropy[real], core.entropy_from_logits(logits, config.temperature)[real], atol=1e-4)
    assert batch.logits is None  # not carried into the update


def test_bf16_rollout_logprobs_come_from_a_forward_pass(tiny_model_dir):
    """In bfloat16 the sampler's KV-cache logits round differently from a full pass (tenths of a nat on
    SmolLM2), so the rollout takes the actor's logprobs from a forward pass: the update's first ratio is then
    exactly 1, and a fresh actor's KL to the reference exactly 0."""
    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, dtype=torch.bfloat16)
    config = PPOConfig(reward="length", response_length=7, temperature=0.8, dtype="bfloat16")
    eos = eos_token_ids(roles.model, tokenizer)
    passes = []  # (a tiny model's logits are too small to show the rounding: check the path too)
    forward = roles.response_logits
    roles.response_logits = lambda adapter, *args: passes.append(adapter) or forward(adapter, *args)
    batch = rollout(roles, tokenizer, PROMPTS[:3], 2, config, reward_function(config, tokenizer), eos,
                    generator_seed=3, with_values=True)
    assert passes == [ACTOR, None]
    real = batch.mask.bool()
    assert torch.equal(batch.logprobs[real], batch.ref_logprobs[real])  # LoRA B = 0: the actor is the reference
    _move_actor(roles)
    batch = rollout(roles, tokenizer, PROMPTS[:3], 2, config, reward_function(config, tokenizer), eos,
                    generator_seed=3, with_values=True)
    with torch.no_grad():
        micro = roles.response_logits(ACTOR, batch.input_ids[:2], batch.attention_mask[:2], batch.response_length)
    logp = core.logprobs_from_logits(micro, batch.responses[:2], config.temperature)
    assert torch.equal(logp[batch.mask[:2].bool()], batch.logprobs[:2][batch.mask[:2].bool()])
