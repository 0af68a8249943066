"""`rlhf train-rm`, `rlhf eval-rm`, `rlhf score`. Heavy imports happen inside the handlers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.records import Prompt


def add_commands(sub) -> None:
    from reward_model.config import RewardTrainingConfig  # no torch import: `rlhf --help` stays fast
    from rlhf.config_args import add_config_arguments, positive_int

    p = sub.add_parser("train-rm", help="train a LoRA reward model on rankings (or preference pairs)",
                       description="Train a reward model: the SFT model + LoRA + a linear score head, with "
                                   "InstructGPT's K-wise ranking loss (each ranking's K completions scored "
                                   "once, all C(K,2) pairs from those scores).")
    add_config_arguments(p, RewardTrainingConfig)
    p.add_argument("--json", action="store_true", help="print the training summary as JSON")
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval-rm", help="accuracy, margin and calibration of a reward model on held-out data",
                       description="Evaluate a reward model on rankings or pairs: pairwise accuracy, mean "
                                   "margin, ECE (10 bins), the accuracy per subset where rows name one (a "
                                   "'subset' column, as in RewardBench: each subset, their mean, the overall "
                                   "figure), and the human agreement ceiling where several annotators judged the "
                                   "same comparison.")
    p.add_argument("--rm", required=True, help="reward model folder written by `rlhf train-rm`")
    p.add_argument("--data", required=True,
                   help="rankings or pairs (texts or conversations; an optional 'subset' column): a "
                        ".jsonl/.json/.parquet/.csv file, a folder from `rlhf export` or saved with save_to_disk, "
                        "or a hub dataset id")
    p.add_argument("--data-split", default=None, metavar="SPLIT",
                   help="evaluate only this split (e.g. test: the rows an export holds out); default: every row")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    _add_scoring_dtype(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("score", help="score {prompt, completion} JSONL with a reward model",
                       description="Read {\"prompt\", \"completion\"} JSON lines (the prompt a string or a "
                                   "conversation of {role, content} messages ending in a user turn), write {prompt, "
                                   "completion, reward} lines.")
    p.add_argument("--rm", required=True, help="reward model folder written by `rlhf train-rm`")
    p.add_argument("--input", default="-", help="input JSONL file, or - for stdin (default -)")
    p.add_argument("--out", default="-", help="output JSONL file (written atomically), or - for stdout (default -)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples per forward pass (default 16)")
    _add_scoring_dtype(p)
    p.set_defaults(func=run_score)


def _add_scoring_dtype(p) -> None:
    from rlhf.hardware import DTYPE_NAMES

    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="the backbone's dtype; auto: the one it was trained in, but float32 where this device has "
                        "no bf16 units; float32 gives the rewards of the folder `rlhf export-model` writes "
                        "(default: auto)")


def run_train(args) -> None:
    from reward_model.config import RewardTrainingConfig
    from reward_model.train import train_reward_model
    from rlhf.config_args import config_from_args, is_main_process

    config = config_from_args(RewardTrainingConfig, args)
    config.check()
    summary = train_reward_model(config)
    if not is_main_process():  # under `accelerate launch` every process returns the summary; one prints it
        return
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"trained on {summary['train_rankings']} rankings ({summary['train_pairs']} pairs), "
          f"{summary['steps']} steps in {summary['seconds']} s")
    readout = summary["readout"]
    search = summary.get("readout_search")
    how = (f"chosen by frozen probes, cross-validated accuracy {search['cv_accuracy']:.3f} on {search['pairs']} pairs"
           if search else "as asked")
    print(f"read-out: layer {readout['layer'] or 'last'}, {readout['pool']} ({how})")
    if "validation" in summary:
        v = summary["validation"]
        print(f"validation ({v['rankings']} rankings): best scale-free loss {v['best_loss']:.4f} at epoch "
              f"{v['best_epoch']}{', stopped early' if v['stopped_early'] else ''}; those weights are kept")
    print(f"reward's correlation with completion length (within prompts): {summary['length_correlation']:+.3f}")
    print(f"reward bias {summary['reward_bias']:+.4f} (SFT completions now mean 0); "
          f"per-prompt spread of mean reward {summary['per_prompt_mean_std']:.4f}")
    if "test" in summary:
        t = summary["test"]
        low, high = t["accuracy_interval"]
        print(f"held-out: accuracy {t['accuracy']:.3f} [{low:.3f}, {high:.3f} over prompts] on {t['pairs']} pairs "
              f"of {t['prompts']} prompt{'s' * (t['prompts'] != 1)}, mean margin {t['mean_margin']:.3f}, "
              f"ECE {t['ece']:.3f}")
    print(f"reward model saved to {summary['rm_dir']} (curves: {summary['curves']})")


def run_eval(args) -> None:
    from reward_model.data import read_records
    from reward_model.evaluate import evaluate_reward_model
    from reward_model.model import load_reward_model

    rows = read_records(args.data, args.data_split)
    rm, tokenizer = load_reward_model(args.rm, dtype=args.dtype)
    result = evaluate_reward_model(rm, tokenizer, [record for _, record in rows],
                                   subsets=[row["subset"] for row, _ in rows])
    if args.json:
        print(json.dumps(result))
        return
    if not result["pairs"]:
        raise UserError(f"{args.data}: no comparable pairs (all ties or identical texts)")
    print(f"pairs            {result['pairs']}")
    low, high = result["accuracy_interval"]
    print(f"accuracy         {result['accuracy']:.4f}  (95% interval {low:.4f}-{high:.4f}, resampling the "
          f"{result['prompts']} prompt{'s' * (result['prompts'] != 1)})")
    if "by_subset" in result:
        print(f"subset mean      {result['subset_mean']:.4f}  (the mean of the {len(result['by_subset'])} subsets' "
              f"accuracies)")
        for name, g in result["by_subset"].items():
            low, high = g["accuracy_interval"]
            print(f"  {name:18s} {g['accuracy']:.4f}  ({low:.4f}-{high:.4f}, {g['pairs']} pairs)")
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


def _read_samples(source: str) -> list[tuple[Prompt, str]]:
    from rlhf.jsonl import parse_jsonl, read_jsonl
    from rlhf.records import prompt_field

    name, rows = ("<stdin>", parse_jsonl(sys.stdin, "<stdin>")) if source == "-" else (source, read_jsonl(source))
    samples = []
    for line_no, obj in rows:
        try:
            prompt = prompt_field(obj)
        except ValueError as exc:
            raise UserError(f"{name}:{line_no}: {exc}") from None
        completion = obj.get("completion")
        if not isinstance(completion, str):
            raise UserError(f"{name}:{line_no}: 'completion' must be a string")
        samples.append((prompt, completion))
    return samples


def run_score(args) -> None:
    from reward_model.model import load_reward_model, score_texts
    from rlhf.jsonl import write_jsonl
    from rlhf.records import ScoredSample

    if args.input != "-" and not Path(args.input).is_file():
        raise UserError(f"{args.input}: no such file")
    samples = _read_samples(args.input)
    rm, tokenizer = load_reward_model(args.rm, dtype=args.dtype)
    rewards = score_texts(rm, tokenizer, [p for p, _ in samples], [c for _, c in samples],
                          batch_size=args.batch_size, max_length=rm.meta["max_length"])
    rows = (ScoredSample(p, c, r).to_dict() for (p, c), r in zip(samples, rewards))
    if args.out == "-":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        count = write_jsonl(args.out, rows)
        print(f"scored {count} samples -> {args.out}", file=sys.stderr)
