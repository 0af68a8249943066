"""`rlhf train-rm`, `rlhf eval-rm`, `rlhf score`. Heavy imports happen inside the handlers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhf.errors import UserError


def add_commands(sub) -> None:
    from reward_model.config import RewardTrainingConfig as C  # no torch import: `rlhf --help` stays fast

    defaults = C(data="", out="")
    p = sub.add_parser("train-rm", help="train a LoRA reward model on rankings (or preference pairs)",
                       description="Train a reward model: the SFT model + LoRA + a linear score head, with "
                                   "InstructGPT's K-wise ranking loss (each ranking's K completions scored "
                                   "once, all C(K,2) pairs from those scores).")
    p.add_argument("--data", required=True,
                   help="folder with rankings.jsonl (rows with \"split\": \"test\" are held out), "
                        "or train.jsonl/test.jsonl pairs; or one JSONL file")
    p.add_argument("--out", required=True, help="output folder for the reward model, log, curves, checkpoints")
    p.add_argument("--model", default=defaults.model,
                   help="base (SFT) model: 'default' (SmolLM2-135M-Instruct), a local folder or a HF id")
    p.add_argument("--lora-r", type=int, default=defaults.lora_r, help=f"LoRA rank (default {defaults.lora_r})")
    p.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha,
                   help=f"LoRA alpha (default {defaults.lora_alpha})")
    p.add_argument("--epochs", type=int, default=defaults.epochs,
                   help=f"passes over the training rankings (default {defaults.epochs}, for a few hundred "
                        f"rankings; InstructGPT trains 1 on ~33k prompts)")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate, cosine-decayed to 10%% (default {defaults.lr})")
    p.add_argument("--batch-rankings", type=int, default=defaults.batch_rankings,
                   help=f"rankings per step, all their completions in one forward pass "
                        f"(default {defaults.batch_rankings})")
    p.add_argument("--max-length", type=int, default=defaults.max_length,
                   help=f"tokens per sample; longer prompts are cut from the left (default {defaults.max_length})")
    p.add_argument("--readout-layer", type=float, default=defaults.readout_layer,
                   help=f"where the score head reads: a fraction of the depth (0.5 = middle layer; the layers "
                        f"above are not run), a layer number, or 0 = last layer (default {defaults.readout_layer})")
    p.add_argument("--readout-pool", choices=["mean", "last"], default=defaults.readout_pool,
                   help=f"mean over the completion's tokens, or the last token (InstructGPT) "
                        f"(default {defaults.readout_pool})")
    p.add_argument("--head-lr-multiplier", type=float, default=defaults.head_lr_multiplier,
                   help=f"the score head's learning rate is LR times this (default {defaults.head_lr_multiplier})")
    p.add_argument("--pair-weighting", choices=["pair", "ranking"], default=defaults.pair_weighting,
                   help=f"every comparison weighs the same (TRL), or every ranking (InstructGPT's 1/C(K,2)) "
                        f"(default {defaults.pair_weighting})")
    p.add_argument("--margin", type=float, default=defaults.margin,
                   help="Llama-2 margin: subtract MARGIN x rank gap inside the sigmoid (default 0: off)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help=f"save a resumable checkpoint every N steps, keeping the last 2 "
                        f"(default {defaults.checkpoint_every}; 0 = never)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (head init, data order)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=defaults.dtype,
                   help=f"backbone weights' dtype; LoRA, head and loss stay float32 (default {defaults.dtype})")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON")
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval-rm", help="accuracy, margin and calibration of a reward model on held-out data",
                       description="Evaluate a reward model on rankings or pairs: pairwise accuracy, mean "
                                   "margin, ECE (10 bins), and the human agreement ceiling where several "
                                   "annotators judged the same comparison.")
    p.add_argument("--rm", required=True, help="reward model folder written by `rlhf train-rm`")
    p.add_argument("--data", required=True, help="rankings JSONL (rankings.jsonl rows) or pairs JSONL")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("score", help="score {prompt, completion} JSONL with a reward model",
                       description="Read {\"prompt\", \"completion\"} JSON lines, write {prompt, completion, "
                                   "reward} lines.")
    p.add_argument("--rm", required=True, help="reward model folder written by `rlhf train-rm`")
    p.add_argument("--input", default="-", help="input JSONL file, or - for stdin (default -)")
    p.add_argument("--out", default="-", help="output JSONL file (written atomically), or - for stdout (default -)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    p.set_defaults(func=run_score)


def run_train(args) -> None:
    from reward_model.train import RewardTrainingConfig, train_reward_model

    config = RewardTrainingConfig(
        data=args.data, out=args.out, model=args.model, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        epochs=args.epochs, lr=args.lr, batch_rankings=args.batch_rankings, max_length=args.max_length,
        margin=args.margin, checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
        dtype=args.dtype, readout_layer=args.readout_layer, readout_pool=args.readout_pool,
        head_lr_multiplier=args.head_lr_multiplier, pair_weighting=args.pair_weighting)
    summary = train_reward_model(config)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"trained on {summary['train_rankings']} rankings ({summary['train_pairs']} pairs), "
          f"{summary['steps']} steps in {summary['seconds']} s")
    print(f"reward bias {summary['reward_bias']:+.4f} (SFT completions now mean 0); "
          f"per-prompt spread of mean reward {summary['per_prompt_mean_std']:.4f}")
    if "test" in summary:
        t = summary["test"]
        print(f"held-out: accuracy {t['accuracy']:.3f} on {t['pairs']} pairs, mean margin "
              f"{t['mean_margin']:.3f}, ECE {t['ece']:.3f}")
    print(f"reward model saved to {summary['rm_dir']} (curves: {summary['curves']})")


def run_eval(args) -> None:
    from reward_model.evaluate import evaluate_reward_model
    from reward_model.model import load_reward_model

    rm, tokenizer = load_reward_model(args.rm)
    result = evaluate_reward_model(rm, tokenizer, args.data)
    if args.json:
        print(json.dumps(result))
        return
    if not result["pairs"]:
        raise UserError(f"{args.data}: no comparable pairs (all ties or identical texts)")
    print(f"pairs            {result['pairs']}")
    print(f"accuracy         {result['accuracy']:.4f}")
    print(f"mean margin      {result['mean_margin']:.4f}")
    print(f"ECE (10 bins)    {result['ece']:.4f}")
    if "human_agreement" in result:
        print(f"human agreement  {result['human_agreement']:.4f}  (model on the same "
              f"{result['multi_annotated_judgements']} judgements: {result['model_agreement_same_judgements']:.4f})")
    print("accuracy by rank gap (adjacent ranks are the hard comparisons):")
    for name, g in result["by_rank_gap"].items():
        print(f"  {name:18s} {g['accuracy']:.4f}  ({g['pairs']} pairs)")
    print(f"accuracy by length (\"prefer the longer one\" alone scores {result['longer_wins']:.4f}):")
    for name, g in result["by_length"].items():
        print(f"  {name:18s} {g['accuracy']:.4f}  ({g['pairs']} pairs)")
    print("calibration (confidence max(p, 1-p) -> how often right):")
    for row in result["reliability"]:
        print(f"  {row['confidence']:18s} {row['accuracy']:.4f}  ({row['pairs']} pairs)")


def _read_samples(source: str) -> list[tuple[str, str]]:
    from rlhf.jsonl import parse_jsonl, read_jsonl

    name, rows = ("<stdin>", parse_jsonl(sys.stdin, "<stdin>")) if source == "-" else (source, read_jsonl(source))
    samples = []
    for line_no, obj in rows:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{name}:{line_no}: 'prompt' must be a non-empty string")
        if not isinstance(completion, str):
            raise UserError(f"{name}:{line_no}: 'completion' must be a string")
        samples.append((prompt, completion))
    return samples


def run_score(args) -> None:
    from reward_model.model import load_reward_model, score_texts
    from rlhf.jsonl import write_jsonl
    from rlhf.records import ScoredSample

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.input != "-" and not Path(args.input).is_file():
        raise UserError(f"{args.input}: no such file")
    samples = _read_samples(args.input)
    rm, tokenizer = load_reward_model(args.rm)
    rewards = score_texts(rm, tokenizer, [p for p, _ in samples], [c for _, c in samples],
                          batch_size=args.batch_size, max_length=rm.meta["max_length"])
    rows = (ScoredSample(p, c, r).to_dict() for (p, c), r in zip(samples, rewards))
    if args.out == "-":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        count = write_jsonl(args.out, rows)
        print(f"scored {count} samples -> {args.out}", file=sys.stderr)
