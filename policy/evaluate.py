"""Held-out evaluation of the policy (or of the reference): one response per held-out prompt, its reward,
its KL to the reference, and the diversity of all responses. Evaluation samples are written as
`rlhf.records.ScoredSample` rows, with the per-sample measures beside the reward."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policy import core
from policy.config import PPOConfig
from policy.roles import ACTOR, PolicyRoles
from policy.rollout import RewardFn, sample
from rlhf.records import ScoredSample, last_user_turn
from rlhf.seeds import EVAL_SAMPLES, SAMPLING, derived_seed


@torch.no_grad()
def evaluate(roles: PolicyRoles, tokenizer, prompts: list[str], config: PPOConfig, reward_fn: RewardFn,
             oracle: Callable[[str, str], float] | None, eos_ids: list[int], reference: bool = False,
             chunk: int = 16) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample one response per prompt (the same seed every time, so evaluations differ only by the policy;
    `reference=True`: from the reference) and measure KL to the reference (mean per-response sum of k1),
    entropy, distinct-1/2, length, the run's reward (`objective/rm_score` when it is the reward model)
    and the oracle's score. Returns (metrics, rows): one ScoredSample row per prompt, reward = the run's
    reward, plus "kl" and, with an oracle, "oracle"."""
    kls, entropies, rewards, lengths, finished, rows = [], [], [], [], [], []
    for start in range(0, len(prompts), chunk):
        s = sample(roles, tokenizer, prompts[start:start + chunk], 1, config, eos_ids,
                   generator_seed=derived_seed(config.seed, EVAL_SAMPLES + start, SAMPLING), reference=reference)
        T = s.response_length
        ref_logits = roles.response_logits(None, s.input_ids, s.attention_mask, T)
        ref_logp = core.logprobs_from_logits(ref_logits, s.responses, config.temperature)
        if reference:  # sampled from the reference: its own entropy, KL 0
            logits, logp = ref_logits, ref_logp
        else:
            logits = roles.response_logits(ACTOR, s.input_ids, s.attention_mask, T)
            logp = core.logprobs_from_logits(logits, s.responses, config.temperature)
        entropies += core.masked_mean(core.entropy_from_logits(logits, config.temperature), s.mask, dim=1).tolist()
        del logits, ref_logits
        kls += ((logp - ref_logp) * s.mask).sum(1).tolist()
        rewards += reward_fn(roles, s.prompts, s.texts, s.input_ids.device).tolist()
        lengths += s.lengths.tolist()
        finished += s.finished.tolist()
        rows += [ScoredSample(p, t, r).to_dict() for p, t, r in zip(s.prompts, s.texts, rewards[-len(s.texts):])]
    texts = [r["completion"] for r in rows]
    metrics = {
        "objective/kl": _mean(kls),
        "policy/entropy": _mean(entropies),
        "eval/distinct_1": core.distinct_n(texts, 1),
        "eval/distinct_2": core.distinct_n(texts, 2),
        "eval/length": _mean(lengths),
        "eval/finished": _mean(finished),
    }
    if config.reward == "rm":
        metrics["objective/rm_score"] = _mean(rewards)
    for row, kl in zip(rows, kls):
        row["kl"] = kl
    if oracle is not None:
        for row, prompt in zip(rows, prompts):  # one row per prompt, in order
            row["oracle"] = float(oracle(last_user_turn(prompt), row["completion"]))
        metrics["objective/oracle"] = _mean([row["oracle"] for row in rows])
    return metrics, rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def append_eval_samples(path: Path, step: int, rows: list[dict[str, Any]], count: int = 3) -> None:
    """A few of an evaluation's samples, tagged with the step, appended to OUT/eval_samples.jsonl."""
    with Path(path).open("a", encoding="utf-8") as handle:
        for row in rows[:count]:
            handle.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")


def write_side_by_side(path: Path, reference_rows: list[dict], policy_rows: list[dict]) -> None:
    """OUT/samples.jsonl: per held-out prompt, {"prompt", "reference": {...}, "policy": {...}}, each side
    its evaluation row without the prompt."""
    from rlhf.jsonl import write_jsonl

    write_jsonl(path, ({"prompt": pol["prompt"],
                        "reference": {k: v for k, v in ref.items() if k != "prompt"},
                        "policy": {k: v for k, v in pol.items() if k != "prompt"}}
                       for ref, pol in zip(reference_rows, policy_rows)))
