"""PPO with a KL penalty to the frozen reference, RLOO and GRPO, in one readable loop (CleanRL's ppo.py style).

    config = PPOConfig(prompts="data/prompts.jsonl", out="runs/ppo", rm="runs/rm")
    summary = train_policy(config)

Sources: InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019 ("Fine-tuning LMs from human
preferences": per-token KL penalty, adaptive KL controller), Huang et al. 2024 ("The N implementation
details of RLHF with PPO": logprobs at the sampling temperature, reward on the last real token, penalty
for responses without EOS, advantages whitened and computed once, clipped value loss), Ahmadian et al.
2024 ("Back to basics": RLOO), Shao et al. 2024 (DeepSeekMath: GRPO), Liu et al. 2025 ("Understanding
R1-Zero-like training": Dr. GRPO).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from policy import core
from policy.config import PPOConfig
from policy.roles import ACTOR, PolicyRoles, build_roles, save_actor
from rlhf.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of sampled responses and everything computed on it without gradients."""

    prompts: list[str]
    input_ids: torch.Tensor       # [B, P+T] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # [B, P+T]
    responses: torch.Tensor       # [B, T]
    mask: torch.Tensor            # [B, T] 1 on real response tokens, EOS included
    finished: torch.Tensor        # [B] bool: the response ended with EOS
    texts: list[str]
    logprobs: torch.Tensor | None  # [B, T] actor at sampling time (temperature-scaled)
    ref_logprobs: torch.Tensor     # [B, T]
    entropy: torch.Tensor | None   # [B, T]
    scores: torch.Tensor          # [B] reward before the KL term (RM or oracle), after the EOS penalty
    raw_scores: torch.Tensor      # [B] before the EOS penalty
    values: torch.Tensor | None = None  # [B, T] critic (PPO)

    @property
    def response_length(self) -> int:
        return self.responses.shape[1]


class CsvLog:
    """Rows of metrics, rewritten atomically after each append (the files are small); on resume it
    keeps only the rows up to the checkpoint's step."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path, self.rows = path, []
        if keep_until_step is not None and path.is_file():
            with path.open(encoding="utf-8") as handle:
                self.rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)
                             if int(row["step"]) <= keep_until_step]

    def append(self, row: dict[str, Any]) -> None:
        from rlhf.jsonl import atomic_write

        self.rows.append(row)
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with atomic_write(self.path) as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


class _Sampler:
    """Which prompts each step uses: a fresh seeded permutation per pass over the data, so the order
    is a pure function of (seed, step) and a resumed run sees the same prompts."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed

    def batch(self, step: int, size: int) -> list[str]:
        n = len(self.prompts)
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            out.append(self.prompts[int(perm[i])])
        return out


def split_prompts(config: PPOConfig) -> tuple[list[str], list[str]]:
    """(train prompts, held-out eval prompts): `eval_prompts` when given, else the prompts that
    `split_by_prompt` holds out (the export's rule, so a demo's RL evaluation never sees a labeled prompt)."""
    from rlhf.prompts import read_prompts, split_by_prompt

    prompts = [p for _, p in read_prompts(config.prompts)]
    if config.eval_prompts:
        held_out = [p for _, p in read_prompts(config.eval_prompts)]
    elif config.eval_fraction > 0 and len(set(prompts)) > 1:
        test = split_by_prompt(prompts, config.eval_fraction, config.seed)
        held_out = [p for p in prompts if p in test]
        prompts = [p for p in prompts if p not in test]
    else:
        held_out = prompts
    return prompts, held_out[:config.eval_size]


RewardFn = Callable[..., torch.Tensor]


def reward_function(config: PPOConfig, tokenizer) -> RewardFn:
    """(roles, prompts, texts, input_ids, attention_mask, lengths) -> scores [B]: the RM or an oracle.
    input_ids are prompt + response; lengths are response tokens before the first EOS."""
    if config.reward != "rm":
        from rlhf.oracles import load_oracle

        oracle = load_oracle(config.reward)
        return lambda roles, prompts, texts, *_: torch.tensor(
            [float(oracle(p, t)) for p, t in zip(prompts, texts)], dtype=torch.float32)

    from reward_model.model import encode_sample_ids, score_samples

    def rm_scores(roles, prompts, texts, input_ids, attention_mask, *_):
        # The RM scores the decoded text re-encoded exactly as in its training (prompt template, EOS,
        # its own max_length truncation), not the sampled ids: decoding and re-tokenizing can change
        # the ids (another BPE split, a stripped newline), and the RM has only seen the re-encoded form.
        samples = [encode_sample_ids(tokenizer, p, t, roles.rm_max_length) for p, t in zip(prompts, texts)]
        return torch.tensor(score_samples(roles.scores, samples, tokenizer.pad_token_id, input_ids.device,
                                          batch_size=len(samples)), dtype=torch.float32)

    return rm_scores


