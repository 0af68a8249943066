"""The policy stage's pure math (policy/core.py) against hand computations and slow reference loops."""

import math

import pytest
import torch

from policy import core


def _right_padded_mask(lengths, width):
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()


def slow_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one sequence at a time over its real tokens only."""
    advantages = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_slow_reference_under_padding(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 3, 1, 5]
    mask = _right_padded_mask(lengths, 7)
    rewards = torch.randn(4, 7)
    values = torch.randn(4, 7)
    # garbage in the padding must not leak into real positions
    rewards[mask == 0] = 100.0
    values[mask == 0] = -100.0
    advantages, returns = core.compute_gae(rewards * mask + (1 - mask) * 100.0, values, mask, gamma, lam)
    expected = slow_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-5)


def test_gae_is_detached():
    values = torch.randn(2, 4, requires_grad=True)
    advantages, returns = core.compute_gae(torch.randn(2, 4), values, torch.ones(2, 4))
    assert not advantages.requires_grad and not returns.requires_grad


def test_score_lands_on_last_real_token_under_padding():
    mask = _right_padded_mask([4, 2, 1], 4)
    kl = torch.full((3, 4), 0.5)
    rewards = core.per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([
        [-0.05, -0.05, -0.05, -0.05 + 1.0],
        [-0.05, -0.05 + 2.0, 0.0, 0.0],
        [-0.05 + 3.0, 0.0, 0.0, 0.0],
    ])
    assert torch.allclose(rewards, expected)


def test_kl_estimators_on_hand_made_logprobs():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.9)])
    ref = torch.tensor([math.log(0.25), math.log(0.4), math.log(0.9)])
    k1 = core.kl_estimate(logp, ref, "k1")
    k2 = core.kl_estimate(logp, ref, "k2")
    k3 = core.kl_estimate(logp, ref, "k3")
    assert torch.allclose(k1, torch.tensor([math.log(2), math.log(0.5), 0.0]), atol=1e-6)
    assert torch.allclose(k2, 0.5 * torch.tensor([math.log(2) ** 2, math.log(0.5) ** 2, 0.0]), atol=1e-6)
    # k3 = (r - 1) - log r with r = p_ref / p
    expected_k3 = torch.tensor([(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2), 0.0])
    assert torch.allclose(k3, expected_k3, atol=1e-6)
    assert k1[1] < 0  # k1 can be negative per token, k3 never
    wild = core.kl_estimate(torch.randn(1000) * 3, torch.randn(1000) * 3, "k3")
    assert (wild >= 0).all()
    with pytest.raises(ValueError):
        core.kl_estimate(logp, ref, "k4")


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    mask = _right_padded_mask([3, 2], 4)
    whitened = core.masked_whiten(values, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()  # unbiased std, as masked_var
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-5)
    assert torch.all(whitened[mask == 0] == 0)
    assert torch.allclose(core.masked_whiten(values, mask, shift_mean=False)[mask.bool()], expected + 3.0, atol=1e-5)


def test_logprobs_at_sampling_temperature_match_manual():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    got = core.logprobs_from_logits(logits, tokens, temperature=0.7)
    for b in range(2):
        for t in range(3):
            probs = torch.exp(logits[b, t] / 0.7) / torch.exp(logits[b, t] / 0.7).sum()
            assert got[b, t].item() == pytest.approx(math.log(probs[tokens[b, t]].item()), abs=1e-5)
    assert not torch.allclose(got, core.logprobs_from_logits(logits, tokens, 1.0))
    entropy = core.entropy_from_logits(torch.zeros(1, 1, 8), 0.7)
    assert entropy.item() == pytest.approx(math.log(8), abs=1e-5)


def test_clipped_policy_loss_matches_hand_computation():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.55]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = core.ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token: max(-A r, -A clip(r)): A=1,r=1.5 -> max(-1.5,-1.2) = -1.2 (clipped);
    # A=-2,r=0.5 -> max(1.0, 1.6) = 1.6 (clipped); A=3,r=1.1 -> max(-3.3,-3.3) = -3.3
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 3.3) / 3, abs=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # padding is ignored
    loss_pad, _ = core.ppo_policy_loss(torch.cat([new, old[:, :1]], 1), torch.cat([old, old[:, :1]], 1),
                                       torch.cat([adv, torch.tensor([[50.0]])], 1), torch.tensor([[1, 1, 1, 0]]))
    assert loss_pad.item() == pytest.approx(loss.item(), abs=1e-6)
    # gradient flows only where the ratio is not clipped
    new_param = new.clone().requires_grad_(True)
    core.ppo_policy_loss(new_param, old, adv, mask)[0].backward()
    assert new_param.grad[0, 0] == 0 and new_param.grad[0, 1] == 0 and new_param.grad[0, 2] != 0


def test_clipped_value_loss_matches_hand_computation():
    old = torch.tensor([[0.0, 1.0]])
    new = torch.tensor([[0.5, 1.1]])
    returns = torch.tensor([[1.0, 0.0]])
    loss, _ = core.value_loss(new, old, returns, torch.tensor([[1, 1]]), clip_range=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max(1.21, 1.21) = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)


def test_rloo_baseline_excludes_the_sample_itself():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    adv = core.rloo_advantages(rewards, k=4)
    # sample 0: baseline = mean(2, 3, 6) = 11/3
    assert adv[0].item() == pytest.approx(1 - 11 / 3)
    assert adv[3].item() == pytest.approx(6 - 2)
    assert adv[7].item() == pytest.approx(4 - 0)
    assert adv[4].item() == pytest.approx(0 - 4 / 3)
    # a sample's advantage does not depend on its own reward through the baseline
    bumped = rewards.clone()
    bumped[0] += 10
    assert core.rloo_advantages(bumped, 4)[0].item() == pytest.approx(adv[0].item() + 10)
    with pytest.raises(ValueError):
        core.rloo_advantages(rewards, 1)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl2 = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl2.update(3.0, n_steps=10)  # error -0.5 -> clipped to -0.2
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    restored = core.AdaptiveKLController(1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl


def test_distinct_n():
    assert core.distinct_n(["tall tall tall tall"], 2) == pytest.approx(1 / 3)
    assert core.distinct_n(["a b c", "c d"], 1) == pytest.approx(4 / 5)
    assert core.distinct_n([""], 2) == 0.0


def test_approx_kl_is_k3_of_kl_old_to_new():
    """Tokens are sampled from pi_old, so KL(pi_old || pi) ~ (rho - 1) - log rho with rho = pi / pi_old
    (Schulman 2020), not the same expression of pi_old / pi."""
    old = torch.log(torch.tensor([[0.5, 0.5, 0.4]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.4]]))  # rho = 1.5, 0.5, 1
    mask = torch.tensor([[1, 1, 1]])
    expected = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5)) + 0.0) / 3
    assert core.approx_kl_old_new(new, old, mask).item() == pytest.approx(expected, abs=1e-6)
    _, stats = core.ppo_policy_loss(new, old, torch.ones(1, 3), mask)
    assert stats["approx_kl"].item() == pytest.approx(expected, abs=1e-6)
    assert core.approx_kl_old_new(old, old, mask).item() == 0.0


def test_missing_eos_penalty_is_subtracted_and_keeps_the_rm_order():
    scores = torch.tensor([0.3, -0.2, 1.5, 0.9])
    finished = torch.tensor([True, False, False, True])
    penalised = core.apply_missing_eos_penalty(scores, finished, 1.0)
    assert penalised.tolist() == pytest.approx([0.3, -1.2, 0.5, 0.9])
    assert penalised[2] > penalised[1]  # unfinished responses keep the RM's order
    assert core.apply_missing_eos_penalty(scores, finished, None) is scores


def test_rloo_sequence_reward_is_score_minus_beta_sum_of_k1():
    """R = r - beta * (CE_ref - CE_pi) over the response: k1 summed over real tokens."""
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.25, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = core.sequence_kl_reward(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    kl0 = math.log(2) + math.log(0.5) + math.log(9)
    kl1 = math.log(0.5) + 0.0
    assert got.tolist() == pytest.approx([1.0 - 0.1 * kl0, 2.0 - 0.1 * kl1], abs=1e-6)


def test_grpo_advantages_normalise_within_each_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = core.grpo_advantages(scores, k=4)
    # group 1: mean 3, Bessel std sqrt(((-2)^2 + 1 + 0 + 9) / 3) = sqrt(14/3); group 2: all equal -> 0
    std = math.sqrt(14 / 3)
    assert adv[:4].tolist() == pytest.approx([-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4)], abs=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    centred = core.grpo_advantages(scores, k=4, scale=False)  # Dr. GRPO: no division by the std
    assert centred.tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    assert core.grpo_advantages(scores, k=2).tolist()[:2] == pytest.approx([-0.5 / (0.5 ** 0.5 + 1e-4),
                                                                          0.5 / (0.5 ** 0.5 + 1e-4)], abs=1e-6)
    assert not core.grpo_advantages(scores.requires_grad_(), 4).requires_grad
    with pytest.raises(ValueError):
        core.grpo_advantages(scores, k=1)


def test_grpo_loss_matches_hand_computation():
    # response 0: 3 tokens, ratios 1.5, 0.5, 1.1, A = 1; response 1: 1 real token, ratio 0.9, A = -2
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.55], [0.45, 0.9, 0.9]]))
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.55], [0.9, 0.1, 0.1]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # surrogate min(rho A, clip(rho) A): 1.2 (clipped), 0.5, 1.1; response 1: min(-1.8, -1.8) = -1.8
    pg = [[-1.2, -0.5, -1.1], [1.8]]
    # k3 of the current policy to the reference: r - log r - 1, r = pi_ref / pi
    r = [[0.5 / 0.75, 0.5 / 0.25, 1.0], [0.9 / 0.45]]
    kl = [[x - math.log(x) - 1 for x in row] for row in r]
    beta = 0.1
    per_token = [[p + beta * k for p, k in zip(prow, krow)] for prow, krow in zip(pg, kl)]
    sequence = (sum(per_token[0]) / 3 + per_token[1][0]) / 2
    token = (sum(per_token[0]) + per_token[1][0]) / 4
    constant = (sum(per_token[0]) + per_token[1][0]) / (2 * 5)
    for norm, expected in (("sequence", sequence), ("token", token), ("constant", constant)):
        loss, stats = core.grpo_loss(new, old, ref, adv, mask, clip_range=0.2, kl_coef=beta, norm=norm, max_tokens=5)
        assert loss.item() == pytest.approx(expected, abs=1e-5), norm
    assert stats["kl"].item() == pytest.approx((sum(kl[0]) + kl[1][0]) / 4, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)  # only token (0, 0): A > 0 and rho > 1.2
    assert stats["pg"].item() == pytest.approx((sum(pg[0]) + pg[1][0]) / 10, abs=1e-6)
    # gradients: none through the surrogate where it is clipped, but the KL term still pulls it
    param = new.clone().requires_grad_(True)
    core.grpo_loss(param, old, ref, adv, mask, kl_coef=0.0)[0].backward()
    assert param.grad[0, 0] == 0 and param.grad[0, 1] != 0 and param.grad[1, 1] == 0  # clipped; padding
    param.grad = None
    core.grpo_loss(param, old, ref, adv, mask, kl_coef=beta)[0].backward()
    assert param.grad[0, 0] == pytest.approx(beta * (1 - 0.5 / 0.75) / 6, abs=1e-6)  # d k3 / d log pi = 1 - r
    with pytest.raises(ValueError):
        core.grpo_loss(new, old, ref, adv, mask, norm="constant")  # needs max_tokens


def test_grpo_loss_on_policy_is_reinforce_with_group_advantages():
    """With pi_old = pi (one update per batch) and beta = 0, the gradient is that of -A * mean_t log pi."""
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 5), -1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    loss, stats = core.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.0)
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / 4
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["approx_kl"].item() == 0.0
