"""`rlhf ppo` (train the policy with PPO, RLOO or GRPO), `rlhf dpo` (train it directly on preferences) and
`rlhf sample` (policy vs reference side by side)."""

from __future__ import annotations

import json

from rlhf.errors import UserError


def add_commands(sub) -> None:
    from policy.config import PPOConfig
    from policy.dpo import DPOConfig
    from rlhf.config_args import add_config_arguments, positive_int
    from rlhf.hardware import DTYPE_NAMES

    p = sub.add_parser("ppo", help="fine-tune the policy against the reward model (PPO, RLOO or GRPO, KL to the "
                                   "SFT model)",
                       description="Fine-tune the SFT model with PPO (or RLOO, GRPO) against a reward model or an "
                                   "oracle, with a KL penalty to the frozen reference. Actor, critic, reward "
                                   "model and reference share one base model in memory (LoRA adapters). A flag "
                                   "that takes a number or 'off' leaves the setting unset with 'off'.")
    add_config_arguments(p, PPOConfig, required=("prompts", "out"))
    p.set_defaults(func=run_ppo)

    p = sub.add_parser("dpo", help="fine-tune the policy directly on rankings or pairs with DPO (no reward model)",
                       description="Direct preference optimisation (Rafailov et al. 2023; or IPO) of the SFT model + "
                                   "a LoRA adapter on the rankings of `rlhf export` or TRL-format pairs. K-wise: a "
                                   "ranking's K completions are read once and all its pairs are taken from them. "
                                   "The reference is the same base model with the adapter disabled; its "
                                   "log-probabilities are computed once, before training. A flag that takes a "
                                   "number or 'off' leaves the setting unset with 'off'.")
    add_config_arguments(p, DPOConfig, required=("data", "out"))
    p.set_defaults(func=run_dpo)

    s = sub.add_parser("sample", help="generate from a trained policy next to the reference (SFT) model",
                       description="Sample completions from a trained policy (`rlhf ppo` OUT/policy) and from "
                                   "the reference model for the same prompts, and print them side by side.")
    s.add_argument("--policy", required=True, help="policy folder written by `rlhf ppo` (OUT/policy)")
    s.add_argument("--prompts", required=True, help="JSONL prompt file")
    s.add_argument("--n", type=positive_int, default=4, help="number of prompts to sample (default 4)")
    s.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the one the policy was trained at)")
    s.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="completion length cap (default: the training response length)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    s.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="the weights' dtype; auto: bfloat16 where the device computes it natively, else float32 "
                        "(default: auto)")
    s.set_defaults(func=run_sample)


def run_ppo(args) -> None:
    from policy.config import PPOConfig
    from policy.trainer import train_policy
    from rlhf.config_args import config_from_args, is_main_process

    summary = train_policy(config_from_args(PPOConfig, args))
    if not is_main_process():  # under `accelerate launch` every process returns the summary; one prints it
        return
    final = summary["final"]
    shown = " ".join(f"{k}={v:.3g}" for k, v in final.items() if isinstance(v, (int, float)) and k != "step")
    print(f"trained {summary['steps']} steps: {shown}")
    print(f"policy: {summary['policy']}  logs: {summary['train_log']}, {summary['eval_log']}  "
          f"samples: {summary['samples']}")


def run_dpo(args) -> None:
    from policy.dpo import DPOConfig, train_dpo
    from rlhf.config_args import config_from_args

    summary = train_dpo(config_from_args(DPOConfig, args))
    final = summary["final"]
    shown = " ".join(f"{k}={v:.3g}" for k, v in final.items() if isinstance(v, (int, float)) and k != "pairs")
    print(f"trained {summary['steps']} steps on {summary['train_rankings']} rankings ({summary['train_pairs']} pairs, "
          f"{summary['pairs_per_second']:.2f} pairs/s); held-out: {shown or 'none'}")
    print(f"policy: {summary['policy']}  logs: {summary['train_log']}, {summary['eval_log']}"
          + (f"  samples: {summary['samples']}" if summary["samples"] else ""))


def run_sample(args) -> None:
    import torch

    from policy.roles import load_policy
    from rlhf.generation import SamplingParams, decode_responses, sample_batch
    from rlhf.hardware import setup_compute
    from rlhf.models import eos_token_ids
    from rlhf.prompts import read_prompts
    from rlhf.records import prompt_json, transcript

    prompts = [p for _, p in read_prompts(args.prompts, args.n)]
    model, tokenizer, meta = load_policy(args.policy, dtype=getattr(torch, setup_compute(args.dtype)))
    temperature = args.temperature or meta.get("temperature", 0.7)
    if temperature <= 0:
        raise UserError("--temperature must be > 0")
    params = SamplingParams(temperature, 1.0, args.max_new_tokens or meta.get("response_length", 64))
    eos = eos_token_ids(model, tokenizer)
    _, policy_ids = sample_batch(model, tokenizer, prompts, 1, params, generator_seed=args.seed)
    with model.disable_adapter():
        _, ref_ids = sample_batch(model, tokenizer, prompts, 1, params, generator_seed=args.seed)
    policy_texts = [t for t, _ in decode_responses(tokenizer, policy_ids, eos)]
    ref_texts = [t for t, _ in decode_responses(tokenizer, ref_ids, eos)]
    for prompt, ref, pol in zip(prompts, ref_texts, policy_texts):
        if args.json:
            print(json.dumps({"prompt": prompt_json(prompt), "reference": ref, "policy": pol}, ensure_ascii=False))
        else:
            print(f"=== {transcript(prompt).strip()}\n--- reference:\n{ref}\n--- policy:\n{pol}\n")