def _on_model_device(roles: PolicyRoles, encoded, responses: torch.Tensor, samples_per_prompt: int,
                     eos_ids: list[int]):
    """Prompt + response laid out for the forward passes, every tensor on the model's device (sample_batch
    returns CPU tensors; a GPU model must not meet them): (input_ids, attention_mask, responses, mask,
    lengths, finished). `mask` marks the real response tokens: everything up to and including the first
    EOS (stopping is an action too); after it, generate's padding, masked out everywhere (Huang et al.
    2024, "truncate at EOS")."""
    from rlhf.generation import completion_lengths

    device = next(roles.parameters()).device
    responses = responses.to(device)
    T = responses.shape[1]
    lengths, finished = completion_lengths(responses, eos_ids)
    mask = (torch.arange(T, device=device)[None] < (lengths + finished.long())[:, None]).long()
    query = encoded.input_ids.to(device).repeat_interleave(samples_per_prompt, 0)
    query_mask = encoded.attention_mask.to(device).repeat_interleave(samples_per_prompt, 0)
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask], dim=1)
    return input_ids, attention_mask, responses, mask, lengths, finished


@torch.no_grad()
def rollout(roles: PolicyRoles, tokenizer, prompts: list[str], samples_per_prompt: int, config: PPOConfig,
            reward_fn: RewardFn, eos_ids: list[int], generator_seed: int, with_values: bool,
            with_logprobs: bool = True) -> Rollout:
    """Sample responses with the actor and score them: logprobs (actor and reference, at the sampling
    temperature), entropy, values, and the sequence score with the missing-EOS penalty.
    with_logprobs=False leaves the actor's logprobs to the update's own forward pass (RLOO's and
    single-update GRPO's on-policy step computes exactly the same numbers, so a second pass would be
    wasted)."""
    from rlhf.generation import SamplingParams, decode_responses, sample_batch

    # top_p stays 1: the logprobs below are of the plain temperature-scaled softmax, which is what
    # the tokens were sampled from only without nucleus truncation.
    params = SamplingParams(temperature=config.temperature, top_p=1.0, max_new_tokens=config.response_length)
    with roles.actor():
        encoded, responses = sample_batch(roles.model, tokenizer, prompts, samples_per_prompt, params,
                                          generator_seed=generator_seed)
    texts = [t for t, _ in decode_responses(tokenizer, responses, eos_ids)]
    input_ids, attention_mask, responses, mask, lengths, finished = _on_model_device(
        roles, encoded, responses, samples_per_prompt, eos_ids)
    T = responses.shape[1]
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]

    logprobs = entropy = None
    if with_logprobs:
        logits = roles.response_logits(ACTOR, input_ids, attention_mask, T)
        logprobs = core.logprobs_from_logits(logits, responses, config.temperature)
        entropy = core.entropy_from_logits(logits, config.temperature)
        del logits
    ref_logits = roles.response_logits(None, input_ids, attention_mask, T)
    ref_logprobs = core.logprobs_from_logits(ref_logits, responses, config.temperature)
    del ref_logits
    values = roles.values(input_ids, attention_mask, T) if with_values else None
    raw_scores = reward_fn(roles, all_prompts, texts, input_ids, attention_mask, lengths, T).to(input_ids.device)
    scores = core.apply_missing_eos_penalty(raw_scores, finished, config.missing_eos_penalty)
    return Rollout(all_prompts, input_ids, attention_mask, responses, mask, finished, texts, logprobs,
                   ref_logprobs, entropy, scores, raw_scores, values)


