"""Rollouts: responses sampled by the actor (or the reference), laid out for the forward passes, and
everything the update needs computed on them without gradients.

`sample` is the one sampling path, shared by training (`rollout`) and held-out evaluation
(`policy.evaluate`); `reward_function` is the one scoring path (the reward model or an oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from policy import core
from policy.config import PPOConfig
from policy.roles import ACTOR, PolicyRoles
from rlhf.records import last_user_turn


@dataclass
class Samples:
    """Responses to prompts, every tensor on the model's device. B = prompts x samples per prompt."""

    prompts: list[str]       # [B] the prompt of each response (prompt i repeated for its samples)
    texts: list[str]         # [B] the decoded responses, cut at the first EOS
    input_ids: Tensor        # [B, P+T] prompt (left-padded) + response (right-padded)
    attention_mask: Tensor   # [B, P+T]
    responses: Tensor        # [B, T]
    mask: Tensor             # [B, T] 1 on real response tokens, the first EOS included
    lengths: Tensor          # [B] response tokens before the first EOS
    finished: Tensor         # [B] bool: the response ended with EOS
    logits: Tensor | None = None  # [B, T, V] the sampler's raw logits at each response position (`with_logits`)

    @property
    def response_length(self) -> int:
        return self.responses.shape[1]


@dataclass(kw_only=True)
class Rollout(Samples):
    """Samples of the actor and what was computed on them without gradients (rollout time)."""

    ref_logprobs: Tensor                  # [B, T] reference, at the sampling temperature
    scores: Tensor                        # [B] reward before the KL term (RM or oracle), after the EOS penalty
    raw_scores: Tensor                    # [B] before the EOS penalty
    logprobs: Tensor | None = None        # [B, T] actor at sampling time; None: left to the update's forward pass
    entropy: Tensor | None = None         # [B, T] actor's entropy, with `logprobs`
    values: Tensor | None = None          # [B, T] critic (PPO)


RewardFn = Callable[[PolicyRoles, list[str], list[str], Tensor], Tensor]
"""(roles, prompts, texts, device) -> scores [B] on `device`."""


def reward_function(config: PPOConfig, tokenizer) -> RewardFn:
    """The run's reward: the reward model (`config.reward == "rm"`) or the oracle it names."""
    if config.reward != "rm":
        from rlhf.oracles import load_oracle

        oracle = load_oracle(config.reward)
        return lambda roles, prompts, texts, device: torch.tensor(
            [float(oracle(last_user_turn(p), t)) for p, t in zip(prompts, texts)], dtype=torch.float32, device=device)

    from reward_model.model import encode_sample_ids, score_samples

    def rm_scores(roles, prompts, texts, device):
        # The RM scores the decoded text re-encoded exactly as in its training (prompt template, EOS,
        # its own max_length truncation), not the sampled ids: decoding and re-tokenizing can change
        # the ids (another BPE split, a stripped newline), and the RM has only seen the re-encoded form.
        samples = [encode_sample_ids(tokenizer, p, t, roles.rm_max_length) for p, t in zip(prompts, texts)]
        return torch.tensor(score_samples(roles.scores, samples, tokenizer.pad_token_id, device,
                                          batch_size=len(samples)), dtype=torch.float32, device=device)

    return rm_scores


