"""`rlhf ppo` (train the policy with PPO, RLOO or GRPO) and `rlhf sample` (policy vs reference side by side)."""

from __future__ import annotations

import argparse
import json

from rlhf.errors import UserError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _penalty(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def add_commands(sub) -> None:
    from policy.config import ALGO_DEFAULTS, GRPO_LOSS_NORMS, PPOConfig

    d = PPOConfig()
    by_algo = {key: ", ".join(f"{algo} {values[key]}" for algo, values in ALGO_DEFAULTS.items() if algo in algos)
               for key, algos in (("kl_coef", ALGO_DEFAULTS), ("ppo_epochs", ("ppo", "grpo")))}
    p = sub.add_parser("ppo", help="fine-tune the policy against the reward model (PPO, RLOO or GRPO, KL to the "
                                   "SFT model)",
                       description="Fine-tune the SFT model with PPO (or RLOO, GRPO) against a reward model or an "
                                   "oracle, with a KL penalty to the frozen reference. Actor, critic, reward "
                                   "model and reference share one base model in memory (LoRA adapters).")
    p.add_argument("--rm", help="reward model directory (from `rlhf train-rm`); not needed with --reward ORACLE")
    p.add_argument("--prompts", required=True, help="JSONL prompt file, one {\"prompt\": ...} per line")
    p.add_argument("--out", required=True, help="output folder (logs, plots, samples, policy/, checkpoint/)")
    p.add_argument("--algo", choices=list(ALGO_DEFAULTS), default=d.algo,
                   help="ppo (default: critic + GAE), rloo (leave-one-out baseline) or grpo (group-normalised "
                        "advantages, KL as a loss term)")
    p.add_argument("--reward", default=d.reward,
                   help="'rm' (default) or an oracle replacing the RM: a built-in one (descriptive, sentiment, "
                        "alliteration, ...: rlhf/oracles.py) or module:function")
    p.add_argument("--model", default=None, help="base SFT model (default: the RM's base model, else 'default')")
    p.add_argument("--kl-coef", type=float, default=None,
                   help=f"KL weight beta (default: {by_algo['kl_coef']})")
    p.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default=None,
                   help="per-token KL estimate: ppo (in the reward) k1 = log p/p_ref by default, or k2/k3; rloo "
                        "k1 only; grpo (in the loss) k3 by default, or k2")
    p.add_argument("--target-kl", type=float, default=None,
                   help="adapt beta to keep the KL per response near T nats (Ziegler et al.; default: fixed beta)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"RL steps (default {d.steps})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"rollouts per step (default {d.batch_size}; RLOO, GRPO: a multiple of --rloo-k, --grpo-k)")
    p.add_argument("--response-length", type=_positive_int, default=d.response_length,
                   help=f"most new tokens per response (default {d.response_length})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature, also used for the logprobs (default {d.temperature})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--ppo-epochs", type=_positive_int, default=None,
                   help=f"PPO/GRPO passes over each batch (default: {by_algo['ppo_epochs']})")
    p.add_argument("--minibatch-size", type=_positive_int, default=None,
                   help="rollouts per gradient step (default: the whole batch)")
    p.add_argument("--micro-batch-size", type=_positive_int, default=d.micro_batch_size,
                   help=f"rollouts per forward/backward pass, gradients accumulate (default {d.micro_batch_size}; "
                        f"lower it to save memory)")
    p.add_argument("--rloo-k", type=_positive_int, default=d.rloo_k,
                   help=f"RLOO samples per prompt (default {d.rloo_k})")
    p.add_argument("--grpo-k", type=_positive_int, default=d.grpo_k,
                   help=f"GRPO samples per prompt, the group (default {d.grpo_k})")
    p.add_argument("--grpo-scale-rewards", action=argparse.BooleanOptionalAction, default=d.grpo_scale_rewards,
                   help="GRPO: divide the group-centred rewards by the group's std (default on; Dr. GRPO: "
                        "--no-grpo-scale-rewards)")
    p.add_argument("--grpo-loss-norm", choices=list(GRPO_LOSS_NORMS), default=d.grpo_loss_norm,
                   help=f"GRPO: average the token losses per response ('sequence', default), over all tokens "
                        f"('token') or divide their sum by responses x --response-length ('constant', Dr. GRPO)")
    p.add_argument("--missing-eos-penalty", type=_penalty, default=d.missing_eos_penalty,
                   help="subtracted from the score of a response cut off without EOS, e.g. 1.0 (default off; "
                        "use it only when most responses end within --response-length)")
    p.add_argument("--lora-r", type=_positive_int, default=d.lora_r, help=f"actor LoRA rank (default {d.lora_r})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"evaluate on held-out prompts every N steps (default {d.eval_every}; 0: start and end only)")
    p.add_argument("--eval-prompts", default=None,
                   help="held-out prompt file (default: hold out --eval-fraction of --prompts)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help=f"fraction of --prompts held out for evaluation (default {d.eval_fraction})")
    p.add_argument("--eval-size", type=_positive_int, default=d.eval_size,
                   help=f"most held-out prompts per evaluation (default {d.eval_size})")
    p.add_argument("--oracle", default=None, help="also score evaluation samples with this oracle (e.g. alliteration)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a resumable checkpoint every N steps (default 0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--save-merged", action="store_true",
                   help="also save the base model with the policy adapter merged into OUT/merged")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run_ppo)

    s = sub.add_parser("sample", help="generate from a trained policy next to the reference (SFT) model",
                       description="Sample completions from a trained policy (`rlhf ppo` OUT/policy) and from "
                                   "the reference model for the same prompts, and print them side by side.")
    s.add_argument("--policy", required=True, help="policy folder written by `rlhf ppo` (OUT/policy)")
    s.add_argument("--prompts", required=True, help="JSONL prompt file")
    s.add_argument("--n", type=_positive_int, default=4, help="number of prompts to sample (default 4)")
    s.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the one the policy was trained at)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="completion length cap (default: the training response length)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    s.set_defaults(func=run_sample)