@torch.no_grad()
def evaluate(roles: PolicyRoles, tokenizer, prompts: list[str], config: PPOConfig, reward_fn: RewardFn | None,
             oracle, eos_ids: list[int], reference: bool = False, chunk: int = 16) -> tuple[dict, list[dict]]:
    """Sample one response per held-out prompt (the same seed every time, so evaluations differ only by
    the policy) and measure: RM score, oracle score, KL to the reference (mean per-sequence sum of k1),
    entropy, distinct-1/2, length. `reference=True` samples from the reference (adapters off) instead."""
    from rlhf.generation import SamplingParams, decode_responses, sample_batch

    params = SamplingParams(temperature=config.temperature, top_p=1.0, max_new_tokens=config.response_length)
    rows, kls, entropies, rm_scores, lengths_all, finished_all = [], [], [], [], [], []
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        ctx = roles.reference if reference else roles.actor()
        with ctx:
            encoded, responses = sample_batch(roles.model, tokenizer, batch, 1, params,
                                              generator_seed=config.seed * 1_000_003 + 99_991 + start)
        texts = [t for t, _ in decode_responses(tokenizer, responses, eos_ids)]
        input_ids, attention_mask, responses, mask, lengths, finished = _on_model_device(
            roles, encoded, responses, 1, eos_ids)
        T = responses.shape[1]
        ref_logits = roles.response_logits(None, input_ids, attention_mask, T)
        ref_logp = core.logprobs_from_logits(ref_logits, responses, config.temperature)
        if reference:  # sampled from the reference: its own entropy, KL 0
            logits, logp = ref_logits, ref_logp
        else:
            logits = roles.response_logits(ACTOR, input_ids, attention_mask, T)
            logp = core.logprobs_from_logits(logits, responses, config.temperature)
        ent = core.entropy_from_logits(logits, config.temperature)
        del logits, ref_logits
        kls += ((logp - ref_logp) * mask).sum(1).tolist()
        entropies += core.masked_mean(ent, mask, dim=1).tolist()
        if reward_fn is not None:
            rm_scores += reward_fn(roles, batch, texts, input_ids, attention_mask, lengths, T).tolist()
        lengths_all += lengths.tolist()
        finished_all += finished.tolist()
        for prompt, text in zip(batch, texts):
            rows.append({"prompt": prompt, "completion": text})
    texts = [r["completion"] for r in rows]
    metrics = {
        "objective/kl": sum(kls) / len(kls),
        "policy/entropy": sum(entropies) / len(entropies),
        "eval/distinct_1": core.distinct_n(texts, 1),
        "eval/distinct_2": core.distinct_n(texts, 2),
        "eval/length": sum(lengths_all) / len(lengths_all),
        "eval/finished": sum(finished_all) / len(finished_all),
    }
    for row, kl in zip(rows, kls):
        row["kl"] = kl
    if rm_scores:
        metrics["objective/rm_score"] = sum(rm_scores) / len(rm_scores)
        for row, s in zip(rows, rm_scores):
            row["rm_score"] = s
    if oracle is not None:
        oracle_scores = [float(oracle(r["prompt"], r["completion"])) for r in rows]
        metrics["objective/oracle"] = sum(oracle_scores) / len(oracle_scores)
        for row, s in zip(rows, oracle_scores):
            row["oracle"] = s
    return metrics, rows