@torch.no_grad()
def sample(roles: PolicyRoles, tokenizer, prompts: list[str], samples_per_prompt: int, config: PPOConfig,
           eos_ids: list[int], generator_seed: int, reference: bool = False, with_logits: bool = False) -> Samples:
    """Sample `samples_per_prompt` responses per prompt from the actor (`reference=True`: the frozen
    reference) at `config.temperature`, and mask them: the real response is everything up to and including
    the first EOS (stopping is an action too); after it, generate's padding, masked out everywhere (Huang et
    al. 2024, "truncate at EOS"). `sample_batch` returns CPU tensors: they are moved to the model's device
    here, so a GPU model never meets them. `with_logits=True` keeps the sampler's own logits, so the
    rollout's logprobs need no second forward pass (as TRL's PPOTrainer takes them)."""
    from rlhf.generation import SamplingParams, completion_lengths, decode_responses, sample_batch

    # top_p stays 1: the logprobs are of the plain temperature-scaled softmax, which is what the tokens
    # were sampled from only without nucleus truncation.
    params = SamplingParams(temperature=config.temperature, top_p=1.0, max_new_tokens=config.response_length)
    with roles.reference if reference else roles.actor():
        encoded, responses, *logits = sample_batch(roles.model, tokenizer, prompts, samples_per_prompt, params,
                                                   generator_seed=generator_seed, with_logits=with_logits)
    texts = [t for t, _ in decode_responses(tokenizer, responses, eos_ids)]
    device = next(roles.parameters()).device
    responses = responses.to(device)
    lengths, finished = completion_lengths(responses, eos_ids)
    mask = (torch.arange(responses.shape[1], device=device)[None] < (lengths + finished.long())[:, None]).long()
    query = encoded.input_ids.to(device).repeat_interleave(samples_per_prompt, 0)
    query_mask = encoded.attention_mask.to(device).repeat_interleave(samples_per_prompt, 0)
    return Samples([p for p in prompts for _ in range(samples_per_prompt)], texts,
                   torch.cat([query, responses], dim=1), torch.cat([query_mask, mask], dim=1), responses, mask,
                   lengths, finished, logits[0] if logits else None)


@torch.no_grad()
def rollout(roles: PolicyRoles, tokenizer, prompts: list[str], samples_per_prompt: int, config: PPOConfig,
            reward_fn: RewardFn, eos_ids: list[int], generator_seed: int, with_values: bool,
            with_logprobs: bool = True) -> Rollout:
    """Steps 1-3 of the loop (policy/trainer.py): sample with the actor; score (RM or oracle) with the
    missing-EOS penalty; logprobs of the actor and the reference at the sampling temperature, entropy, values.
    with_logprobs=False leaves the actor's logprobs to the update's own forward pass (RLOO's and
    single-update GRPO's on-policy step computes exactly the same numbers, so a second pass would be wasted)."""
    # In float32 the sampler's logits are an actor forward's up to float error (1e-5 nats), which saves that
    # forward. In bfloat16 the KV-cache path and a full pass round differently (up to 0.3 nats per token on
    # SmolLM2): the update's ratio would read that as a policy change and clip it, so the logprobs then come
    # from a forward pass like the update's own (bit-identical whatever the micro-batch).
    float32 = roles.model.get_input_embeddings().weight.dtype == torch.float32
    s = sample(roles, tokenizer, prompts, samples_per_prompt, config, eos_ids, generator_seed,
               with_logits=with_logprobs and float32)
    T = s.response_length
    logprobs = entropy = None
    if with_logprobs:
        logits = s.logits if float32 else roles.response_logits(ACTOR, s.input_ids, s.attention_mask, T)
        logprobs = core.logprobs_from_logits(logits, s.responses, config.temperature)
        entropy = core.entropy_from_logits(logits, config.temperature)
        del logits
    s.logits = None
    ref_logits = roles.response_logits(None, s.input_ids, s.attention_mask, T)
    ref_logprobs = core.logprobs_from_logits(ref_logits, s.responses, config.temperature)
    del ref_logits
    values = roles.values(s.input_ids, s.attention_mask, T) if with_values else None
    raw_scores = reward_fn(roles, s.prompts, s.texts, s.input_ids.device)
    scores = core.apply_missing_eos_penalty(raw_scores, s.finished, config.missing_eos_penalty)
    return Rollout(**{f.name: getattr(s, f.name) for f in fields(Samples)}, ref_logprobs=ref_logprobs,
                   scores=scores, raw_scores=raw_scores, logprobs=logprobs, entropy=entropy, values=values)
