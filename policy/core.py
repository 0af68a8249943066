"""Pure tensor math of the policy stage: logprobs, KL estimators, per-token rewards, GAE, PPO, RLOO and
GRPO losses, the KL controllers. No models here, so every piece is tested on hand-made tensors.

Shapes: B sequences, T response tokens. `mask` is 1 on real response tokens (up to and including the
first EOS) and 0 on the padding after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policy.config import GRPO_LOSS_NORMS
from rlhf.causal_lm import last_token_index

Total = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes that share a batch (`accelerator.reduce(x, reduction="sum")`), so that a
masked statistic is that of every process's entries together."""


def _this_process(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                total: Total = _this_process) -> torch.Tensor:
    """Mean over the masked entries (of every process's batch with `total`; per row with `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return total((values * mask).sum()) / total(mask.sum()).clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, total: Total = _this_process) -> torch.Tensor:
    """Unbiased variance over the masked entries (Bessel's correction, as in TRL/Huang et al.)."""
    mean = masked_mean(values, mask, total=total)
    count = total(mask.to(values.dtype).sum())
    var = masked_mean((values - mean) ** 2, mask, total=total)
    return var * count / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total: Total = _this_process) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every process's batch with `total`); padding stays 0. With
    shift_mean=False the mean is added back (used for rewards in some implementations; advantages use the
    default)."""
    mean, var = masked_mean(values, mask, total=total), masked_var(values, mask, total=total)
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
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def apply_missing_eos_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that ended without EOS (TRL's
    `missing_eos_penalty`; Huang et al. 2024). Subtracting keeps the reward model's order among the
    unfinished responses; replacing their scores with a constant would make them all equal, and with
    most rollouts unfinished the policy would learn a length prior instead of the preference."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def sequence_kl_reward(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """R = score - beta * sum_t (log pi - log pi_ref) over the real tokens: the sequence-level reward of
    RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer), i.e. score - beta * (CE_ref(y) - CE_pi(y)) on the
    sampled response. Always k1: the sum of k1 over a sampled response is the unbiased estimate of
    the sequence KL(pi || pi_ref)."""
    return scores - kl_coef * ((logp - ref_logp) * mask.to(logp.dtype)).sum(-1)


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
    between the old and new policy (`approx_kl_old_new`) and the fraction of clipped tokens."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": approx_kl_old_new(logp, old_logp, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def approx_kl_old_new(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) per real token, k3 estimator (Schulman 2020) on tokens sampled from pi_old:
    (rho - 1) - log rho with rho = pi / pi_old. Never negative; 0 only where the policy has not moved."""
    log_ratio = (logp - old_logp).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


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


def grpo_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, section 4.1.2): scores are [num_prompts * k] grouped
    by prompt; A_i = (r_i - mean(r)) / (std(r) + eps) within each group of k, the same for every token
    of response i. std is Bessel-corrected and eps = 1e-4, as in TRL's GRPOTrainer; a group whose
    rewards are all equal gets A = 0. scale=False drops the division by std (Dr. GRPO, Liu et al. 2025:
    the std up-weights prompts that are nearly solved or nearly hopeless). Detached."""
    if k < 2:
        raise ValueError("GRPO needs k >= 2 samples per prompt")
    grouped = scores.detach().float().view(-1, k)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_range: float = 0.2, kl_coef: float = 0.04, kl_estimator: str = "k3",
              norm: str = "sequence", max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (Shao et al. 2024, eq. 3), to minimise, for B responses of T tokens:

        l_it = -min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) + beta * KL_it,   rho_it = pi / pi_old

    with KL_it = k3 = pi_ref/pi - log(pi_ref/pi) - 1 of the CURRENT policy to the reference (a loss
    term with its gradient, not a reward penalty). `advantages` is [B] (one value per response).
    Aggregation over tokens (`norm`):
      "sequence": mean over each response's tokens, then over responses (Shao et al. 2024);
      "token":    sum over all tokens / number of real tokens (every token weighs the same; DAPO, Yu et al. 2025);
      "constant": sum over all tokens / (B * max_tokens) (Dr. GRPO, Liu et al. 2025: no length bias).
    Stats: pg (the surrogate part, same aggregation), kl (mean KL_it per token), approx_kl (old vs new),
    clipfrac, ratio."""
    if norm not in GRPO_LOSS_NORMS:
        raise ValueError(f"unknown GRPO loss normalisation {norm!r}: use one of {GRPO_LOSS_NORMS}")
    mask = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    surrogate = torch.min(unclipped, clipped)
    kl = kl_estimate(logp, ref_logp.detach(), kl_estimator)
    per_token = -surrogate + kl_coef * kl

    def aggregate(values: torch.Tensor) -> torch.Tensor:
        if norm == "sequence":
            return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        if norm == "token":
            return (values * mask).sum() / mask.sum().clamp(min=1)
        if max_tokens is None:
            raise ValueError('norm="constant" needs max_tokens (the generation budget)')
        return (values * mask).sum() / (values.shape[0] * max_tokens)

    loss = aggregate(per_token)
    with torch.no_grad():
        stats = {
            "pg": aggregate(-surrogate),
            "kl": masked_mean(kl, mask),
            "approx_kl": approx_kl_old_new(logp, old_logp, mask),
            "clipfrac": masked_mean((clipped < unclipped).to(logp.dtype), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


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