def _stats(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def ppo_update(roles: PolicyRoles, accelerator, optimizer, batch: Rollout, kl_coef: float, config: PPOConfig,
               step: int) -> tuple[dict[str, float], int]:
    """Rewards -> GAE (once, detached) -> whitened advantages -> epochs of clipped policy + value loss
    over shuffled minibatches. Each minibatch runs in micro-batches whose gradients accumulate
    (token-weighted, so the result equals one pass over the minibatch): memory bounded by
    `micro_batch_size`. Returns (metrics, number of skipped non-finite updates).

    Early stopping (`stop_kl`, as OpenAI's Spinning Up PPO): each minibatch's forward pass measures
    KL(pi_old || pi) of the policy as it is now, after every earlier step; above `stop_kl` that
    minibatch's step is not taken and the update ends."""
    kl = core.kl_estimate(batch.logprobs, batch.ref_logprobs, config.kl_estimator)
    rewards = core.per_token_rewards(batch.scores, kl, batch.mask, kl_coef)
    advantages, returns = core.compute_gae(rewards, batch.values, batch.mask, config.gamma, config.lam)
    advantage_std = core.masked_var(advantages, batch.mask).sqrt().item()
    advantages = core.masked_whiten(advantages, batch.mask)  # Huang et al. 2024: whiten advantages
    B, T = batch.responses.shape
    mb_size = config.minibatch_size or B
    generator = torch.Generator().manual_seed(config.seed * 104_729 + step)
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "approx_kl", "clipfrac", "vf_clipfrac", "ratio")}
    skipped, epochs_run, stopped = 0, 0, False
    for epoch in range(config.ppo_epochs):
        stepped = False
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, mb_size):
            mb = order[start:start + mb_size]
            n_tokens = batch.mask[mb].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            sums, finite = dict.fromkeys(stats, 0.0), True
            for micro in mb.split(config.micro_batch_size):
                weight = batch.mask[micro].sum() / n_tokens
                # loss = pg_loss + vf_coef * vf_loss, backpropagated in two halves (actor, then critic) so
                # only one role's activations are alive at a time: same gradients, half the peak memory
                logits = roles.response_logits(ACTOR, batch.input_ids[micro], batch.attention_mask[micro], T)
                logp = core.logprobs_from_logits(logits, batch.responses[micro], config.temperature)
                del logits
                pg_loss, pg_stats = core.ppo_policy_loss(logp, batch.logprobs[micro], advantages[micro],
                                                         batch.mask[micro], config.clip_range)
                if not torch.isfinite(pg_loss):
                    finite = False
                    break
                accelerator.backward(pg_loss * weight)
                del logp
                new_values = roles.values(batch.input_ids[micro], batch.attention_mask[micro], T)
                vf_loss, vf_stats = core.value_loss(new_values, batch.values[micro], returns[micro],
                                                    batch.mask[micro], config.vf_clip)
                if not torch.isfinite(vf_loss):
                    finite = False
                    break
                accelerator.backward(config.vf_coef * vf_loss * weight)
                for key, value in (("pg", pg_loss), ("vf", vf_loss), ("approx_kl", pg_stats["approx_kl"]),
                                   ("clipfrac", pg_stats["clipfrac"]), ("ratio", pg_stats["ratio"]),
                                   ("vf_clipfrac", vf_stats["clipfrac"])):
                    sums[key] += value.item() * weight.item()
            if _stop_early(finite, sums["approx_kl"], config, optimizer, step, epoch):
                for key, value in sums.items():
                    stats[key].append(value)
                stopped = True
                break
            if not (finite and _optimizer_step(roles, accelerator, optimizer, config)):
                skipped += 1
                continue
            for key, value in sums.items():
                stats[key].append(value)
            stepped = True
        epochs_run += stepped
        if stopped:
            break
    residual = core.masked_var(returns - batch.values, batch.mask)
    explained = 1.0 - (residual / core.masked_var(returns, batch.mask).clamp(min=1e-8)).item()
    return {
        "objective/rlhf_reward": (rewards * batch.mask).sum(1).mean().item(),
        "loss/policy": _stats(stats["pg"]),
        "loss/value": _stats(stats["vf"]),
        "policy/approx_kl": _stats(stats["approx_kl"]),
        "policy/clipfrac": _stats(stats["clipfrac"]),
        "policy/ratio": _stats(stats["ratio"]),
        "policy/epochs": epochs_run,
        "policy/advantage_std": advantage_std,
        "val/mean": core.masked_mean(batch.values, batch.mask).item(),
        "val/clipfrac": _stats(stats["vf_clipfrac"]),
        "val/explained_variance": explained,
    }, skipped


def _stop_early(finite: bool, approx_kl: float, config: PPOConfig, optimizer, step: int, epoch: int) -> bool:
    """True (and the accumulated gradients dropped) when the approx KL(pi_old || pi) just measured on a
    minibatch, BEFORE its step, is above `stop_kl`: the policy has already moved far enough."""
    if not finite or config.stop_kl is None or approx_kl <= config.stop_kl:
        return False
    optimizer.zero_grad(set_to_none=True)
    log.info("step %d: approx KL %.3g > %.3g in epoch %d, stopping the update", step, approx_kl, config.stop_kl,
             epoch + 1)
    return True