def config_from_args(args):
    from policy.config import PPOConfig

    return PPOConfig(
        prompts=args.prompts, out=args.out, rm=args.rm, reward=args.reward, model=args.model, algo=args.algo,
        steps=args.steps, batch_size=args.batch_size, response_length=args.response_length,
        temperature=args.temperature, lr=args.lr, kl_coef=args.kl_coef, kl_estimator=args.kl_estimator,
        target_kl=args.target_kl, ppo_epochs=args.ppo_epochs, minibatch_size=args.minibatch_size,
        micro_batch_size=args.micro_batch_size,
        rloo_k=args.rloo_k, grpo_k=args.grpo_k, grpo_scale_rewards=args.grpo_scale_rewards,
        grpo_loss_norm=args.grpo_loss_norm, missing_eos_penalty=args.missing_eos_penalty, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, eval_every=args.eval_every, eval_prompts=args.eval_prompts,
        eval_fraction=args.eval_fraction, eval_size=args.eval_size, oracle=args.oracle,
        checkpoint_every=args.checkpoint_every, resume=args.resume, save_merged=args.save_merged, seed=args.seed)


def run_ppo(args) -> None:
    from policy.trainer import train_policy

    summary = train_policy(config_from_args(args))
    final = summary["final"]
    shown = " ".join(f"{k}={v:.3g}" for k, v in final.items() if isinstance(v, (int, float)) and k != "step")
    print(f"trained {summary['steps']} steps: {shown}")
    print(f"policy: {summary['policy']}  logs: {summary['train_log']}, {summary['eval_log']}  "
          f"samples: {summary['samples']}")


def run_sample(args) -> None:
    from policy.roles import load_policy
    from rlhf.generation import SamplingParams, decode_responses, sample_batch
    from rlhf.models import eos_token_ids
    from rlhf.prompts import read_prompts

    prompts = [p for _, p in read_prompts(args.prompts, args.n)]
    model, tokenizer, meta = load_policy(args.policy)
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
            print(json.dumps({"prompt": prompt, "reference": ref, "policy": pol}, ensure_ascii=False))
        else:
            print(f"=== {prompt}\n--- reference:\n{ref}\n--- policy:\n{pol}\n")
