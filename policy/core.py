"""Pure tensor math of the policy stage: logprobs, KL estimators, per-token rewards, GAE, PPO and RLOO
losses, the KL controllers. No models here, so every piece is tested on hand-made tensors.

Shapes: B sequences, T response tokens. `mask` is 1 on real response tokens (up to and including the
first EOS) and 0 on the padding after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reward_model.model import last_token_index


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (Bessel's correction, as in TRL/Huang et al.)."""
    mean = masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    var = masked_mean((values - mean) ** 2, mask)
    return var * count / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding stays 0. With shift_mean=False the mean is
    added back (used for rewards in some implementations; advantages use the default)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature): the distribution the tokens were sampled
    from. Scoring at T=1 while sampling at T=0.7 biases the ratio and the KL (Huang et al. 2024)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position entropy (nats) of softmax(logits / temperature)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's logprobs (Schulman, "Approximating
    KL divergence", 2020). k1 = log(p/p_ref): unbiased, can be negative per token. k2 = (log r)^2 / 2.
    k3 = (r - 1) - log r with r = p_ref/p: unbiased and never negative (used by GRPO)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = exp(-log_ratio)
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every real token, plus the sequence score on the LAST REAL token only
    (Ziegler et al. 2019; InstructGPT): the reward model judges the finished response, not its prefixes."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = last_token_index(mask)  # the same last-real-token rule the reward model reads at
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded responses: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last real token. Returns (advantages,
    returns = advantages + values), both detached and 0 on padding. Computed ONCE per batch from the
    rollout's values (Huang et al. 2024), never re-derived inside the update epochs."""
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # a padded step passes nothing back: the episode ended at the last real token
        next_value = values[:, t] * mask[:, t]
        next_adv = adv
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017) averaged over real tokens; also the approximate KL
    between the old and new policy (k3, as in TRL) and the fraction of clipped tokens."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over real tokens (as in
    OpenAI's lm-human-preferences and TRL; Huang et al. 2024)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((clipped_values - returns) ** 2 > (values - returns) ** 2).float(), mask)}
    return loss, stats


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): rewards are [num_prompts * k] grouped by prompt;
    each sample's baseline is the mean reward of the OTHER k-1 samples of its prompt."""
    if k < 2:
        raise ValueError("RLOO needs k >= 2 samples per prompt")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def rloo_loss(seq_logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE on the sequence logprob: -A * log pi(y|x), averaged over sequences."""
    return -(advantages.detach() * seq_logp).mean()


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta_{t+1} = beta_t (1 + K_beta e_t) with the proportional error
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2) and K_beta = n_steps / horizon."""

    value: float
    target: float
    horizon: int = 10_000

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams across the samples (0 if none)."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0