def rloo_update(roles: PolicyRoles, accelerator, optimizer, batch: Rollout, kl_coef: float,
                config: PPOConfig) -> tuple[dict[str, float], int]:
    """RLOO (Ahmadian et al. 2024): reward = score - beta * sum_t (log pi - log pi_ref), i.e. score -
    beta * (CE_ref - CE_pi) of the sampled text (k1, as TRL's RLOOTrainer, whatever `kl_estimator`
    says), leave-one-out baseline over the k samples of each prompt, REINFORCE on the sequence
    logprob: one on-policy gradient step per batch.

    The rollout's logprobs come from this step's own forward pass (the same numbers: nothing has
    changed since sampling), run in micro-batches of whole prompt groups so each group's baseline is
    complete; gradients accumulate, so the step equals one pass over the batch."""
    B, T = batch.responses.shape
    group = config.rloo_k
    micro = max(group, config.micro_batch_size // group * group)
    logprobs, entropies, rewards, advantages, losses = [], [], [], [], []
    optimizer.zero_grad(set_to_none=True)
    finite = True
    for start in range(0, B, micro):
        rows = slice(start, start + micro)
        logits = roles.response_logits(ACTOR, batch.input_ids[rows], batch.attention_mask[rows], T)
        logp = core.logprobs_from_logits(logits, batch.responses[rows], config.temperature)
        entropies.append(core.entropy_from_logits(logits.detach(), config.temperature))
        del logits
        reward = core.sequence_kl_reward(batch.scores[rows], logp.detach(), batch.ref_logprobs[rows],
                                         batch.mask[rows], kl_coef)
        advantage = core.rloo_advantages(reward, group)
        seq_logp = (logp * batch.mask[rows]).sum(1)
        loss = core.rloo_loss(seq_logp, advantage) * (seq_logp.shape[0] / B)
        logprobs.append(logp.detach()), rewards.append(reward), advantages.append(advantage)
        if not torch.isfinite(loss):
            finite = False
            break
        accelerator.backward(loss)
        losses.append(loss.item())
    batch.logprobs, batch.entropy = torch.cat(logprobs), torch.cat(entropies)
    skipped = 0 if finite and _optimizer_step(roles, accelerator, optimizer, config) else 1
    advantages = torch.cat(advantages)
    return {"objective/rlhf_reward": torch.cat(rewards).mean().item(),
            "loss/policy": sum(losses) if finite else float("nan"),
            "policy/advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0}, skipped


def grpo_update(roles: PolicyRoles, accelerator, optimizer, batch: Rollout, kl_coef: float, config: PPOConfig,
                step: int) -> tuple[dict[str, float], int]:
    """GRPO (Shao et al. 2024): the score of each response, normalised within its prompt's group of
    `grpo_k` samples, is the advantage of all its tokens (computed once, detached; no critic, no KL in
    the reward); `ppo_epochs` passes (mu) of the clipped surrogate plus beta * KL(pi || pi_ref) (k3) as
    a loss term, aggregated as `grpo_loss_norm` says (see `core.grpo_loss`), over shuffled minibatches
    in micro-batches whose gradients accumulate. Early stopping on `stop_kl` as in `ppo_update`.

    With one pass and one minibatch (the default) the update is on-policy: the rollout's logprobs are
    this forward pass's numbers (pi_old = pi, ratio 1), so the rollout leaves them to it."""
    B, T = batch.responses.shape
    mb_size = config.minibatch_size or B
    k = config.grpo_k
    advantages = core.grpo_advantages(batch.scores, k, scale=config.grpo_scale_rewards)
    centred = core.grpo_advantages(batch.scores, k, scale=False)
    on_policy = batch.logprobs is None
    if on_policy and (config.ppo_epochs > 1 or mb_size < B):
        raise ValueError("GRPO with several passes or minibatches needs the rollout's logprobs (with_logprobs=True)")
    old_logprobs = torch.zeros_like(batch.ref_logprobs) if on_policy else batch.logprobs
    entropy = torch.zeros_like(batch.ref_logprobs) if on_policy else batch.entropy
    generator = torch.Generator().manual_seed(config.seed * 104_729 + step)
    keys = ("loss", "pg", "kl", "approx_kl", "clipfrac", "ratio")
    stats: dict[str, list[float]] = {key: [] for key in keys}
    skipped, epochs_run, stopped = 0, 0, False
    for epoch in range(config.ppo_epochs):
        stepped = False
        order = torch.randperm(B, generator=generator) if not on_policy else torch.arange(B)
        for start in range(0, B, mb_size):
            mb = order[start:start + mb_size]
            n_tokens = batch.mask[mb].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            sums, finite = dict.fromkeys(keys, 0.0), True
            for micro in mb.split(config.micro_batch_size):
                logits = roles.response_logits(ACTOR, batch.input_ids[micro], batch.attention_mask[micro], T)
                logp = core.logprobs_from_logits(logits, batch.responses[micro], config.temperature)
                if on_policy:
                    old_logprobs[micro] = logp.detach()
                    entropy[micro] = core.entropy_from_logits(logits.detach(), config.temperature)
                del logits
                loss, loss_stats = core.grpo_loss(
                    logp, old_logprobs[micro], batch.ref_logprobs[micro], advantages[micro], batch.mask[micro],
                    config.clip_range, kl_coef, config.kl_estimator, config.grpo_loss_norm, config.response_length)
                # the minibatch's loss is the weighted sum of its micro-batches' losses
                token_weight = (batch.mask[micro].sum() / n_tokens).item()
                weight = token_weight if config.grpo_loss_norm == "token" else len(micro) / len(mb)
                if not torch.isfinite(loss):
                    finite = False
                    break
                accelerator.backward(loss * weight)
                del logp
                sums["loss"] += loss.item() * weight
                sums["pg"] += loss_stats["pg"].item() * weight
                for key in ("kl", "approx_kl", "clipfrac", "ratio"):  # per-token means
                    sums[key] += loss_stats[key].item() * token_weight
            if _stop_early(finite, sums["approx_kl"], config, optimizer, step, epoch):
                for key, value in sums.items():
                    stats[key].append(value)
                stopped = True
                break
            if not (finite and _optimizer_step(roles, accelerator, optimizer, config)):
                skipped += 1
                continue
            for key, value in sums.items():
                stats[key].append(value)
            stepped = True
        epochs_run += stepped
        if stopped:
            break
    if on_policy:
        batch.logprobs, batch.entropy = old_logprobs, entropy
    groups = batch.scores.view(-1, k)
    return {
        "loss/policy": _stats(stats["pg"]),
        "loss/kl": _stats(stats["kl"]),
        "loss/total": _stats(stats["loss"]),
        "policy/approx_kl": _stats(stats["approx_kl"]),
        "policy/clipfrac": _stats(stats["clipfrac"]),
        "policy/ratio": _stats(stats["ratio"]),
        "policy/epochs": epochs_run,
        "policy/advantage_std": centred.std().item(),
        "policy/zero_std_groups": (groups.max(1).values == groups.min(1).values).float().mean().item(),
    }, skipped


def _optimizer_step(roles: PolicyRoles, accelerator, optimizer, config: PPOConfig) -> bool:
    """Clip the accumulated gradients and step; a non-finite gradient skips the update (NaN guard)."""
    norm = accelerator.clip_grad_norm_(roles.trainable_parameters(), config.max_grad_norm)
    if not torch.isfinite(torch.as_tensor(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoint" / "state.pt"


def save_checkpoint(out: Path, roles: PolicyRoles, optimizer, step: int, kl_ctl, config: PPOConfig) -> None:
    """Everything a resumed run needs: trainable weights (actor + critic adapters, value head), the
    optimizer, the step, the KL controller and the RNG state. Written atomically."""
    from rlhf.jsonl import atomic_write

    trainable = {n: p.detach().cpu().clone() for n, p in roles.named_parameters() if n in roles._trainable}
    state = {"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step,
             "kl_ctl": kl_ctl.state_dict(), "rng": torch.get_rng_state(), "config": asdict(config)}
    with atomic_write(_checkpoint_path(out), "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(out: Path, roles: PolicyRoles, optimizer, kl_ctl) -> int:
    path = _checkpoint_path(out)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint in {path.parent}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(roles.named_parameters())
    missing = set(roles._trainable) - set(state["trainable"])
    if missing:
        raise UserError(f"{path}: checkpoint does not match this model/configuration "
                        f"({len(missing)} trainable tensors missing; same --model, --rm, --lora-r?)")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def write_plots(out: Path, train_rows: list[dict], eval_rows: list[dict]) -> list[Path]:
    """reward_vs_step.png, kl_vs_step.png, reward_vs_kl.png under OUT/plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    reward_key = next((k for k in ("objective/rm_score", "objective/oracle") if eval_rows and k in eval_rows[0]),
                      None)
    paths = []

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*series(train_rows, "objective/scores"), label="train score (rollouts)", alpha=0.6)
    if reward_key:
        ax.plot(*series(eval_rows, reward_key), "o-", label=f"eval {reward_key.split('/')[1]}")
    ax.set_xlabel("step"), ax.set_ylabel("reward"), ax.legend(), ax.set_title("Reward")
    paths.append(plots / "reward_vs_step.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*series(train_rows, "objective/kl"), label="train KL (rollouts)", alpha=0.6)
    ax.plot(*series(eval_rows, "objective/kl"), "o-", label="eval KL")
    ax.set_xlabel("step"), ax.set_ylabel("KL to reference (nats / sequence)"), ax.legend()
    paths.append(plots / "kl_vs_step.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if reward_key:
        kl = [r["objective/kl"] for r in eval_rows if isinstance(r.get(reward_key), (int, float))]
        rew = [r[reward_key] for r in eval_rows if isinstance(r.get(reward_key), (int, float))]
        ax.plot(kl, rew, "o-")
        for r, x, y in zip(eval_rows, kl, rew):
            ax.annotate(str(int(r["step"])), (x, y), fontsize=7)
    ax.set_xlabel("KL to reference (nats / sequence)"), ax.set_ylabel("eval reward"), ax.set_title("Reward vs KL")
    paths.append(plots / "reward_vs_kl.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=100), plt.close(fig)
    return paths


def train_policy(config: PPOConfig) -> dict[str, Any]:
    """Run PPO or RLOO as configured; returns a summary (final eval metrics, output paths)."""
    from accelerate import Accelerator

    from reward_model.model import read_meta
    from rlhf.jsonl import write_jsonl
    from rlhf.models import eos_token_ids
    from rlhf.oracles import load_oracle

    config.check()
    out = Path(config.out)
    if not config.resume and _checkpoint_path(out).is_file():
        raise UserError(f"{out} already holds a run (checkpoint/): pass --resume to continue it or choose "
                        f"another --out")
    rm_dir = config.rm if config.reward == "rm" else None
    model_name = config.model or (read_meta(rm_dir)["base_model"] if rm_dir else "default")
    train_prompts, eval_prompts = split_prompts(config)
    oracle = load_oracle(config.oracle) if config.oracle else None
    if oracle is None and config.reward != "rm":
        oracle = load_oracle(config.reward)  # the training oracle is also the eval metric

    # ---- derived sizes, computed once ----
    samples_per_prompt = config.samples_per_prompt
    prompts_per_step = config.batch_size // samples_per_prompt
    use_critic = config.algo == "ppo"
    # the update's own forward pass gives the old logprobs when it is a single on-policy step
    with_logprobs = use_critic or (config.algo == "grpo" and (
        config.ppo_epochs > 1 or (config.minibatch_size or config.batch_size) < config.batch_size))

    torch.manual_seed(config.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    roles, tokenizer = build_roles(model_name, rm_dir, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                   critic=use_critic)
    eos_ids = eos_token_ids(roles.model, tokenizer)
    reward_fn = reward_function(config, tokenizer)
    eval_reward_fn = reward_fn if config.reward == "rm" else None
    params = roles.trainable_parameters() if use_critic else list(roles.parameters_of(ACTOR).values())
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-5)  # eps 1e-5 as in CleanRL / Huang et al.
    roles, optimizer = accelerator.prepare(roles, optimizer)
    kl_ctl = (core.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
              if config.target_kl else core.FixedKLController(config.kl_coef))

    start_step = 0
    if config.resume:
        start_step = load_checkpoint(out, roles, optimizer, kl_ctl)
        log.warning("resuming %s from step %d", out, start_step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    train_log = CsvLog(out / "train_log.csv", keep_until_step=start_step if config.resume else None)
    eval_log = CsvLog(out / "eval.csv", keep_until_step=start_step if config.resume else None)
    sampler = _Sampler(train_prompts, config.seed)

    last_eval: dict[str, Any] = {}

    def run_eval(step: int) -> None:
        metrics, rows = evaluate(roles, tokenizer, eval_prompts, config, eval_reward_fn, oracle, eos_ids)
        eval_log.append({"step": step, **metrics})
        last_eval.update(step=step, metrics=metrics, rows=rows)
        with (out / "eval_samples.jsonl").open("a", encoding="utf-8") as handle:  # a few generations per eval
            for row in rows[:3]:
                handle.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        log.warning("eval step %d: %s", step, " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))

    if start_step == 0 or not eval_log.rows:
        run_eval(start_step)
    started, bad_in_a_row, step, warned_eos = time.time(), 0, start_step, False
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.time()
        prompts = sampler.batch(step - 1, prompts_per_step)
        batch = rollout(roles, tokenizer, prompts, samples_per_prompt, config, reward_fn, eos_ids,
                        generator_seed=config.seed * 1_000_003 + step, with_values=use_critic,
                        with_logprobs=with_logprobs)
        if not torch.isfinite(batch.raw_scores).all():
            raise UserError(f"step {step}: the reward is not finite for some responses (NaN/inf from the "
                            f"{'reward model' if config.reward == 'rm' else 'oracle'})")
        t_rollout = time.time() - t0
        if use_critic:
            metrics, skipped = ppo_update(roles, accelerator, optimizer, batch, kl_ctl.value, config, step)
        elif config.algo == "grpo":
            metrics, skipped = grpo_update(roles, accelerator, optimizer, batch, kl_ctl.value, config, step)
        else:
            metrics, skipped = rloo_update(roles, accelerator, optimizer, batch, kl_ctl.value, config)
        seq_kl = (batch.logprobs - batch.ref_logprobs).mul(batch.mask).sum(1)
        row = {
            "step": step,
            "objective/scores": batch.raw_scores.mean().item(),
            "objective/scores_penalized": batch.scores.mean().item(),
            "objective/kl": seq_kl.mean().item(),
            "objective/kl_coef": kl_ctl.value,
            "policy/entropy": core.masked_mean(batch.entropy, batch.mask).item(),
            **metrics,
            "response/length": batch.mask.sum(1).float().mean().item(),
            "response/finished": batch.finished.float().mean().item(),
            "time/rollout_s": t_rollout,
            "time/step_s": time.time() - t0,
            "skipped_updates": skipped,
        }
        train_log.append(row)
        if config.missing_eos_penalty and row["response/finished"] < 0.5 and not warned_eos:
            warned_eos = True
            log.warning("step %d: only %.0f%% of the responses end with EOS within --response-length %d, so "
                        "--missing-eos-penalty %.3g lowers most scores: the policy learns to stop early more than "
                        "the preference; raise --response-length or turn the penalty off", step,
                        100 * row["response/finished"], config.response_length, config.missing_eos_penalty)
        kl_ctl.update(row["objective/kl"], config.batch_size)
        if skipped:
            bad_in_a_row += 1
            log.warning("step %d: skipped %d update(s) with a non-finite loss or gradient", step, skipped)
            if bad_in_a_row >= config.max_bad_updates:
                raise UserError(f"non-finite loss or gradient in {bad_in_a_row} steps in a row (last: step "
                                f"{step}); lower --lr or --kl-coef, or check the reward")
        else:
            bad_in_a_row = 0
        log.info("step %d: score=%.3f kl=%.3f %.1fs", step, row["objective/scores"], row["objective/kl"],
                 row["time/step_s"])
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(out, roles, optimizer, step, kl_ctl, config)
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            run_eval(step)
        if config.max_steps_time is not None and time.time() - started > config.max_steps_time:
            log.warning("time budget of %.0f s reached after step %d", config.max_steps_time, step)
            break
    if last_eval.get("step") != step:  # the final evaluation, also the policy side of samples.jsonl
        run_eval(step)
    final_metrics, policy_rows = last_eval["metrics"], last_eval["rows"]
    save_checkpoint(out, roles, optimizer, step, kl_ctl, config)

    # ---- outputs: the policy, samples side by side with the reference, plots ----
    policy_dir = save_actor(roles, out / "policy", {
        "base_model": model_name, "algo": config.algo, "steps": step, "temperature": config.temperature,
        "response_length": config.response_length, "reward": config.reward, "rm": config.rm})
    ref_metrics, ref_rows = evaluate(roles, tokenizer, eval_prompts, config, eval_reward_fn, oracle, eos_ids,
                                     reference=True)
    samples = []
    for ref, pol in zip(ref_rows, policy_rows):
        samples.append({"prompt": pol["prompt"],
                        "reference": {k: v for k, v in ref.items() if k != "prompt"},
                        "policy": {k: v for k, v in pol.items() if k != "prompt"}})
    write_jsonl(out / "samples.jsonl", samples)
    plots = write_plots(out, train_log.rows, eval_log.rows)
    merged = None
    if config.save_merged:
        merged = merge_policy(policy_dir, out / "merged")
    return {
        "steps": step,
        "final": final_metrics,
        "reference": ref_metrics,
        "out": str(out),
        "policy": str(policy_dir),
        "merged": str(merged) if merged else None,
        "train_log": str(out / "train_log.csv"),
        "eval_log": str(out / "eval.csv"),
        "samples": str(out / "samples.jsonl"),
        "eval_samples": str(out / "eval_samples.jsonl"),
        "plots": [str(p) for p in plots],
    }


def merge_policy(policy_dir: Path, target: Path) -> Path:
    """Base model with the actor adapter merged in, saved as a plain HF model folder (+ tokenizer)."""
    from policy.roles import load_policy

    model, tokenizer, _ = load_policy(policy_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
